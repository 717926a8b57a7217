"""Export validation judges what matters: a tolerance scaled to each output, and the decisions beam
search takes from the logits (near-ties told from real drift)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import build_checkpoint
from rag_export import ValidationError, export
from rag_export.cli import main as export_main
from rag_export.judge import GROSS, Tolerance, check_decisions, check_values
from rag_export.validate import DECODER_LOGITS
from rag_runtime import constants as C
from support import assert_not_degenerate, reference_tokens, spread_checkpoint


def _logits(rows: int = 6, vocab: int = 50, scale: float = 10.0) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, scale, (rows, vocab))


def test_tolerance_scales_with_the_output():
    ref = _logits(scale=100.0)
    got = ref + 0.05  # large absolutely, tiny against values in the hundreds
    figures = check_values("g", "logits", got, ref, Tolerance())
    assert figures["max_abs_diff"] == pytest.approx(0.05)
    assert figures["tolerance"] == pytest.approx(1e-4 + 1e-3 * np.abs(ref).max())
    assert figures["max_abs_diff"] < figures["tolerance"]
    with pytest.raises(ValidationError, match=r"differs from PyTorch by .*x its tolerance"):
        check_values("g", "logits", got, ref, Tolerance(atol=0.0, rtol=1e-5, strict=True))


def test_small_excess_is_recorded_gross_excess_fails(caplog):
    ref = _logits()
    bound = Tolerance().bound(np.abs(ref).max())
    figures = check_values("g", "out", ref + 3 * bound, ref, Tolerance())  # 3x: recorded, warned
    assert figures["max_abs_diff"] > figures["tolerance"]
    assert "3.0x its tolerance" in caplog.text
    with pytest.raises(ValidationError, match="out' differs"):
        check_values("g", "out", ref + 2 * GROSS * bound, ref, Tolerance())
    with pytest.raises(ValidationError, match="shape"):
        check_values("g", "out", ref[:, :3], ref, Tolerance())
    with pytest.raises(ValidationError, match="NaN"):
        check_values("g", "out", np.where(ref > 0, np.nan, ref), ref, Tolerance())
    assert check_values("g", "out", ref + 1e9, ref, Tolerance(enforce=False))["max_abs_diff"] > 1e8


def test_decisions_agree_near_ties_pass_real_swaps_fail():
    ref = _logits()
    same = check_decisions("g", "logits", ref.copy(), ref, 4, Tolerance(), 0.01)
    assert same["rows_agreeing"] == same["rows"] == 6 and same["near_tie_rows"] == 0
    assert same["min_top_gap"] == pytest.approx(min(np.sort(r)[-1] - np.sort(r)[-2] for r in ref))

    tied = ref.copy()
    first, second = np.argsort(-tied[2])[:2]
    tied[2, second] = tied[2, first] - 1e-3  # a near-tie in PyTorch's logits ...
    flipped = tied.copy()
    flipped[2, second] = tied[2, first] + 1e-3  # ... that the graph ranks the other way
    near = check_decisions("g", "logits", flipped, tied, 4, Tolerance(), 0.01)
    assert (near["rows_agreeing"], near["near_tie_rows"]) == (5, 1)
    assert near["worst_swap_gap"] == pytest.approx(1e-3)
    with pytest.raises(ValidationError, match="swaps near-tied top-4 tokens in 1 of 6 rows"):
        check_decisions("g", "logits", flipped, tied, 4, Tolerance(strict=True), 0.01)

    drifted = ref.copy()
    third = np.argsort(-ref[4])[2]
    drifted[4, third] = ref[4].max() + 1.0  # the third token jumps to first place: a real change
    with pytest.raises(ValidationError, match=r"changes beam-search decisions: .* in 1 of 6 rows \(1 beyond near-ties"):
        check_decisions("g", "logits", drifted, ref, 4, Tolerance(), 0.01)
    assert check_decisions("g", "logits", drifted, ref, 4, Tolerance(enforce=False), 0.01)["rows_agreeing"] == 5


def test_a_graph_that_drifts_fails_the_export_and_writes_nothing(work_dir, tmp_path, capsys, monkeypatch):
    """A decoder graph that is wrong by a little (one token's logit raised) is caught by the export."""
    from rag_export.graphs import bart

    init = bart.BartDecoderGraph.__init__

    def drifting(self, *args, **kwargs):  # the graph's own copy of the bias: the reference stays right
        init(self, *args, **kwargs)
        self.final_logits_bias[..., 7] += 3.0

    monkeypatch.setattr(bart.BartDecoderGraph, "__init__", drifting)
    out = tmp_path / "out"
    assert export_main([str(build_checkpoint(work_dir, "token", "bart")), str(out), "--no-index"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rag-export: error: validation failed: generator_decoder output 'logits"), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _spread_export(work_dir, std: float):
    """A RAG-Token BART checkpoint with every matrix drawn from N(0, std^2), exported with default options."""
    src = build_checkpoint(work_dir, "token", "bart")
    ckpt = spread_checkpoint(src, work_dir / f"ckpt-token-bart-spread{std:g}", std=std)
    out = work_dir / f"export-token-bart-spread{std:g}"
    if not (out / C.MANIFEST_FILE).is_file():
        export(str(ckpt), out, force=True)
    return ckpt, out


@pytest.fixture(scope="module", params=[1.0, 2.0], ids=["N(0,1)", "N(0,4)"])
def spread_bundle(work_dir, request):
    return request.param, *_spread_export(work_dir, request.param)


def test_widely_spread_checkpoint_exports_with_defaults(spread_bundle):
    std, _, out = spread_bundle
    figures = json.loads((out / C.MANIFEST_FILE).read_text())["validation"]["generator_decoder"][DECODER_LOGITS]
    assert figures["max_abs_ref"] > 20 * std  # large logits, where fp32 rounding is large too
    assert figures["max_abs_diff"] <= figures["tolerance"]
    assert figures["decisions"]["rows_agreeing"] == figures["decisions"]["rows"]
    if std > 1:  # a correct export an absolute 1e-3 would have refused
        assert figures["max_abs_diff"] > 1e-3


@pytest.mark.parametrize("params", [
    dict(num_beams=4, max_length=12, num_return_sequences=2, n_docs=3),
    dict(num_beams=3, max_length=10, no_repeat_ngram_size=2, min_length=4),
    dict(num_beams=1, max_length=9),
], ids=["beams", "processors", "greedy"])
def test_widely_spread_checkpoint_answers_identically(spread_bundle, questions, params):
    from rag_runtime import RagPipeline
    from rag_testing.reference import Reference

    _, ckpt, out = spread_bundle
    pipe = RagPipeline.load(out)
    qs = [questions[2], questions[7], questions[11]]
    ref = Reference(str(ckpt)).generate(qs, **params)
    got = pipe.generate(qs, **params)
    d = pipe.manifest.generation_defaults
    eos, pad = set(d.eos_token_id), d.pad_token_id
    assert_not_degenerate([r.sequences for r in ref], eos | {pad, d.decoder_start_token_id})
    # A score is a mean of per-token log-probabilities, each off by at most twice the logits' error, which
    # the export measured: at large spreads that bound, not 1e-4, is what fp32 allows.
    logits_error = pipe.manifest.validation["generator_decoder"][DECODER_LOGITS]["max_abs_diff"]
    for r, g in zip(ref, got, strict=True):
        assert [a.token_ids for a in g.answers] == [reference_tokens(row, eos, pad) for row in r.sequences]
        if r.scores is not None:
            np.testing.assert_allclose([a.score for a in g.answers], r.scores, rtol=1e-4,
                                       atol=max(1e-4, 2 * logits_error))
