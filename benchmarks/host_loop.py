"""Host cost of one beam-search step without any model: the runtime's beam bookkeeping and its processor
bans, on synthetic candidates (what is left on the CPU per step once the fused head runs on the device).

    python -m benchmarks.host_loop
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from rag_runtime.decoding import processors as P
from rag_runtime.decoding.search import BeamSearch, SearchSettings

VOCAB = 50265


def bookkeeping_ms(batch: int, beams: int, steps: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    pool = [(np.sort(rng.standard_normal((batch, 2 * beams)).astype(np.float32))[:, ::-1] - 5,
             rng.integers(0, beams * VOCAB, (batch, 2 * beams))) for _ in range(64)]
    calls = 0
    search = SearchSettings(beams, 1, 1.0, True, 1, (2,))
    start = np.zeros((batch * beams, 1), np.int64)
    t0 = time.perf_counter()
    for _ in range(repeats):
        state = BeamSearch(search, steps + 1, start)
        while not state.done:
            scores, ids = pool[calls % len(pool)]
            calls += 1
            state.advance(scores + state.running_scores.max(axis=1, keepdims=True), ids // VOCAB, ids % VOCAB)
    return (time.perf_counter() - t0) / calls * 1e3


def bans_ms(batch: int, beams: int, length: int, repeats: int) -> float:
    ids = np.random.default_rng(1).integers(0, 200, (batch * beams, length))
    settings = P.ProcessorSettings(max_length=length + 10, min_length=length + 5, no_repeat_ngram_size=3,
                                   eos_token_ids=(2,))
    t0 = time.perf_counter()
    for _ in range(repeats):
        P.bans(settings, ids)
    return (time.perf_counter() - t0) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    print("| batch | beam bookkeeping ms/step | bans ms/step (no_repeat_ngram 3 + min_length, 10 tokens) |")
    print("| ---: | ---: | ---: |")
    for batch in (1, 8):
        print(f"| {batch} | {bookkeeping_ms(batch, args.beams, args.steps, args.repeats):.3f} | "
              f"{bans_ms(batch, args.beams, 10, args.repeats * 20):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
