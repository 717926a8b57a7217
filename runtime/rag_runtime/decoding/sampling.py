"""Sampling, as transformers' generate does it: the warpers (temperature, top-k, top-p) applied after the
logits processors, then multinomial draws (one token per row; beam sampling draws ``keep`` candidates per
item without replacement).

Draws use numpy Generators, one per question, so a question's answer depends only on its own seed, never
on the questions decoded beside it. A categorical draw is the argmax of the scores plus Gumbel noise, and
the order of the largest perturbed scores is a draw without replacement (the Gumbel-top-k trick): the same
distributions as ``torch.multinomial``, though not torch's random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEG_INF = np.float32(-np.inf)


@dataclass(frozen=True)
class SamplingSettings:
    """The warpers' parameters (transformers' names and meanings).

    Attributes:
        temperature: Scores are divided by it (1.0 = off).
        top_k: Keep the ``top_k`` best tokens per row, ties included (None or 0 = off).
        top_p: Keep the smallest set of best tokens whose probability reaches ``top_p`` (1.0 = off).
        min_tokens_to_keep: Neither filter keeps fewer (transformers: 1 for multinomial sampling, one more
            than the EOS ids for beam sampling).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_tokens_to_keep: int = 1


def temperature(scores: np.ndarray, t: float) -> np.ndarray:
    return scores / np.float32(t)


def top_k(scores: np.ndarray, k: int, keep: int = 1) -> np.ndarray:
    k = min(max(k, keep), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k, None]
    return np.where(scores < kth, NEG_INF, scores)


def top_p(scores: np.ndarray, p: float, keep: int = 1) -> np.ndarray:
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
    ordered = np.take_along_axis(scores, order, axis=-1)
    shifted = np.exp(ordered - ordered[:, -1:])
    cumulative = np.cumsum(shifted / shifted.sum(axis=-1, keepdims=True), axis=-1, dtype=np.float32)
    remove = cumulative <= np.float32(1 - p)
    remove[:, -keep:] = False
    out = scores.copy()
    np.put_along_axis(out, order, np.where(remove, NEG_INF, ordered), axis=-1)
    return out


def warp(settings: SamplingSettings, scores: np.ndarray) -> np.ndarray:
    """Apply the configured warpers in transformers' order."""
    s = settings
    if s.temperature != 1.0:
        scores = temperature(scores, s.temperature)
    if s.top_k:
        scores = top_k(scores, s.top_k, s.min_tokens_to_keep)
    if s.top_p < 1.0:
        scores = top_p(scores, s.top_p, s.min_tokens_to_keep)
    return scores


class Sampler:
    """Warps and draws for a batch of items whose rows come in item order.

    Args:
        settings: The warpers' parameters.
        rngs: One generator per question; the batch's items are split evenly between them, in order
            (RAG-Sequence decodes a question's passages as its items).
    """

    def __init__(self, settings: SamplingSettings, rngs: list[np.random.Generator]):
        self.settings, self.rngs = settings, rngs

    def warp(self, scores: np.ndarray) -> np.ndarray:
        return warp(self.settings, scores)

    def tokens(self, scores: np.ndarray) -> np.ndarray:
        """One multinomial draw per row of ``softmax(scores)``: [rows] token ids."""
        return np.array([int(_perturbed(row, rng).argmax()) for row, rng in self._split(scores)], dtype=np.int64)

    def candidates(self, scores: np.ndarray, keep: int) -> np.ndarray:
        """``keep`` draws without replacement per row of ``softmax(scores)`` ([items, n]), in draw order."""
        out = np.empty((scores.shape[0], keep), dtype=np.int64)
        for i, (row, rng) in enumerate(self._split(scores)):
            keys = -_perturbed(row, rng)
            best = np.argpartition(keys, keep - 1)[:keep]
            out[i] = best[np.argsort(keys[best], kind="stable")]
        return out

    def _split(self, scores: np.ndarray):
        per = scores.shape[0] // len(self.rngs)
        return ((row, self.rngs[i // per]) for i, row in enumerate(scores))


def _perturbed(row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``row`` plus Gumbel noise where it is finite (-inf stays: probability zero)."""
    out = np.full(row.shape, -np.inf)
    finite = np.flatnonzero(row > NEG_INF)
    out[finite] = row[finite] + rng.gumbel(size=len(finite))
    return out


def generators(seed: int | None, count: int) -> list[np.random.Generator]:
    """``count`` independent questions' generators, each started from ``seed`` (None: fresh entropy)."""
    return [np.random.default_rng(seed) for _ in range(count)]
