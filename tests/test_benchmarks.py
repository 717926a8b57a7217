"""The device benchmark runs end to end without faiss or datasets (the accelerator image has neither),
and reports what it promises: fp32 agreement with transformers, fp16 measured, per-step decode time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_benchmark_without_faiss_or_datasets(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["faiss"] = sys.modules["datasets"] = None  # absent: imports fail, find_spec finds nothing
        from benchmarks import device, run
        run.CACHE = device.CACHE = __import__("pathlib").Path({str(tmp_path / "cache")!r})
        sys.exit(device.main(["--workload", "tiny", "--questions", "3", "--min-batches", "2", "--warmup", "1",
                              "--batch", "1", "2", "--cache", {str(tmp_path / "cache")!r},
                              "--out", {str(tmp_path / "results")!r}, "--name", "smoke", "--require-identical"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert [r["batch"] for r in report["runs"]] == [1, 2]
    sides = {"runtime-cpu-fp32", "runtime-cpu-fp16", "transformers-cpu-fp32-eager", "transformers-cpu-fp32-sdpa",
             "transformers-cpu-fp16-eager", "transformers-cpu-fp16-sdpa"}
    assert set(report["sides"]) == sides
    for name, side in report["sides"].items():
        if name.startswith("runtime"):
            assert {g["providers"][0] for g in side["graphs"].values()} == {"CPUExecutionProvider"}
        else:
            assert side["attention"]["generator"] == name.rsplit("-", 1)[1]
    for run in report["runs"]:
        assert run["calls"] >= 2 and run["calls"] * run["batch"] >= 3 and not run["truncated"]
        assert set(run["sides"]) == sides
        for ref in ("transformers-cpu-fp32-eager", "transformers-cpu-fp32-sdpa"):
            agree = run["agreement"][f"runtime-cpu-fp32 vs {ref}"]
            assert agree["identical"] == agree["compared"] > 0
        assert "runtime-cpu-fp16 vs transformers-cpu-fp16-sdpa" in run["agreement"]
        for name, side in run["sides"].items():
            assert side["decode_step_ms"] > 0 and side["p99_ms"] >= side["p50_ms"] > 0
            assert side["step_floor_ms"] > 0
            if name.startswith("runtime"):
                assert 0 < side["host_ms_per_step"] < side["decode_step_ms"]
    assert "| runtime-cpu-fp16 |" in (tmp_path / "results" / "smoke.md").read_text()


def test_floor_benchmark_reports_every_stage_above_its_floor(tmp_path, monkeypatch):
    """Both kinds at tiny size: every stage is measured, has a positive floor, and a question never beats the
    sum of its stages' floors (a floor the runtime beats would be a wrong floor)."""
    from benchmarks import floor, peers, run

    monkeypatch.setattr(run, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(peers, "CACHE", tmp_path / "cache")
    for kind, stages in (("token", 6), ("sequence", 6)):
        assert floor.main(["--workload", "tiny", "--kind", kind, "--questions", "1",
                           "--out", str(tmp_path), "--name", kind]) == 0
        report = json.loads((tmp_path / f"{kind}.json").read_text())
        assert len(report["table"]) == stages
        for stage, measured, floor_ms, _bound in report["table"]:
            assert floor_ms > 0, stage
            # "call - LM head" subtracts a kernel profiled in a second pass: at tiny size, on a busy machine,
            # that difference of two noisy timings can come out negative.
            assert measured > 0 or "call - LM head" in stage, stage
        question, measured, floor_ms, _ = report["table"][-1]
        assert question.startswith("question p50") and measured > floor_ms
    assert report["measured"]["rescore_calls_per_question"] == 5  # one per passage
    text = (tmp_path / "sequence.md").read_text()
    assert "rescore, one passage" in text and "of which the beam step graph" in text
    assert report["measured"]["beam_step_call_ms"] > 0


def test_serve_load_measures_every_scheduling_mode(bundles, tmp_path):
    """A few seconds of the load benchmark against real servers, in each mode, with the engine's counters."""
    from benchmarks import serve_load

    export = bundles[("token", "bart")].export
    assert serve_load.main(["--workload", "tiny", "--export", str(export), "--rates", "10", "--concurrency", "3",
                            "--duration", "1.5", "--idle-requests", "3", "--mixed", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serve-tiny-mixed.json").read_text())
    assert list(report["modes"]) == list(serve_load.MODES)
    for mode, r in report["modes"].items():
        points = [r["idle"], *r["open_loop"], *r["closed_loop"]]
        assert all(p["ok"] == p["sent"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0 for p in points), mode
    engine = report["modes"]["engine"]["closed_loop"][0]["engine"]
    assert engine["steps"] > 0 and engine["rows_per_step"] >= 1 and 0 < engine["busy_share"] <= 1.5
    assert report["host"]["vector_isa"] and (tmp_path / "serve-tiny-mixed.png").exists()
