"""Latency of rag_runtime against transformers' RAG generate, in one process, interleaved, after warm-up.

    python -m benchmarks.run --workload base --batch 1 8          # the issue's `base` workload
    python -m benchmarks.run --workload tiny --questions 3        # CI smoke size

Both sides get the same questions and the same explicit generation parameters, with a fixed answer length
(min_length = max_length) so they do the same work. Writes ``benchmarks/results/<name>.json`` and ``.md``
(and a ``.png`` stage chart with --plot). Peak RSS of each side is measured in its own subprocess.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "bench"
QUESTIONS = ROOT / "scripts" / "data" / "questions.txt"

WORKLOADS = {
    # size, passages (joined to ~100 words when the corpus has fewer), answer tokens
    "tiny": dict(size="tiny", passages=0, answer_tokens=10),
    "base": dict(size="base", passages=600, answer_tokens=20),
    "large": dict(size="large", passages=600, answer_tokens=20),
}
REF_STAGES = ("question_encode", "retrieve", "generator_encode", "decode")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def vector_isa() -> str:
    """The widest x86 vector extension this CPU reports (every ratio moves with it: record it)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return platform.machine()


def host() -> dict:
    """The machine a result was measured on."""
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "vector_isa": vector_isa(),
            "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists()
            else platform.processor(), "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0]}


def machine_line() -> str:
    """The machine in one line for a results file: architecture, cores, vector ISA (which moves every ratio)
    and CPU model."""
    h = host()
    return f"{h['machine']}, {h['cpus']} cores, {h['vector_isa']} ({h['cpu']})"


def write_results(stem: Path, report: dict, text: str) -> Path:
    """``stem``.json (the report) and ``stem``.md (its markdown), the folder made if needed; returns ``stem``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(text)
    return stem


def build_checkpoint(path: Path, workload: str, kind: str, generator: str, index_type: str | None = "Flat") -> Path:
    """Build (once) a random-weight checkpoint of the workload's size (``index_type=None``: no knowledge base)."""
    if not (path / "config.json").exists():
        _log(f"building {workload} checkpoint (random weights) in {path}")
        from rag_testing.factory import make_checkpoint

        spec = WORKLOADS[workload]
        make_checkpoint(path, kind, generator, size=spec["size"], n_passages=spec["passages"], index_type=index_type)
    return path


def is_current(export_dir: Path) -> bool:
    """An export this runtime reads (older formats are rebuilt)."""
    from rag_runtime import ArtifactError, Manifest

    try:
        Manifest.load(export_dir, verify=False)
    except ArtifactError:
        return False
    return True


def prepare(workload: str, kind: str, generator: str, quantize: str | None = None) -> tuple[Path, Path]:
    """Build (once) the checkpoint and its export under .cache/bench/."""
    ckpt = CACHE / f"{workload}-{kind}-{generator}" / "checkpoint"
    export_dir = CACHE / f"{workload}-{kind}-{generator}" / ("export" + (f"-{quantize}" if quantize else ""))
    build_checkpoint(ckpt, workload, kind, generator)
    if not is_current(export_dir):
        from rag_export import export

        t0 = time.perf_counter()
        kwargs = {"quantize": quantize} if quantize else {}
        export(str(ckpt), export_dir, force=True, **kwargs)
        _log(f"export took {time.perf_counter() - t0:.1f}s")
    return ckpt, export_dir


class _RefTimer:
    """Per-stage wall time of the transformers reference, by wrapping its modules."""

    def __init__(self, ref):
        self.totals = dict.fromkeys(REF_STAGES, 0.0)
        model = ref.model
        self._wrap(model.question_encoder, "forward", "question_encode")
        self._wrap(ref.retriever, "__call__", "retrieve", instance_attr=False)
        self._wrap(model.generator.get_encoder(), "forward", "generator_encode")

    def _wrap(self, obj, method: str, stage: str, instance_attr: bool = True) -> None:
        original = getattr(obj, method)
        totals = self.totals

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[stage] += time.perf_counter() - t0

        if instance_attr:
            setattr(obj, method, timed)
        else:  # __call__ is looked up on the type
            cls = type(obj)
            obj.__class__ = type(cls.__name__, (cls,), {"__call__": lambda self, *a, **k: timed(*a, **k)})

    def reset(self) -> None:
        for k in self.totals:
            self.totals[k] = 0.0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(ckpt: Path, export_dir: Path, questions: list[str], batch: int, params: dict, threads: int | None,
            rounds: int) -> dict:
    import torch

    from rag_runtime import RagPipeline, StageTimer
    from rag_testing.reference import Reference

    torch.set_num_threads(threads or os.cpu_count())
    batches = [questions[i : i + batch] for i in range(0, len(questions) - batch + 1, batch)]
    _log(f"warm-up ({len(batches)} batches of {batch}, {rounds} round(s))")
    t0 = time.perf_counter()  # export directory to first answer: how fast a new replica can serve
    pipe = RagPipeline.load(export_dir, threads=threads, timer=StageTimer())
    load_s = time.perf_counter() - t0
    pipe.generate(batches[0], **params)
    first_answer_s = time.perf_counter() - t0
    ref = Reference(str(ckpt))
    ref_timer = _RefTimer(ref)
    ref.generate_ids(batches[0], **params)

    lat = {"runtime": [], "reference": []}
    identical, total = 0, 0
    pipe.timer.reset()
    ref_timer.reset()
    for r in range(rounds):
        for i, qs in enumerate(batches):
            order = ("runtime", "reference") if (i + r) % 2 == 0 else ("reference", "runtime")
            for side in order:
                t0 = time.perf_counter()
                if side == "runtime":
                    got = pipe.generate(qs, **params)
                else:
                    want = ref.generate_ids(qs, **params).numpy()
                lat[side].append((time.perf_counter() - t0) / len(qs))
            per_q = want.shape[0] // len(qs)
            for j, res in enumerate(got):
                rows = want[j * per_q : (j + 1) * per_q]
                total += 1
                identical += [a.token_ids for a in res.answers] == [pipe.generator.trim(row) for row in rows]
    n_batches = len(batches) * rounds
    stages = {k: v / n_batches for k, v in pipe.timer.totals.items()}
    runtime_total = statistics.fmean(lat["runtime"]) * batch
    stages["outside_onnxruntime"] = runtime_total - stages.get("onnxruntime", 0.0)
    ref_stages = {k: v / n_batches for k, v in ref_timer.totals.items()}
    ref_stages["decode"] = statistics.fmean(lat["reference"]) * batch - sum(ref_stages.values())
    summary = {}
    for side, values in lat.items():
        summary[side] = {
            "p50_ms": _pct(values, 50) * 1000, "p90_ms": _pct(values, 90) * 1000, "p99_ms": _pct(values, 99) * 1000,
            "mean_ms": statistics.fmean(values) * 1000, "questions_per_s": 1.0 / statistics.fmean(values),
        }
    return {
        "batch": batch, "questions": len(batches) * batch, "rounds": rounds,
        "latency_per_question": summary,
        "speedup_p50": summary["reference"]["p50_ms"] / summary["runtime"]["p50_ms"],
        "identical_answers": identical, "compared_answers": total,
        "stages_per_batch_s": {"runtime": stages, "reference": ref_stages},
        "runtime_load_s": load_s, "runtime_first_answer_s": first_answer_s,
    }


def peak_rss(side: str, ckpt: Path, export_dir: Path, questions: list[str], batch: int, params: dict) -> float:
    """Peak RSS (MiB) of a fresh process that loads one side and answers the questions."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
qs, params, batch = {questions!r}, {params!r}, {batch}
if {side!r} == "runtime":
    from rag_runtime import RagPipeline
    m = RagPipeline.load({str(export_dir)!r})
    run = lambda q: m.generate(q, **params)
else:
    from rag_testing.reference import Reference
    m = Reference({str(ckpt)!r})
    run = lambda q: m.generate_ids(q, **params)
for i in range(0, len(qs), batch):
    run(qs[i:i + batch])
# VmHWM, not ru_maxrss: the latter keeps the forking parent's high-water mark across exec.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps(int(hwm) / 1024))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return float(out.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = [f"# {report['name']}", "", f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; threads {report['threads']}; versions {report['versions']}", "",
             f"Workload: {report['workload_detail']}", "",
             "| batch | side | p50 ms/question | p90 | p99 | questions/s | speedup (p50) | identical answers |",
             "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for side in ("runtime", "reference"):
            s = run["latency_per_question"][side]
            extra = (f"{run['speedup_p50']:.2f}x", f"{run['identical_answers']}/{run['compared_answers']}") \
                if side == "runtime" else ("", "")
            lines.append(f"| {run['batch']} | {side} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | "
                         f"{s['questions_per_s']:.2f} | {extra[0]} | {extra[1]} |")
    columns = ["question_encode", "retrieve", "contextualize", "generator_encode", "decode", "onnxruntime",
               "outside_onnxruntime"]
    if any("rescore" in st for run in report["runs"] for st in run["stages_per_batch_s"].values()):
        columns.insert(5, "rescore")  # RAG-Sequence: the part of decode spent rescoring candidates
    lines += ["", "Per-stage time per batch (ms):", "", "| batch | side | " + " | ".join(columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for run in report["runs"]:
        for side, st in run["stages_per_batch_s"].items():
            cells = [f"{st[k] * 1000:.1f}" if k in st else "" for k in columns]
            lines.append(f"| {run['batch']} | {side} | " + " | ".join(cells) + " |")
    loads = [f"batch {run['batch']}: load {run['runtime_load_s']:.2f} s, first answer after "
             f"{run['runtime_first_answer_s']:.2f} s" for run in report["runs"] if "runtime_load_s" in run]
    if loads:
        lines += ["", "Runtime start-up (export directory to loaded pipeline, and to the first answer): "
                  + "; ".join(loads) + "."]
    if report.get("peak_rss_mib"):
        rss = report["peak_rss_mib"]
        lines += ["", f"Peak RSS (VmHWM): runtime {rss['runtime']:.0f} MiB, reference {rss['reference']:.0f} MiB "
                      f"(each in its own process, loading its side and answering 8 questions at the largest batch)."]
        if report.get("memory_command"):
            lines += ["", f"Memory command: `{report['memory_command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["question_encode", "retrieve", "contextualize", "generator_encode", "decode"]
    fig, axes = plt.subplots(1, len(report["runs"]), figsize=(5 * len(report["runs"]), 4), squeeze=False)
    for ax, run in zip(axes[0], report["runs"], strict=True):
        bottom = np.zeros(2)
        for stage in stages:
            vals = np.array([run["stages_per_batch_s"][s].get(stage, 0.0) * 1000 for s in ("runtime", "reference")])
            ax.bar(["rag_runtime", "transformers"], vals, bottom=bottom, label=stage)
            bottom += vals
        ax.set_title(f"batch {run['batch']}: {run['speedup_p50']:.1f}x (p50)")
        ax.set_ylabel("ms per batch")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(report["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--kind", choices=["token", "sequence"], default="token")
    p.add_argument("--generator", choices=["bart", "t5"], default="bart")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--questions", type=int, default=16, help="questions per batch size")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantize", choices=["int8"], default=None, help="benchmark a quantized export")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS of each side (subprocesses)")
    p.add_argument("--memory-only", action="store_true",
                   help="only (re)measure peak RSS and update the saved report of this --name")
    p.add_argument("--plot", action="store_true", help="write a PNG stage chart")
    p.add_argument("--name", default=None, help="results file stem")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--require-identical", action="store_true", help="exit 1 unless every answer is identical")
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    spec = WORKLOADS[args.workload]
    n = spec["answer_tokens"] + 1  # + the decoder start token
    params = dict(n_docs=5, num_beams=4, num_return_sequences=1, max_length=n, min_length=n,
                  no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=True)
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()]
    ckpt, export_dir = prepare(args.workload, args.kind, args.generator, args.quantize)
    name = args.name or f"{args.workload}-{args.kind}-{args.generator}" + (f"-{args.quantize}" if args.quantize else "")
    stem = args.out / name
    if args.memory_only:
        report = json.loads(stem.with_suffix(".json").read_text())
        qs = questions[: max(8, max(args.batch))]
        report["peak_rss_mib"] = {side: peak_rss(side, ckpt, export_dir, qs, max(args.batch), params)
                                  for side in ("runtime", "reference")}
        report["memory_command"] = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(stem, report, markdown(report))
        print(markdown(report))
        return 0
    runs = []
    for batch in args.batch:
        qs = (questions * ((args.questions * batch) // len(questions) + 1))[: max(args.questions, batch)]
        _log(f"batch {batch}: {len(qs)} questions")
        runs.append(measure(ckpt, export_dir, qs, batch, params, args.threads, args.rounds))
        r = runs[-1]
        _log(f"batch {batch}: runtime p50 {r['latency_per_question']['runtime']['p50_ms']:.1f} ms, reference "
             f"{r['latency_per_question']['reference']['p50_ms']:.1f} ms -> {r['speedup_p50']:.2f}x; identical "
             f"{r['identical_answers']}/{r['compared_answers']}")
    import onnxruntime
    import torch
    import transformers

    from rag_runtime import Manifest

    manifest = Manifest.load(export_dir, verify=False)
    report = {
        "name": name,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "threads": args.threads or os.cpu_count(),
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "workload_detail": f"{args.workload} ({spec['size']} dims, {manifest.index.count} passages), "
                           f"rag-{args.kind} {args.generator}, precision {manifest.precision}, params {params}",
        "params": params,
        "runs": runs,
    }
    if args.memory:
        qs = questions[: max(8, max(args.batch))]
        report["peak_rss_mib"] = {side: peak_rss(side, ckpt, export_dir, qs, max(args.batch), params)
                                  for side in ("runtime", "reference")}
        _log(f"peak RSS (MiB): {report['peak_rss_mib']}")
    write_results(stem, report, markdown(report))
    if args.plot:
        plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    ok = all(r["identical_answers"] == r["compared_answers"] for r in runs)
    if args.require_identical and not ok:
        _log("answers differ from the reference")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
