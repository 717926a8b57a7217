"""Answer the demo questions from an export, with sources, parity against transformers and timings."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

QUESTIONS = Path(__file__).resolve().parent / "data" / "questions.txt"
PARAMS = dict(num_beams=4, max_length=20, num_return_sequences=2)


def main(checkpoint: str, export_dir: str) -> int:
    from benchmarks.reference import Reference
    from rag_runtime import RagPipeline, StageTimer

    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()][:6]
    pipe = RagPipeline.load(export_dir, timer=StageTimer())
    print(f"\nLoaded {export_dir}: rag-{pipe.kind}, {pipe.index.count} passages. "
          "Weights are random, so answers are noise; sources and parity are real.\n")
    pipe.generate(questions[:1], **PARAMS)  # warm-up
    t0 = time.perf_counter()
    results = pipe.generate(questions, **PARAMS)
    t_runtime = time.perf_counter() - t0
    for r in results:
        print(f"Q: {r.question}")
        for a in r.answers:
            print(f"   answer {a.text!r}  score {a.score:.3f}")
        for d in r.docs[:3]:
            print(f"   source [{d.id}] {d.title}  ({d.score:.2f})")
    print("\nParity against transformers' RagTokenForGeneration.generate (same explicit parameters):")
    ref = Reference(checkpoint)
    ref.generate_ids(questions[:1], **PARAMS)  # warm-up
    t0 = time.perf_counter()
    expected = ref.generate(questions, **PARAMS)
    t_ref = time.perf_counter() - t0
    same = 0
    for r, e in zip(results, expected, strict=True):
        got = [a.token_ids for a in r.answers]
        want = [[t for t in row.tolist() if t != pipe.manifest.generation_defaults.pad_token_id] for row in e.sequences]
        same += got == want
        assert np.allclose([a.score for a in r.answers], e.scores, rtol=1e-4)
    print(f"   token-identical answers: {same}/{len(questions)} questions")
    print(f"   time for {len(questions)} questions: runtime {t_runtime:.3f}s, transformers {t_ref:.3f}s "
          f"({t_ref / t_runtime:.1f}x)")
    stages = ", ".join(f"{k} {v * 1000:.0f}ms" for k, v in pipe.timer.totals.items())
    print(f"   runtime stages (incl. warm-up): {stages}")
    return 0 if same == len(questions) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
