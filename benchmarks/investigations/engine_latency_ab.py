"""Single-question latency of ``RagPipeline.generate`` on the decode engine (format 4) against the closed
decode loop it replaced (format 3, commit a1019e1), on the same checkpoint.

    git worktree add /tmp/rag-a1019e1 a1019e1
    python -m benchmarks.investigations.engine_latency_ab --old-repo /tmp/rag-a1019e1 --workload base --rounds 6

Two runtimes cannot share a process, so each round runs one process per side, the sides alternating, each
loading its own export of the same checkpoint (the old side's is made by the old exporter), warming up and
timing ``generate`` of one question at a time (fixed answer length, ``benchmarks.run``'s parameters).
Reports each side's p50 per round, the paired ratio per round and its median. Writes
``benchmarks/results/engine-latency-<workload>-<kind>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.run import QUESTIONS, RESULTS, WORKLOADS, host, prepare, write_results

ROOT = Path(__file__).resolve().parents[2]

# Run by each side's interpreter with that side's code first on the path: only APIs both sides have.
_SIDE = textwrap.dedent("""
    import json, statistics, sys, time
    from pathlib import Path
    ckpt, export_dir, questions, rounds, params = sys.argv[1:6]
    if not (Path(export_dir) / "manifest.json").exists():
        from rag_export import export
        export(ckpt, Path(export_dir), force=True)
    import rag_runtime
    from rag_runtime import RagPipeline, StageTimer
    timer = StageTimer()
    pipe = RagPipeline.load(export_dir, timer=timer)
    qs, params = json.loads(questions), json.loads(params)
    for q in qs[:2]:
        pipe.generate([q], **params)
    timer.reset()
    lat, answers = [], []
    for _ in range(int(rounds)):
        for q in qs:
            t0 = time.perf_counter()
            r = pipe.generate([q], **params)[0]
            lat.append(time.perf_counter() - t0)
            answers.append(r.answers[0].token_ids)
    print(json.dumps({"p50_ms": statistics.median(lat) * 1e3, "mean_ms": statistics.fmean(lat) * 1e3,
                      "runtime": rag_runtime.__file__, "answers": answers,
                      "stages_ms": {k: v * 1e3 / len(lat) for k, v in timer.totals.items() if "/" not in k}}))
""")


def _side(repo: Path, ckpt: Path, export_dir: Path, questions: list[str], repeats: int, params: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'runtime'}"}
    out = subprocess.run([sys.executable, "-c", _SIDE, str(ckpt), str(export_dir), json.dumps(questions),
                          str(repeats), json.dumps(params)], env=env, cwd="/", capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"side {repo} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    h = report["host"]
    lines = [f"# Single-question latency: decode engine against the closed loop ({report['workload']}, "
             f"RAG-{report['kind'].capitalize()})", "", f"`{report['command']}`", "",
             f"{h['cpus']} CPUs, {h['vector_isa']} ({h['cpu']}), 1-minute load {h['load_avg_1m']:.2f} at the start; "
             f"{report['questions']} questions x {report['repeats']} per process, parameters "
             f"`{json.dumps(report['params'])}`; answers identical on both sides: {report['identical']}.", "",
             "| round | closed loop (format 3) p50 ms | engine (format 4) p50 ms | engine / closed loop |",
             "|---|---|---|---|"]
    for i, r in enumerate(report["rounds"], 1):
        lines.append(f"| {i} | {r['old']['p50_ms']:.1f} | {r['new']['p50_ms']:.1f} | {r['ratio']:.3f} |")
    lines += ["", f"Median of the paired ratios: **{report['median_ratio']:.3f}** (below 1: the engine is faster).",
              "", "Stages per question (ms, last round): "
              + ", ".join(f"{k} {report['rounds'][-1]['old']['stages_ms'].get(k, 0):.1f} / "
                          f"{report['rounds'][-1]['new']['stages_ms'].get(k, 0):.1f}"
                          for k in ("generator_encode", "decode", "rescore") if k in report["rounds"][-1]["new"]["stages_ms"])
              + " (closed loop / engine; the closed loop timed rescoring inside decode)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--old-repo", type=Path, required=True, help="a checkout of commit a1019e1 (format 3)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--kind", choices=["token", "sequence"], default="token")
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1, help="passes over the questions per process")
    p.add_argument("--rounds", type=int, default=4, help="process pairs, sides alternating")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    ckpt, new_export = prepare(args.workload, args.kind, "bart")
    old_export = new_export.with_name("export-format3")
    n = WORKLOADS[args.workload]["answer_tokens"] + 1
    params = dict(n_docs=5, num_beams=4, num_return_sequences=1, max_length=n, min_length=n,
                  no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=True)
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()][: args.questions]
    report = {"workload": args.workload, "kind": args.kind, "questions": len(questions), "repeats": args.repeats,
              "params": params, "host": host(), "rounds": [],
              "command": "python -m benchmarks.investigations.engine_latency_ab "
                         + " ".join(argv if argv is not None else sys.argv[1:])}
    for i in range(args.rounds):
        order = [("old", args.old_repo, old_export), ("new", ROOT, new_export)]
        if i % 2:
            order.reverse()
        r = {name: _side(repo, ckpt, export, questions, args.repeats, params) for name, repo, export in order}
        r["ratio"] = r["new"]["p50_ms"] / r["old"]["p50_ms"]
        report["rounds"].append(r)
        print(f"round {i + 1}: old {r['old']['p50_ms']:.1f} ms, new {r['new']['p50_ms']:.1f} ms, "
              f"ratio {r['ratio']:.3f}", file=sys.stderr, flush=True)
    report["identical"] = all(r["old"]["answers"] == r["new"]["answers"] for r in report["rounds"])
    report["median_ratio"] = statistics.median(r["ratio"] for r in report["rounds"])
    stem = write_results(args.out / f"engine-latency-{args.workload}-{args.kind}", report, markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json/.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
