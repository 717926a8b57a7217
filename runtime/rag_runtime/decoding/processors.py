"""Logits processors, in numpy, applied in the order transformers applies them.

Each takes ``input_ids`` [rows, cur_len] (the sequences so far, decoder start token included) and
``scores`` [rows, vocab] float32, and returns new scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEG_INF = np.float32(-np.inf)


@dataclass(frozen=True)
class ProcessorSettings:
    """The generation parameters that shape scores (transformers' names and meanings).

    Attributes:
        max_length: Total length including the decoder start token.
        min_length: EOS is blocked while the sequence is shorter than this.
        no_repeat_ngram_size: Ban tokens that would repeat an n-gram of this size (0 = off).
        repetition_penalty: CTRL-style penalty on tokens already present (1.0 = off).
        forced_bos_token_id: Token forced as the first generated token.
        forced_eos_token_id: Token forced at ``max_length - 1``.
        bad_words_ids: Token sequences that may never be generated.
        eos_token_ids: End-of-sequence ids.
    """

    max_length: int
    min_length: int = 0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | Sequence[int] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    eos_token_ids: tuple[int, ...] = ()


def repetition_penalty(input_ids: np.ndarray, scores: np.ndarray, penalty: float) -> np.ndarray:
    rows = np.arange(scores.shape[0])[:, None]
    picked = scores[rows, input_ids]
    penalized = np.where(picked < 0, picked * np.float32(penalty), picked / np.float32(penalty))
    out = scores.copy()
    out[rows, input_ids] = penalized
    return out


def no_repeat_ngram(input_ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    cur_len = input_ids.shape[1]
    if cur_len < n:
        return scores
    out = scores
    for row in range(input_ids.shape[0]):
        seq = input_ids[row]
        prefix = seq[cur_len + 1 - n :]
        banned = [int(seq[i + n - 1]) for i in range(cur_len - n + 1) if np.array_equal(seq[i : i + n - 1], prefix)]
        if banned:
            if out is scores:
                out = scores.copy()
            out[row, banned] = NEG_INF
    return out


def bad_words(input_ids: np.ndarray, scores: np.ndarray, words: Sequence[Sequence[int]],
              eos: Sequence[int]) -> np.ndarray:
    # transformers drops a bad word that is just an EOS token, then bans the last token of every
    # sequence whose prefix ends the current input.
    words = [w for w in words if not (len(w) == 1 and w[0] in eos)]
    out = scores.copy()
    for w in words:
        if len(w) == 1:
            out[:, w[0]] = NEG_INF
            continue
        prefix = np.asarray(w[:-1])
        if len(prefix) > input_ids.shape[1]:
            continue
        match = (input_ids[:, -len(prefix) :] == prefix).all(axis=1)
        out[match, w[-1]] = NEG_INF
    return out


def min_length(input_ids: np.ndarray, scores: np.ndarray, length: int, eos: Sequence[int]) -> np.ndarray:
    if input_ids.shape[1] >= length:
        return scores
    out = scores.copy()
    out[:, list(eos)] = NEG_INF
    return out


def force_token(scores: np.ndarray, token_ids) -> np.ndarray:
    out = np.full_like(scores, NEG_INF)
    out[:, token_ids] = 0
    return out


def apply(settings: ProcessorSettings, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Apply every configured processor in transformers' order."""
    s = settings
    if s.repetition_penalty != 1.0:
        scores = repetition_penalty(input_ids, scores, s.repetition_penalty)
    if s.no_repeat_ngram_size:
        scores = no_repeat_ngram(input_ids, scores, s.no_repeat_ngram_size)
    if s.bad_words_ids:
        scores = bad_words(input_ids, scores, s.bad_words_ids, s.eos_token_ids)
    if s.min_length > 0 and s.eos_token_ids:
        scores = min_length(input_ids, scores, s.min_length, s.eos_token_ids)
    cur_len = input_ids.shape[1]
    if s.forced_bos_token_id is not None and cur_len == 1:
        scores = force_token(scores, s.forced_bos_token_id)
    if s.forced_eos_token_id is not None and cur_len == s.max_length - 1:
        scores = force_token(scores, s.forced_eos_token_id)
    return scores
