"""Why the decoder's MatMuls take longer inside the exported graph than alone.

    python -m benchmarks.investigations.decoder_matmuls --workload base --questions 2

The floor benchmark rates every GEMM shape with a single-op graph run over and over, so its one weight
stays in the CPU caches. Inside the decoder each layer's weights are read once per step, after every other
layer's (about 350 MB at base size with the LM head) went through the caches since. This profiles the
exported decoder (onnxruntime's per-node profile) on the floor benchmark's supplied contexts (5 passages x
4 beams, fixed answer length), groups its MatMul/Gemm kernels by shape, and times each shape alone two ways:

- *warm*: one weight, run repeatedly (what the floor's GEMM rates measure);
- *cold*: each run after writing 256 MB of other memory, so its weight comes from DRAM (as in the graph).

and reports the call's time outside the kernels (between nodes). Writes
``benchmarks/results/decoder-matmuls-<workload>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.floor import _inputs, _workload, single_op
from benchmarks.run import RESULTS, _log, host, write_results

COLD_BYTES = 256 * 2**20  # written between cold runs: well past any L3 on these machines


def alone(m: int, k: int, n: int, threads: int, cold: bool, runs: int = 40) -> float:
    """Median ms of MatMul [m, k] x [k, n] alone; ``cold``: every run after writing ``COLD_BYTES`` of other
    memory, so that its weight comes from DRAM as in the graph (one session: one thread pool)."""
    sess, io = single_op("MatMul", (m, k), np.random.default_rng(0).standard_normal((k, n), dtype=np.float32),
                         threads)
    scratch = np.zeros(COLD_BYTES // 8) if cold else None
    for _ in range(3):
        sess.run_with_iobinding(io)
    times = []
    for _ in range(runs):
        if scratch is not None:
            scratch += 1.0
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def profile(export_dir: Path, inputs: list[tuple], params: dict, threads: int) -> dict:
    """Per MatMul shape of the decoder: kernel calls and median µs; the calls' wall and kernel totals."""
    from rag_runtime import RagPipeline

    with tempfile.TemporaryDirectory(prefix="decoder-matmuls-") as tmp:
        pipe = RagPipeline.load(export_dir, threads=threads, profile=tmp)
        for args in inputs:
            pipe.generate_from_context(*args, **params)
        events = json.loads(pipe.end_profiling()["generator_decoder"].read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    shapes = defaultdict(list)
    by_op = defaultdict(float)
    for e in kernels:
        op = e["args"].get("op_name")
        by_op[op] += e["dur"]
        # The profile lists only inputs that are not initializers: a MatMul with one listed input has a
        # constant weight, whose shape its input and output give; two listed inputs are attention's.
        ins = [next(iter(s.values())) for s in e["args"].get("input_type_shape", [])]
        outs = [next(iter(s.values())) for s in e["args"].get("output_type_shape", [])]
        if op in ("MatMul", "Gemm", "FusedMatMul") and len(ins) == 1 and outs:
            shapes[(int(np.prod(ins[0][:-1])), ins[0][-1], outs[0][-1])].append(e["dur"])
    calls = len(runs)
    return {"calls": calls, "call_ms": statistics.median(runs) / 1e3,
            "kernel_ms_per_call": sum(e["dur"] for e in kernels) / 1e3 / calls,
            "ms_per_call_by_op": {op: us / 1e3 / calls for op, us in sorted(by_op.items(), key=lambda x: -x[1])},
            "shapes": {s: {"per_call": len(d) / calls, "median_ms": statistics.median(d) / 1e3}
                       for s, d in shapes.items()}}


def markdown(report: dict) -> str:
    h, p = report["host"], report["profile"]
    lines = [f"# Decoder MatMuls in the graph and alone ({report['workload']})", "",
             f"`{report['command']}`", "",
             f"{h['cpus']} CPUs, {h['vector_isa']} ({h['cpu']}), 1-minute load {h['load_avg_1m']:.2f} at the start; "
             f"threads {report['threads']}; {p['calls']} profiled decoder calls.", "",
             "| MatMul [m, k] x [k, n] | per call | in graph ms | alone, warm ms | alone, cold ms | graph / warm | "
             "graph / cold |", "|---|---|---|---|---|---|---|"]
    graph_sum = warm_sum = cold_sum = 0.0
    for row in report["shapes"]:
        g, w, c, n = row["graph_ms"], row["warm_ms"], row["cold_ms"], row["per_call"]
        graph_sum, warm_sum, cold_sum = graph_sum + n * g, warm_sum + n * w, cold_sum + n * c
        lines.append(f"| [{row['m']}, {row['k']}] x [{row['k']}, {row['n']}] | {n:.0f} | {g:.3f} | {w:.3f} | "
                     f"{c:.3f} | {g / w:.2f}x | {g / c:.2f}x |")
    lines.append(f"| all of them, per call | | {graph_sum:.2f} | {warm_sum:.2f} | {cold_sum:.2f} | "
                 f"{graph_sum / warm_sum:.2f}x | {graph_sum / cold_sum:.2f}x |")
    other = ", ".join(f"{op} {ms:.2f}" for op, ms in list(p["ms_per_call_by_op"].items())[:8])
    lines += ["", f"Decoder call (profiled): median {p['call_ms']:.2f} ms, of which kernels {p['kernel_ms_per_call']:.2f} ms "
              f"({p['call_ms'] - p['kernel_ms_per_call']:.2f} ms between and around nodes; profiling adds to it). "
              f"Kernel ms per call by op: {other}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="base")
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default=None, help="results file stem (default decoder-matmuls-<workload>)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    export_dir, dims, params = _workload(args.workload, "token")
    inputs = _inputs(export_dir, args.workload, args.questions, args.threads)
    machine = host()
    _log("profiling the decoder")
    prof = profile(export_dir, inputs, params, args.threads)
    rows = []
    for (m, k, n), s in sorted(prof["shapes"].items(), key=lambda x: -x[1]["median_ms"] * x[1]["per_call"]):
        _log(f"timing [{m}, {k}] x [{k}, {n}] alone")
        rows.append({"m": m, "k": k, "n": n, "per_call": s["per_call"], "graph_ms": s["median_ms"],
                     "warm_ms": alone(m, k, n, args.threads, cold=False),
                     "cold_ms": alone(m, k, n, args.threads, cold=True)})
    prof["shapes"] = {f"{m}x{k}x{n}": v for (m, k, n), v in prof["shapes"].items()}
    report = {"workload": args.workload, "threads": args.threads, "host": machine, "profile": prof, "shapes": rows,
              "command": "python -m benchmarks.investigations.decoder_matmuls " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    write_results(args.out / (args.name or f"decoder-matmuls-{args.workload}"), report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
