"""Runtime variants against each other, in one process, interleaved: the fused RAG-Token head against
the host path, and optimized (onnxruntime fusions) graphs against plain ones; for RAG-Sequence, rescoring
through the exported scorer against rescoring on the host.

    python -m benchmarks.variants --workload base --questions 8
    python -m benchmarks.variants --workload base --kind sequence --questions 4

Each variant answers the same questions with the same parameters as ``benchmarks.run`` (4 beams, 5
passages, fixed answer length); answers must agree across variants. Writes
``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks.run import QUESTIONS, RESULTS, WORKLOADS, _log, _pct, is_current, prepare

# name: (export directory, RagPipeline.load options)
VARIANTS = {
    "token": {
        "fused head": ("export", {}),
        "host path": ("export", {"fused_head": False}),
        "fused head, optimized graphs": ("export-optimized", {}),
    },
    "sequence": {
        "scorer graph": ("export", {}),
        "host rescoring": ("export", {"sequence_scorer": False}),  # as an export made before the scorer graph
    },
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--kind", choices=sorted(VARIANTS), default="token")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--name", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from rag_export import export
    from rag_runtime import RagPipeline, StageTimer

    ckpt, plain = prepare(args.workload, args.kind, "bart")
    dirs = {"export": plain}
    if args.kind == "token":
        dirs["export-optimized"] = plain.with_name("export-optimized")
        if not is_current(dirs["export-optimized"]):
            export(str(ckpt), dirs["export-optimized"], force=True, optimize=True)
    pipes = {}
    for name, (d, kw) in VARIANTS[args.kind].items():
        pipes[name] = RagPipeline.load(dirs[d], timer=StageTimer(), **kw)
    n = WORKLOADS[args.workload]["answer_tokens"] + 1
    params = dict(n_docs=5, num_beams=4, num_return_sequences=1, max_length=n, min_length=n,
                  no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=True)
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()][: args.questions]
    for pipe in pipes.values():
        pipe.generate(questions[:1], **params)
        pipe.timer.reset()
    lat = {name: [] for name in pipes}
    answers = {name: [] for name in pipes}
    names = list(pipes)
    for r in range(args.rounds):
        for i, q in enumerate(questions):
            k = (i + r) % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                out = pipes[name].generate([q], **params)
                lat[name].append(time.perf_counter() - t0)
                if r == 0:
                    answers[name].append(out[0].answers[0].token_ids)
    calls = len(questions) * args.rounds
    base = names[0]
    report = {
        "name": args.name or f"variants-{args.workload}" + ("" if args.kind == "token" else f"-{args.kind}"),
        "command": "python -m benchmarks.variants " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "params": params,
        "variants": {
            name: {"p50_ms": _pct(lat[name], 50) * 1e3, "p90_ms": _pct(lat[name], 90) * 1e3,
                   "mean_ms": statistics.fmean(lat[name]) * 1e3,
                   "stages_ms": {k: v * 1e3 / calls for k, v in pipes[name].timer.totals.items()},
                   "same_answers_as_" + base.replace(" ", "_"): sum(
                       a == b for a, b in zip(answers[name], answers[base], strict=True)),
                   "questions": len(questions)}
            for name in names
        },
    }
    lines = [f"# {report['name']}", "", f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; workload {args.workload}, batch 1, params {params}", "",
             "| variant | p50 ms | p90 ms | generator_encode ms | decode ms | of which rescore ms | onnxruntime ms "
             "| same answers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, v in report["variants"].items():
        st = v["stages_ms"]
        same = v["same_answers_as_" + base.replace(" ", "_")]
        lines.append(f"| {name} | {v['p50_ms']:.0f} | {v['p90_ms']:.0f} | {st.get('generator_encode', 0):.0f} | "
                     f"{st.get('decode', 0):.0f} | {st.get('rescore', 0):.0f} | {st.get('onnxruntime', 0):.0f} | "
                     f"{same}/{v['questions']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / report["name"]
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _log(f"wrote {stem}.md")
    return 0 if all(v["same_answers_as_" + base.replace(" ", "_")] == v["questions"]
                    for v in report["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
