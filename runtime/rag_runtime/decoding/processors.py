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
        suppress_tokens: Tokens never generated.
        begin_suppress_tokens: Tokens not generated first (second when ``forced_bos_token_id`` is set).
        eos_token_ids: End-of-sequence ids.
    """

    max_length: int
    min_length: int = 0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | Sequence[int] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    suppress_tokens: tuple[int, ...] | None = None
    begin_suppress_tokens: tuple[int, ...] | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def begin_index(self) -> int:
        """The length at which ``begin_suppress_tokens`` apply (transformers: after a forced BOS)."""
        return 2 if self.forced_bos_token_id is not None else 1


def repetition_penalty(input_ids: np.ndarray, scores: np.ndarray, penalty: float) -> np.ndarray:
    rows = np.arange(scores.shape[0])[:, None]
    picked = scores[rows, input_ids]
    penalized = np.where(picked < 0, picked * np.float32(penalty), picked / np.float32(penalty))
    out = scores.copy()
    out[rows, input_ids] = penalized
    return out


def _ban(scores: np.ndarray, rows, tokens) -> np.ndarray:
    """``scores`` with (rows, tokens) set to -inf (the same array when there is nothing to ban)."""
    if len(rows) == 0:
        return scores
    out = scores.copy()
    out[rows, tokens] = NEG_INF
    return out


def no_repeat_ngram_bans(input_ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, tokens) that would repeat an n-gram already in the row: the last token of every n-gram
    whose first ``n - 1`` tokens equal the row's last ``n - 1``."""
    cur_len = input_ids.shape[1]
    if cur_len < n:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    grams = np.lib.stride_tricks.sliding_window_view(input_ids, n, axis=1)  # [rows, cur_len - n + 1, n]
    prefix = input_ids[:, cur_len + 1 - n :]
    rows, starts = np.nonzero((grams[:, :, :-1] == prefix[:, None, :]).all(axis=2))
    return rows, grams[rows, starts, -1]


def bad_words_bans(input_ids: np.ndarray, words: Sequence[Sequence[int]], eos: Sequence[int]
                   ) -> tuple[list[int], list[int]]:
    # transformers drops a bad word that is just an EOS token, then bans the last token of every
    # sequence whose prefix ends the current input.
    rows, tokens = [], []
    for w in words:
        if len(w) == 1 and w[0] in eos:
            continue
        if len(w) == 1:
            match = np.arange(input_ids.shape[0])
        else:
            prefix = np.asarray(w[:-1])
            if len(prefix) > input_ids.shape[1]:
                continue
            match = np.flatnonzero((input_ids[:, -len(prefix) :] == prefix).all(axis=1))
        rows.extend(match.tolist())
        tokens.extend([w[-1]] * len(match))
    return rows, tokens


def min_length_bans(input_ids: np.ndarray, length: int, eos: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    if input_ids.shape[1] >= length:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n = input_ids.shape[0]
    return np.repeat(np.arange(n), len(eos)), np.tile(np.asarray(eos, dtype=np.int64), n)


def suppress_bans(input_ids: np.ndarray, tokens: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Every row bans ``tokens`` (none when ``tokens`` is None)."""
    if not tokens:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n = input_ids.shape[0]
    return np.repeat(np.arange(n), len(tokens)), np.tile(np.asarray(tokens, dtype=np.int64), n)


def no_repeat_ngram(input_ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    return _ban(scores, *no_repeat_ngram_bans(input_ids, n))


def bad_words(input_ids: np.ndarray, scores: np.ndarray, words: Sequence[Sequence[int]],
              eos: Sequence[int]) -> np.ndarray:
    return _ban(scores, *bad_words_bans(input_ids, words, eos))


def min_length(input_ids: np.ndarray, scores: np.ndarray, length: int, eos: Sequence[int]) -> np.ndarray:
    return _ban(scores, *min_length_bans(input_ids, length, eos))


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
    scores = _ban(scores, *suppress_bans(input_ids, s.suppress_tokens))
    if cur_len == s.begin_index:
        scores = _ban(scores, *suppress_bans(input_ids, s.begin_suppress_tokens))
    return scores


def has_dense(settings: ProcessorSettings, cur_len: int) -> bool:
    """Whether a processor that rewrites whole score rows (not just bans tokens) acts at ``cur_len``."""
    s = settings
    return s.repetition_penalty != 1.0 or forces(s, cur_len)


def forces(settings: ProcessorSettings, cur_len: int) -> bool:
    """Whether a token is forced at ``cur_len`` (BOS first, EOS last): ``apply`` then overwrites every score,
    so its result does not depend on the scores it is given (only on their shape)."""
    s = settings
    return ((s.forced_bos_token_id is not None and cur_len == 1)
            or (s.forced_eos_token_id is not None and cur_len == s.max_length - 1))


def bans(settings: ProcessorSettings, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, token) the ban-only processors (no_repeat_ngram, bad_words, min_length, suppress_tokens,
    begin_suppress_tokens) set to -inf.

    Without dense processors (:func:`has_dense`), ``apply`` equals setting exactly these to -inf, which
    lets a device-side head apply them from a short index list.
    """
    s = settings
    parts = []
    if s.no_repeat_ngram_size:
        parts.append(no_repeat_ngram_bans(input_ids, s.no_repeat_ngram_size))
    if s.bad_words_ids:
        parts.append(bad_words_bans(input_ids, s.bad_words_ids, s.eos_token_ids))
    if s.min_length > 0 and s.eos_token_ids:
        parts.append(min_length_bans(input_ids, s.min_length, s.eos_token_ids))
    parts.append(suppress_bans(input_ids, s.suppress_tokens))
    if input_ids.shape[1] == s.begin_index:
        parts.append(suppress_bans(input_ids, s.begin_suppress_tokens))
    return (np.concatenate([np.asarray(r, dtype=np.int64) for r, _ in parts]),
            np.concatenate([np.asarray(t, dtype=np.int64) for _, t in parts]))
