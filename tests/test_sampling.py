"""Sampling (do_sample, temperature, top_k, top_p, seed) against transformers.

torch's random stream cannot be reproduced token for token, so these test what must hold: a seed fixes a
question's answer whatever else is decoded beside it; top_k=1 is greedy decoding; and the first sampled
token follows the distribution transformers' own processors and warpers give, by a chi-square
goodness-of-fit test with fixed seeds, shown able to reject a wrong distribution.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from transformers.generation import logits_process as LP

from conftest import COMBOS
from support import reference_tokens, special_ids

DRAWS = 400  # questions answered per goodness-of-fit test (one token each)
WARPERS = dict(do_sample=True, temperature=0.7, top_k=12, top_p=0.9)


@pytest.mark.parametrize("kind", ["token", "sequence"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_seed_fixes_the_answer_whatever_is_decoded_beside_it(bundles, questions, kind, num_beams):
    pipe = bundles[(kind, "bart")].pipeline
    params = dict(do_sample=True, num_beams=num_beams, temperature=1.5, top_k=0, max_length=10, n_docs=3)
    qs = questions[:3]

    def answers(results):
        return [[a.token_ids for a in r.answers] for r in results]

    first = answers(pipe.generate(qs, seed=11, **params))
    assert answers(pipe.generate(qs, seed=11, **params)) == first
    assert answers(pipe.generate(qs[2:], seed=11, **params)) == first[2:], "a question's draws depend on its batch"
    by_seed = {str(answers(pipe.generate(qs[:1], seed=s, **params))) for s in range(6)}
    assert len(by_seed) > 1, "different seeds never changed the answer: nothing is sampled"


@pytest.mark.parametrize(("kind", "generator"), COMBOS, ids=[f"{k}-{g}" for k, g in COMBOS])
def test_top_k_1_sampling_is_greedy_decoding(bundles, questions, kind, generator):
    bundle = bundles[(kind, generator)]
    qs = questions[8:11]
    params = dict(num_beams=1, max_length=10, n_docs=4)
    sampled = bundle.pipeline.generate(qs, do_sample=True, top_k=1, seed=0, **params)
    ref = bundle.reference.generate(qs, **params)
    eos, pad = special_ids(bundle.pipeline)
    for r, s in zip(ref, sampled, strict=True):
        assert [a.token_ids for a in s.answers] == [reference_tokens(row, eos, pad) for row in r.sequences]
    assert len({tuple(a.token_ids) for r in sampled for a in r.answers}) > 1, "degenerate answers prove nothing"


class _Scores(LP.LogitsProcessor):
    """Records the scores the processors hand to the warpers when the sequences reach ``length`` tokens
    (a custom processor runs after generate()'s own processors and before its warpers); changes nothing."""

    def __init__(self, length: int):
        self.length, self.scores = length, None

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] == self.length and self.scores is None:
            self.scores = scores.detach().clone()
        return scores


def _transformers_token_probs(bundle, question: str, params: dict, length: int) -> np.ndarray:
    """The sampling distribution of the token after ``length`` tokens, as transformers computes it: its
    processed scores at that step (recorded), then its own warpers in generate()'s order, and a softmax."""
    ref = bundle.reference
    recorder = _Scores(length)
    enc = ref.encode([question])
    with torch.no_grad():
        ref.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                           logits_processor=LP.LogitsProcessorList([recorder]), **params)
        scores = recorder.scores[:1]  # RAG-Sequence with one passage: one row
        if params["temperature"] != 1.0:
            scores = LP.TemperatureLogitsWarper(params["temperature"])(None, scores)
        if params["top_k"]:
            scores = LP.TopKLogitsWarper(params["top_k"])(None, scores)
        if params["top_p"] < 1.0:
            scores = LP.TopPLogitsWarper(params["top_p"])(None, scores)
        return torch.softmax(scores, dim=-1)[0].double().numpy()


def _chi_square_p(counts: Counter, probs: np.ndarray, n: int) -> float:
    """p-value of Pearson's chi-square test of ``counts`` (n draws) against ``probs``; categories expected
    fewer than 5 times are pooled. The chi-square tail uses the Wilson-Hilferty normal approximation."""
    expected = probs * n
    big = np.flatnonzero(expected >= 5)
    observed = np.array([counts.get(int(t), 0) for t in big] + [n - sum(counts.get(int(t), 0) for t in big)], float)
    expected = np.append(expected[big], n - expected[big].sum())
    if expected[-1] < 5:  # too little left to pool: fold it into the smallest category
        observed, expected = observed[:-1], expected[:-1]
        observed[np.argmin(expected)] += n - observed.sum()
        expected[np.argmin(expected)] += n - expected.sum()
    if (observed[expected == 0] > 0).any():
        return 0.0
    keep = expected > 0
    stat = float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_first_sampled_token_follows_transformers_distribution(bundles, questions, kind):
    """RAG-Token samples from the marginalized distribution; RAG-Sequence from the generator's, per
    passage (one passage here, so the sample is the answer)."""
    bundle = bundles[(kind, "bart")]
    question = questions[5]
    # A forced BOS (the tiny RAG-Token BART checkpoint has one) makes the second token the first sampled one;
    # max_length leaves room for it before a forced EOS (at max_length - 1).
    begin = 2 if bundle.pipeline.manifest.generation_defaults.forced_bos_token_id is not None else 1
    params = dict(num_beams=1, max_length=begin + 2, n_docs=5 if kind == "token" else 1, **WARPERS)
    probs = _transformers_token_probs(bundle, question, params, begin)
    assert (probs > 0.02).sum() >= 4, f"a flat or peaked distribution makes a weak test: {np.sort(probs)[-8:]}"
    firsts = Counter(bundle.pipeline.generate([question], seed=seed, **params)[0].answers[0].token_ids[begin]
                     for seed in range(DRAWS))
    assert set(firsts) <= set(np.flatnonzero(probs > 0).tolist()), "drew tokens the warpers remove"
    p = _chi_square_p(firsts, probs, DRAWS)
    assert p > 1e-3, f"the draws do not follow transformers' distribution (chi-square p = {p:.2e})"
    # The same test must reject the distribution without the warpers: it can fail.
    plain = _transformers_token_probs(bundle, question, dict(params, temperature=1.0, top_k=0, top_p=1.0), begin)
    assert _chi_square_p(firsts, plain, DRAWS) < 1e-4, "the test cannot tell the warped distribution from the plain one"
