"""The numpy logits processors against transformers' own, on random scores (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation import logits_process as LP

from rag_runtime.decoding import processors as P
from rag_runtime.decoding.rag import logsumexp
from rag_runtime.decoding.search import log_softmax

VOCAB = 40


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, size=(6, 7)).astype(np.int64)  # small id range: repeats and n-gram hits
    scores = rng.normal(size=(6, VOCAB)).astype(np.float32)
    return ids, scores


def _ref(processor, ids, scores):
    return processor(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty(batch, penalty):
    ids, scores = batch
    np.testing.assert_array_equal(P.repetition_penalty(ids, scores, penalty),
                                  _ref(LP.RepetitionPenaltyLogitsProcessor(penalty), ids, scores))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8])
def test_no_repeat_ngram(batch, n):
    ids, scores = batch
    ids = ids.copy()
    ids[1] = 3  # a constant row repeats every n-gram up to its length, so n = 7 bans too
    got = P.no_repeat_ngram(ids, scores, n)
    np.testing.assert_array_equal(got, _ref(LP.NoRepeatNGramLogitsProcessor(n), ids, scores))
    if n <= ids.shape[1]:
        assert np.isinf(got[1, 3]) and np.isinf(got).sum() >= 1, "the constant row must ban its token"
    else:  # an n-gram longer than the sequence cannot have occurred: nothing may change
        np.testing.assert_array_equal(got, scores)


def test_bad_words(batch):
    ids, scores = batch
    words = [[5], [2, 3], [ids[0, -1].item(), 9], [1, 2, 3, 4], [7]]
    eos = [7]
    np.testing.assert_array_equal(P.bad_words(ids, scores, words, eos),
                                  _ref(LP.NoBadWordsLogitsProcessor(words, eos), ids, scores))


@pytest.mark.parametrize("length", [3, 7, 8])
@pytest.mark.parametrize("current", [2, 6, 7])
def test_min_length(batch, length, current):
    ids, scores = batch
    ids = ids[:, :current]
    got = P.min_length(ids, scores, length, [2, 5])
    np.testing.assert_array_equal(got, _ref(LP.MinLengthLogitsProcessor(length, [2, 5]), ids, scores))
    banned = np.isinf(got[:, [2, 5]]).all()
    assert banned == (current < length), "EOS is banned exactly while the sequence is shorter than min_length"
    np.testing.assert_array_equal(np.delete(got, [2, 5], axis=1), np.delete(scores, [2, 5], axis=1))


def test_forced_bos_and_eos(batch):
    ids, scores = batch
    settings = P.ProcessorSettings(max_length=8, forced_bos_token_id=0, forced_eos_token_id=2, eos_token_ids=(2,))
    np.testing.assert_array_equal(P.apply(settings, ids[:, :1], scores),
                                  _ref(LP.ForcedBOSTokenLogitsProcessor(0), ids[:, :1], scores))
    np.testing.assert_array_equal(P.apply(settings, ids, scores),
                                  _ref(LP.ForcedEOSTokenLogitsProcessor(8, 2), ids, scores))


def test_log_softmax_and_logsumexp_match_torch(batch):
    _, scores = batch
    np.testing.assert_allclose(log_softmax(scores), torch.log_softmax(torch.from_numpy(scores), -1).numpy(),
                               rtol=1e-6, atol=1e-6)
    x = scores.reshape(2, 3, VOCAB)
    x[0, :, 4] = -np.inf
    np.testing.assert_allclose(logsumexp(x, axis=1), torch.logsumexp(torch.from_numpy(x), 1).numpy(), rtol=1e-6, atol=1e-6)


def test_topk_matches_torch():
    from rag_runtime.decoding.search import topk

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5000)).astype(np.float32)
    for k in (1, 4, 8, 40):
        np.testing.assert_array_equal(topk(x, k), torch.topk(torch.from_numpy(x), k).indices.numpy())
    x[:, 100:110] = 9.0  # exact ties: torch's order among them is unspecified, the set is not
    got = topk(x, 10)
    assert (got == np.arange(100, 110)).all(), "ties are broken by index"
    assert {tuple(sorted(r)) for r in torch.topk(torch.from_numpy(x), 10).indices.numpy()} == {tuple(range(100, 110))}


def test_topk_of_rows_mostly_masked():
    """A forced token leaves rows of -inf: selected among the finite entries, the same winners as a full
    sort, padded with the lowest-index -inf entries when a row has fewer than k finite ones."""
    from rag_runtime.decoding.search import topk

    rng = np.random.default_rng(2)
    x = np.full((4, 5000), -np.inf, dtype=np.float32)
    x[0, rng.choice(5000, 40, replace=False)] = rng.normal(size=40)
    x[1, [17, 3000]] = [1.0, 2.0]
    x[2, 7] = 0.5
    for k in (1, 8, 20):
        want = np.argsort(-x, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(topk(x, k), want)
    assert list(topk(x, 3)[1]) == [3000, 17, 0] and list(topk(x, 3)[3]) == [0, 1, 2]


@pytest.mark.parametrize("settings", [
    dict(no_repeat_ngram_size=2, min_length=30),
    dict(no_repeat_ngram_size=3, bad_words_ids=((7,), (9, 11), (4, 5, 6))),
    dict(min_length=3),
    dict(),
], ids=["ngram+min_length", "ngram+bad_words", "min_length_over", "none"])
def test_bans_are_apply_without_dense_processors(batch, settings):
    """The fused head applies processors as an index list of bans; that must equal applying them."""
    ids, scores = batch
    s = P.ProcessorSettings(max_length=40, eos_token_ids=(2, 3), **settings)
    assert not P.has_dense(s, ids.shape[1])
    rows, tokens = P.bans(s, ids)
    banned = scores.copy()
    banned[rows, tokens] = -np.inf
    np.testing.assert_array_equal(banned, P.apply(s, ids, scores))


def test_dense_processors_are_detected():
    s = P.ProcessorSettings(max_length=10, forced_bos_token_id=0, forced_eos_token_id=2)
    assert [P.has_dense(s, n) for n in (1, 2, 8, 9)] == [True, False, False, True]
    assert P.has_dense(P.ProcessorSettings(max_length=10, repetition_penalty=1.2), 5)


@pytest.mark.parametrize("cur_len", [1, 9])
def test_forced_steps_do_not_read_the_scores(cur_len):
    """At a forced BOS or EOS step ``apply`` overwrites every score, so the runtime skips computing them
    (the marginal over passages, the log-softmax) and passes zeros: the result must be the same whatever
    the scores, other processors and the bans after the forcing included."""
    s = P.ProcessorSettings(max_length=10, forced_bos_token_id=0, forced_eos_token_id=2, repetition_penalty=1.3,
                            no_repeat_ngram_size=2, min_length=4, suppress_tokens=(5,), begin_suppress_tokens=(0, 7),
                            eos_token_ids=(2,))
    assert P.forces(s, cur_len) and not P.forces(s, 5)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 30, size=(4, cur_len))
    scores = rng.normal(size=(4, 30)).astype(np.float32)
    got = P.apply(s, ids, np.zeros_like(scores))
    np.testing.assert_array_equal(got, P.apply(s, ids, scores))
    forced = 0 if cur_len == 1 else 2
    assert (got[:, forced] == 0).all() and np.isfinite(got).sum() == 4
