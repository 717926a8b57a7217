"""The int8 agreement benchmark at tiny size (about 30 s): training lowers the loss and saves a checkpoint
transformers loads, the trained fp32 export answers like transformers, int8 really changes the numbers,
and the report compares what it says it compares. The real run (minutes of training) is by hand."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ctranslate2")


def test_int8_agreement_tiny(tmp_path):
    from benchmarks import int8_agreement

    argv = ["--d-model", "64", "--layers", "2", "--steps", "40", "--minutes", "1", "--lr", "3e-3", "--retriever-steps", "100",
            "--questions", "2", "--reference", "2", "--rounds", "1", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path), "--name", "smoke"]
    assert int8_agreement.main(argv) == 0
    report = json.loads((tmp_path / "smoke.json").read_text())
    mtime = next((tmp_path / "cache").glob("*/checkpoint/model.safetensors")).stat().st_mtime_ns
    training = report["training"]
    assert training["steps"] == 40 and training["settings"]["d_model"] == 64
    assert training["final_loss"] < training["first_loss"] - 0.5, training
    assert training["retriever"]["steps"] == 100
    assert training["retriever"]["final_loss"] < training["retriever"]["first_loss"], training["retriever"]
    assert report["reference"] == {"identical": 2, "compared": 2}
    pipeline = report["pipeline"]
    assert pipeline["fp32_same_as_generate"]
    for row in (pipeline["whole pipeline"], pipeline["whole pipeline, question encoder int8"],
                pipeline["same retrieval"]):
        assert row["compared"] == 2 and 0 <= row["identical"] <= 2
        assert row["score_drift_max"] >= row["score_drift_mean"] >= 0
    # --quantize int8 keeps the question encoder fp32: the int8 export retrieves exactly fp32's passages.
    assert pipeline["whole pipeline"]["same_passages"] == 2
    assert 0 <= pipeline["whole pipeline, question encoder int8"]["same_passages"] <= 2
    pairs = {label: row for label, row in report["contexts"].items() if isinstance(row, dict)}
    assert len(pairs) == 4
    for label, row in pairs.items():
        assert row["compared"] == 2 * 5 and 0 <= row["identical"] <= row["compared"], label
    logits = report["logits"]
    assert logits["positions"] > 0 and 0 < logits["logit_diff_max"] < logits["max_abs_logit_fp32"]
    assert set(report["timing"]["sides"]) == {"rag_runtime fp32", "rag_runtime int8", "ctranslate2 fp32",
                                              "ctranslate2 int8"}
    text = (tmp_path / "smoke.md").read_text()
    assert "| rag_runtime int8 vs fp32, same retrieval |" in text
    assert "| rag_runtime int8 + int8 question encoder vs fp32, whole pipeline |" in text
    # The cache is reused for the same settings: nothing is rebuilt or retrained.
    settings = int8_agreement.Training(**training["settings"])
    ckpt, _, again = int8_agreement.prepare(settings, tmp_path / "cache")
    assert again == training and (ckpt / "model.safetensors").stat().st_mtime_ns == mtime
