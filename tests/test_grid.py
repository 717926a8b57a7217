"""A property-based grid: small random RAG checkpoints across generator families and config variants,
weight spreads and generation settings. Each must export with default validation and answer
token-identically to transformers, for RAG-Token and RAG-Sequence.

Where an answer differs, the case passes only as a proven float near-tie: transformers' own answer changes
when the same checkpoint runs in float64, or the runtime agrees with the float64 answer. Each such case is
reported as a warning with its evidence; any other difference fails. The grid is derandomized (the same
examples on every run) and bounded for CI; a failing example found here is kept as an ``@example``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st

from rag_export.validate import DECODER_LOGITS
from rag_testing.factory import generators, make_checkpoint
from support import reference_tokens, spread_checkpoint

EXAMPLES = 10


class NearTie(UserWarning):
    """A difference from transformers proven to be a float near-tie (reported, never silent)."""


@st.composite
def cases(draw) -> dict:
    generator, kind = draw(st.sampled_from(generators())), draw(st.sampled_from(["token", "sequence"]))
    layers, heads = draw(st.integers(1, 2)), draw(st.sampled_from([2, 4]))
    d_model, ffn, tie = draw(st.sampled_from([32, 64])), draw(st.sampled_from([64, 128])), draw(st.booleans())
    if generator == "t5":
        config = dict(num_layers=layers, num_decoder_layers=layers, num_heads=heads, d_model=d_model,
                      d_kv=d_model // heads, d_ff=ffn, tie_word_embeddings=tie,
                      feed_forward_proj=draw(st.sampled_from(["relu", "gated-gelu"])))
    else:
        config = dict(encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                      decoder_attention_heads=heads, d_model=d_model, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                      tie_word_embeddings=tie, scale_embedding=draw(st.booleans()),
                      activation_function=draw(st.sampled_from(["gelu", "relu", "gelu_new", "silu"])))
    beams, max_length = draw(st.sampled_from([1, 2, 4])), draw(st.integers(6, 12))
    n_docs = draw(st.integers(2, 5))
    most = beams if kind == "token" else min(n_docs * beams, 4)
    params = dict(n_docs=n_docs, num_beams=beams, max_length=max_length,
                  num_return_sequences=draw(st.integers(1, most)),
                  no_repeat_ngram_size=draw(st.sampled_from([0, 2])),
                  min_length=draw(st.sampled_from([0, 3])))
    # None: the factory's init (std ~ 1/sqrt(fan_in)); a number: every matrix redrawn from N(0, std^2).
    spread = draw(st.sampled_from([None, 0.02, 0.2, 1.0]))
    return dict(generator=generator, kind=kind, config=config, spread=spread, params=params)


# The configuration issue 11 reported (a RAG-Sequence near-tie on an N(0, 1) checkpoint), kept as a case.
REPORTED = dict(generator="bart", kind="sequence", config={}, spread=1.0,
                params=dict(n_docs=3, num_beams=4, num_return_sequences=3, no_repeat_ngram_size=2, max_length=12,
                            min_length=0))


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
@example(case=REPORTED)
@given(case=cases())
def test_random_checkpoints_export_and_answer_like_transformers(case, questions):
    note(repr(case))
    with tempfile.TemporaryDirectory(prefix="rag-grid-") as tmp:
        ckpt = _checkpoint(Path(tmp), case)
        _compare(ckpt, Path(tmp) / "export", case, [questions[3], questions[16]])


def _checkpoint(tmp: Path, case: dict) -> Path:
    ckpt = make_checkpoint(tmp / "ckpt", case["kind"], case["generator"], generator_config=case["config"])
    return ckpt if case["spread"] is None else spread_checkpoint(ckpt, tmp / "spread", case["spread"])


def _compare(ckpt: Path, out: Path, case: dict, qs: list[str]) -> None:
    from rag_export import export
    from rag_runtime import RagPipeline
    from rag_testing.reference import Reference

    export(str(ckpt), out)  # default validation: must pass for every sane or extreme checkpoint
    pipe = RagPipeline.load(out, threads=1)
    d = pipe.manifest.generation_defaults
    eos, pad = set(d.eos_token_id), d.pad_token_id
    ref = Reference(str(ckpt)).generate(qs, **case["params"])
    generated = {t for r in ref for row in r.sequences for t in row[1:].tolist()} - eos - {pad}
    assume(len(generated) >= 3)  # a degenerate reference proves nothing either way
    got = pipe.generate(qs, **case["params"])
    # Each token's log-probability is off by up to twice the logits' error, which the export measured: a
    # RAG-Token score averages them over the answer, a RAG-Sequence score sums them (max_length terms).
    logits_error = pipe.manifest.validation["generator_decoder"][DECODER_LOGITS]["max_abs_diff"]
    terms = case["params"]["max_length"] if case["kind"] == "sequence" else 1
    atol = max(1e-4, 2 * terms * logits_error)
    differing, off_scores = [], []
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        want = [reference_tokens(row, eos, pad) for row in r.sequences]
        if [a.token_ids for a in g.answers] != want:
            differing.append(i)
        elif r.scores is not None and not np.allclose([a.score for a in g.answers], r.scores, rtol=1e-4, atol=atol):
            off_scores.append(i)
    if differing:
        _prove_near_tie(ckpt, case, qs, ref, got, differing, eos, pad)
    if off_scores:
        _prove_score_noise(ckpt, case, qs, ref, got, off_scores, atol)


def _reference64(ckpt, case, qs):
    from rag_testing.reference import Reference

    ref64 = Reference(str(ckpt))
    ref64.model.double()
    return ref64.generate(qs, **case["params"])


def _prove_score_noise(ckpt, case, qs, ref, got, off_scores, atol) -> None:
    """Same answers, scores further apart than the export's measured logits error explains: accepted only
    if the runtime's score is as close to transformers' float64 score as transformers' own float32 one is
    (within a factor of 2), i.e. the gap is float32 rounding on this checkpoint, not a bias."""
    exact = _reference64(ckpt, case, qs)
    for i in off_scores:
        ours, fp32 = np.array([a.score for a in got[i].answers]), np.asarray(ref[i].scores, dtype=np.float64)
        fp64 = np.asarray(exact[i].scores, dtype=np.float64)
        assert np.all(np.abs(ours - fp64) <= np.maximum(2 * np.abs(fp32 - fp64), atol)), (
            f"{qs[i]!r}: runtime scores {ours.tolist()} are further from transformers fp64 {fp64.tolist()} than "
            f"its fp32 scores {fp32.tolist()}: not float noise.\n case {case}")
        warnings.warn(NearTie(
            f"{case['generator']} rag-{case['kind']} spread {case['spread']} {case['params']}: {qs[i]!r}: scores "
            f"off by {np.abs(ours - fp32).max():.2e} from transformers fp32, {np.abs(ours - fp64).max():.2e} from "
            f"fp64 (transformers fp32 itself: {np.abs(fp32 - fp64).max():.2e})"), stacklevel=1)


def _prove_near_tie(ckpt, case, qs, ref, got, differing, eos, pad) -> None:
    """A difference is accepted only if float64 shows it is a tie at fp32 precision."""
    exact = _reference64(ckpt, case, qs)
    for i in differing:
        fp32 = [reference_tokens(row, eos, pad) for row in ref[i].sequences]
        fp64 = [reference_tokens(row, eos, pad) for row in exact[i].sequences]
        ours = [a.token_ids for a in got[i].answers]
        # A tie at fp32 precision: the reference's own answer moves with the precision, and the runtime
        # lands on one of the two sides of it (an answer matching neither would not be a tie).
        assert ours == fp64 or (fp32 != fp64 and ours == fp32), (
            f"{qs[i]!r}: the runtime differs from transformers in a way float64 does not explain: not a "
            f"near-tie.\n runtime {ours}\n transformers fp32 {fp32}\n transformers fp64 {fp64}\n case {case}")
        warnings.warn(NearTie(
            f"{case['generator']} rag-{case['kind']} spread {case['spread']} {case['params']}: {qs[i]!r}: runtime "
            f"{'matches' if ours == fp64 else 'differs from'} transformers fp64; transformers fp32 "
            f"{'differs from' if fp32 != fp64 else 'matches'} its fp64 answer"), stacklevel=1)
