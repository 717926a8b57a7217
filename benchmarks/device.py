"""Generation latency on one device: rag_runtime fp32/fp16 against transformers' generate fp32/fp16.

    python -m benchmarks.device --workload large --device cuda --batch 1 8      # rag-token-nq dims, GPU
    python -m benchmarks.device --workload tiny --questions 4                    # CPU smoke

Both sides decode from the same supplied contexts (5 passages per question, fixed passage scores), with
the same explicit parameters (4 beams, answers of exactly ``answer_tokens`` tokens), in one process,
interleaved after warm-up. Retrieval is left out so that the accelerator machine needs neither faiss nor
datasets (its image has neither); ``benchmarks.run`` measures the whole pipeline with retrieval.

Reported per (batch, side): latency p50/p90/p99 per batch call, per-stage time (generator encoder,
decode), decode time per step (both sides synchronize the device before a clock is read), for the
runtime the host's share of each step (beam bookkeeping, processors, bindings), and token
agreement of each runtime precision with each reference precision (fp32 against fp32 must be identical).
Writes ``benchmarks/results/<name>.json`` and ``.md`` with device, driver and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.run import (
    CACHE,
    QUESTIONS,
    RESULTS,
    WORKLOADS,
    _log,
    _pct,
    build_checkpoint,
    is_current,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 5


def prepare(workload: str, precisions: list[str]) -> tuple[Path, dict[str, Path]]:
    """A checkpoint without a knowledge base, and one export per precision, under .cache/bench/."""
    from rag_export import export

    base = CACHE / f"{workload}-token-bart-contexts"
    ckpt = build_checkpoint(base / "checkpoint", workload, "token", "bart", index_type=None)
    exports = {}
    for precision in precisions:
        out = base / f"export-{precision}"
        if not is_current(out):
            t0 = time.perf_counter()
            export(str(ckpt), out, force=True, include_index=False, precision=precision)
            _log(f"{precision} export took {time.perf_counter() - t0:.1f}s")
        exports[precision] = out
    return ckpt, exports


def contexts(pipe, questions: list[str], seed: int = 0, corpus: list[dict] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per question, ``N_DOCS`` passages (of ``corpus``, default the bundled corpus as is) contextualized as
    the retriever does, and passage scores."""
    corpus = corpus or [json.loads(line) for line in
                        (ROOT / "scripts" / "data" / "corpus.jsonl").read_text().splitlines() if line.strip()]
    passages = [[corpus[(i * 7 + j * 13) % len(corpus)] for j in range(N_DOCS)] for i in range(len(questions))]
    ids, mask = pipe.contextualizer.encode(questions, passages)
    scores = np.random.default_rng(seed).normal(0.0, 2.0, (len(questions), N_DOCS)).astype(np.float32)
    return ids.astype(np.int64), mask.astype(np.int64), scores


class _Sync:
    """Wall time of a callable, the device synchronized before the clock is read."""

    def __init__(self, device: str):
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self, fn, *args, **kwargs):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        return out, time.perf_counter() - t0


class _TimedEncoder:
    """Time spent in the reference's generator encoder (synchronized), added up."""

    def __init__(self, model, clock: _Sync):
        self.total = 0.0
        encoder = model.generator.get_encoder()
        forward = encoder.forward

        def timed(*args, **kwargs):
            out, dt = clock(forward, *args, **kwargs)
            self.total += dt
            return out

        encoder.forward = timed


def measure(ckpt: Path, exports: dict[str, Path], ref_dtypes: list[str], device: str, questions: list[str],
            batch: int, params: dict, rounds: int) -> dict:
    import torch
    from transformers import RagTokenForGeneration

    from rag_runtime import RagPipeline, StageTimer

    clock = _Sync(device)
    sides: dict[str, tuple] = {}
    for precision, export_dir in exports.items():
        pipe = RagPipeline.load(export_dir, device=device, timer=StageTimer())
        sides[f"runtime-{precision}"] = ("runtime", pipe)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    for dtype in ref_dtypes:
        model = RagTokenForGeneration.from_pretrained(ckpt, dtype=dtypes[dtype]).to(device).eval()
        sides[f"transformers-{dtype}"] = ("reference", model, _TimedEncoder(model, clock))
    any_pipe = next(s[1] for s in sides.values() if s[0] == "runtime")
    batches = [questions[i : i + batch] for i in range(0, len(questions) - batch + 1, batch)]
    inputs = [contexts(any_pipe, qs, seed=i) for i, qs in enumerate(batches)]

    def run(name: str, ids, mask, scores):
        side = sides[name]
        if side[0] == "runtime":
            return clock(side[1].generate_from_context, ids, mask, scores, **params)
        model = side[1]
        t = {k: torch.as_tensor(v, device=device) for k, v in (("ids", ids), ("mask", mask), ("scores", scores))}
        t["scores"] = t["scores"].to(model.dtype)
        with torch.no_grad():
            out, dt = clock(model.generate, context_input_ids=t["ids"], context_attention_mask=t["mask"],
                            doc_scores=t["scores"], **params)
        return out.cpu().numpy(), dt

    _log(f"batch {batch}: warm-up")
    for name in sides:
        run(name, *inputs[0])
    for side in sides.values():
        if side[0] == "runtime":
            side[1].timer.reset()
        else:
            side[2].total = 0.0
    latency = {name: [] for name in sides}
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for i, args in enumerate(inputs):
            order = names[(i + r) % len(names):] + names[: (i + r) % len(names)]
            for name in order:
                rows, dt = run(name, *args)
                latency[name].append(dt)
                if r == 0:
                    outputs[name].append(rows)
    calls = len(inputs) * rounds
    steps = params["max_length"] - 1
    report = {"batch": batch, "calls": calls, "sides": {}}
    for name, side in sides.items():
        values = latency[name]
        if side[0] == "runtime":
            totals = side[1].timer.totals
            stages = {"generator_encode": totals.get("generator_encode", 0.0) / calls,
                      "decode": totals.get("decode", 0.0) / calls}
            # Host time inside the decode loop: beam bookkeeping, processors, bindings (not onnxruntime).
            in_graphs = totals.get("onnxruntime/generator_decoder", 0.0) + totals.get("onnxruntime/rag_token_head", 0.0)
            host_step_ms = (totals.get("decode", 0.0) - in_graphs) / calls * 1e3 / steps
        else:
            encode = side[2].total / calls
            stages = {"generator_encode": encode, "decode": statistics.fmean(values) - encode}
            host_step_ms = None
        report["sides"][name] = {
            "p50_ms": _pct(values, 50) * 1e3, "p90_ms": _pct(values, 90) * 1e3, "p99_ms": _pct(values, 99) * 1e3,
            "mean_ms": statistics.fmean(values) * 1e3,
            "stages_ms": {k: v * 1e3 for k, v in stages.items()},
            "decode_step_ms": stages["decode"] * 1e3 / steps,
            "host_ms_per_step": host_step_ms,
        }
    agreement = {}
    for a in (n for n in sides if sides[n][0] == "runtime"):
        for b in (n for n in sides if sides[n][0] == "reference"):
            same = total = 0
            for got, want in zip(outputs[a], outputs[b], strict=True):
                for g, w in zip(got, want, strict=True):
                    total += 1
                    same += g.tolist() == w[: len(g)].tolist() and not w[len(g):].any()
            agreement[f"{a} vs {b}"] = {"identical": same, "compared": total}
    report["agreement"] = agreement
    for name in sides:
        if name.startswith("runtime"):
            for ref in (n for n in sides if n.startswith("transformers")):
                report["sides"][name][f"speedup_p50_vs_{ref}"] = (report["sides"][ref]["p50_ms"]
                                                                  / report["sides"][name]["p50_ms"])
    return report


def device_info(device: str) -> dict:
    import onnxruntime
    import torch
    import transformers

    info = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "onnxruntime_providers": onnxruntime.get_available_providers(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (nvidia-smi unavailable)"
    return info


def markdown(report: dict) -> str:
    lines = [f"# {report['name']}", "", f"Command: `{report['command']}`", "",
             f"Device: {report['device']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             f"Workload: {report['workload']}", ""]
    for run in report["runs"]:
        lines += [f"## batch {run['batch']} ({run['calls']} calls per side)", "",
                  "| side | p50 ms | p90 ms | p99 ms | encoder ms | decode ms | decode step ms | host ms/step "
                  "| speedup p50 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, s in run["sides"].items():
            speed = ", ".join(f"{v:.2f}x vs {k.removeprefix('speedup_p50_vs_')}" for k, v in s.items()
                              if k.startswith("speedup"))
            lines.append(f"| {name} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | "
                         f"{s['stages_ms']['generator_encode']:.1f} | {s['stages_ms']['decode']:.1f} | "
                         f"{s['decode_step_ms']:.2f} | "
                         f"{'' if s['host_ms_per_step'] is None else format(s['host_ms_per_step'], '.2f')} | {speed} |")
        lines += ["", "| agreement | identical answers |", "| --- | --- |"]
        lines += [f"| {k} | {v['identical']}/{v['compared']} |" for k, v in run["agreement"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", nargs="+", choices=["fp32", "fp16"], default=["fp32", "fp16"],
                   help="runtime export precisions")
    p.add_argument("--reference-dtype", nargs="+", choices=["fp32", "fp16"], default=["fp32", "fp16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--questions", type=int, default=16, help="questions per batch size")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--name", default=None, help="results file stem")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--require-identical", action="store_true",
                   help="exit 1 unless runtime fp32 answers equal transformers fp32 answers")
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cuda":
        from rag_runtime.onnx_backend import providers_for

        providers_for("cuda")  # a clear message when onnxruntime has no CUDA provider

    n = WORKLOADS[args.workload]["answer_tokens"] + 1
    params = dict(n_docs=N_DOCS, num_beams=4, num_return_sequences=1, max_length=n, min_length=n,
                  no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=True)
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()]
    ckpt, exports = prepare(args.workload, args.precision)
    runs = []
    for batch in args.batch:
        qs = (questions * ((args.questions * batch) // len(questions) + 1))[: max(args.questions, batch)]
        runs.append(measure(ckpt, exports, args.reference_dtype, args.device, qs, batch, params, args.rounds))
        for name, s in runs[-1]["sides"].items():
            _log(f"batch {batch} {name}: p50 {s['p50_ms']:.1f} ms, decode step {s['decode_step_ms']:.2f} ms")
        for k, v in runs[-1]["agreement"].items():
            _log(f"batch {batch} {k}: {v['identical']}/{v['compared']} identical")
    info = device_info(args.device)
    name = args.name or f"device-{args.workload}-{args.device}"
    report = {
        "name": name,
        "command": "python -m benchmarks.device " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": (f"{info['gpu']} (driver {info['driver']}, CUDA {info['cuda']})" if "gpu" in info
                   else f"CPU ({info['machine']})"),
        "versions": info,
        "workload": f"{args.workload} dims, rag-token bart, {N_DOCS} passages per question, params {params}",
        "runs": runs,
    }
    write_results(args.out / name, report, markdown(report))
    print(markdown(report))
    fp32 = [v for r in runs for k, v in r["agreement"].items() if k == "runtime-fp32 vs transformers-fp32"]
    if args.require_identical and any(v["identical"] != v["compared"] for v in fp32):
        _log("runtime fp32 answers differ from transformers fp32")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
