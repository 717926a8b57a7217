"""Answer the demo questions from an export, with sources, parity against transformers and timings."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

# Each question with the corpus article that answers it.
QUESTIONS = Path(__file__).resolve().parent / "data" / "question_sources.tsv"
PARAMS = dict(num_beams=4, max_length=64, min_length=1, num_return_sequences=1, no_repeat_ngram_size=0)
SHOWN = 8


def _normalized(text: str) -> str:
    return " ".join(text.split())


def main(checkpoint: str, export_dir: str) -> int:
    from rag_runtime import RagPipeline, StageTimer
    from rag_testing.reference import Reference

    pairs = [line.split("\t") for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    questions = [q for q, _ in pairs][:SHOWN]
    pipe = RagPipeline.load(export_dir, timer=StageTimer())
    print(f"\nLoaded {export_dir}: rag-{pipe.kind}, {pipe.index.count} passages. Retrieval: bag-of-words DPR "
          "encoders over the corpus's rare word pieces; generator: trained to answer with the opening sentence of "
          "the passages it reads (scripts/train_demo.py).\n")
    pipe.generate(questions[:1], **PARAMS)  # warm-up
    t0 = time.perf_counter()
    results = pipe.generate(questions, **PARAMS)
    t_runtime = time.perf_counter() - t0
    right = read_off = 0
    for r, (_, source) in zip(results, pairs, strict=False):
        top = r.docs[0]
        right += top.title == source
        answer = r.answers[0].text
        read_off += bool(answer.strip()) and _normalized(answer) in _normalized(f"{top.title.strip(chr(34))} / {top.text}")
        print(f"Q: {r.question}")
        print(f"   answer {answer!r}  score {r.answers[0].score:.3f}")
        for d in r.docs[:3]:
            print(f"   source [{d.id}] {d.title}  ({d.score:.2f}){'   <- the article that answers it' if d.title == source else ''}")
    print(f"\nRetrieval: the answering article comes first for {right}/{len(questions)} questions; the answer is "
          f"read off the first passage for {read_off}/{len(questions)}.")
    print("\nParity against transformers' RagTokenForGeneration.generate (same explicit parameters):")
    ref = Reference(checkpoint)
    ref.generate_ids(questions[:1], **PARAMS)  # warm-up
    t0 = time.perf_counter()
    expected = ref.generate(questions, **PARAMS)
    t_ref = time.perf_counter() - t0
    same = 0
    for r, e in zip(results, expected, strict=True):
        got = [a.token_ids for a in r.answers]
        want = [pipe.generator.trim(row) for row in e.sequences]
        same += got == want and [d.id for d in r.docs] == e.doc_ids.tolist()
        assert np.allclose([a.score for a in r.answers], e.scores, rtol=1e-4)
    print(f"   token-identical answers and the same passages: {same}/{len(questions)} questions")
    print(f"   time for {len(questions)} questions: runtime {t_runtime:.3f}s, transformers {t_ref:.3f}s "
          f"({t_ref / t_runtime:.1f}x)")
    stages = ", ".join(f"{k} {v * 1000:.0f}ms" for k, v in pipe.timer.totals.items())
    print(f"   runtime stages (incl. warm-up): {stages}")
    return 0 if same == len(questions) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
