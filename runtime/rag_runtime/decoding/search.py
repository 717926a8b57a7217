"""Greedy and beam search as state plus a step, with transformers 5.x semantics.

A search holds one question's decoding (its items: one for RAG-Token, one per passage for RAG-Sequence)
and is advanced one token at a time by its caller, so that many searches with different settings and
lengths can share each decoder call. :attr:`BeamSearch.sequences` are the running sequences (rows ordered
(item, beam)); the caller computes their next-token candidates (:func:`host_candidates` from logits on the
host, or a device-side head without the logits leaving the device) and passes them to
:meth:`BeamSearch.advance`, which returns the row each new row continues (the caller reorders its cache).

The beam search is the vectorized one of transformers 5.x (``GenerationMixin._beam_search``): keep
``2 * num_beams`` candidates per step, the best ``num_beams`` unfinished ones run on, the best finished
ones (length-normalized) are kept, with its early-stopping heuristic. Scores are float32 as there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import processors as P
from .sampling import Sampler

Step = Callable[[np.ndarray], np.ndarray]
Candidates = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""``candidates(sequences [items*k, cur_len], running_scores [items, k], keep)`` -> the ``keep`` best
(beam, token) extensions per item, best first: scores (processed log-prob + running score), beam, token;
each [items, keep]. Exact ties rank the lower ``beam * vocab + token`` first."""
_BIG = np.float32(1.0e9)


@dataclass(frozen=True)
class SearchSettings:
    """Parameters of the search itself (score-shaping ones are in ``processors``).

    Attributes:
        num_beams: Beams per item (1 = greedy).
        num_return_sequences: Finished hypotheses returned per item, best first.
        length_penalty: Exponent of the length normalization of finished hypotheses.
        early_stopping: True, False or "never", as in transformers.
        pad_token_id: Id written after EOS.
        eos_token_ids: End-of-sequence ids.
    """

    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    pad_token_id: int | None
    eos_token_ids: tuple[int, ...]


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # in place: a [rows, vocab] copy fewer
    return shifted


def topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, best first; exact ties keep the lower index.

    torch.topk leaves the order of exact ties unspecified; in beam search they arise only among candidates
    masked with -1e9, which never reach the output. Wide rows (num_beams * vocab) are partitioned first so only the k winners are sorted.
    Rows mostly -inf (a forced token) are selected among their finite entries: partitioning a row of equal
    values is many times slower than a row of distinct ones.
    """
    if x.shape[-1] <= 4 * k:
        return np.argsort(-x, axis=-1, kind="stable")[:, :k]
    n = x.shape[-1]
    masked = x == -np.inf
    if np.count_nonzero(masked) > x.size // 2:
        return np.stack([_topk_finite(row, dead, k) for row, dead in zip(x, masked, strict=True)])
    part = np.argpartition(x, n - k, axis=-1)[:, n - k :]  # the k largest (no negated copy of a wide row)
    part.sort(axis=-1)  # index order, so the stable sort below breaks ties by index
    order = np.argsort(-np.take_along_axis(x, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def _topk_finite(row: np.ndarray, masked: np.ndarray, k: int) -> np.ndarray:
    """:func:`topk` of one row among its finite entries, padded with the first -inf ones if too few."""
    live = np.flatnonzero(~masked)
    best = live[topk(row[live][None], k)[0]] if len(live) > k else live[np.argsort(-row[live], kind="stable")]
    return best if len(best) == k else np.concatenate([best, np.flatnonzero(masked)[: k - len(best)]])


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Gather along axis 1 with [batch, k] indices, trailing axes kept (transformers' _gather_beams)."""
    return x[np.arange(x.shape[0])[:, None], idx]


class GreedySearch:
    """Greedy decoding (or multinomial sampling, with a ``sampler``) of ``start.shape[0]`` rows.

    Attributes:
        sequences: The running sequences [rows, cur_len], start tokens included.
        totals: Per row, the sum of the chosen tokens' processed scores.
        done: Every row has finished (EOS or ``max_length``).
    """

    def __init__(self, search: SearchSettings, max_length: int, start: np.ndarray, sampler: Sampler | None = None):
        self.sequences = start.astype(np.int64)
        rows = self.sequences.shape[0]
        self._max_length, self._sampler = max_length, sampler
        self._unfinished = np.ones(rows, dtype=bool)
        self.totals = np.zeros(rows, dtype=np.float32)
        self._pad = search.pad_token_id if search.pad_token_id is not None else search.eos_token_ids[0]
        self._eos = np.asarray(search.eos_token_ids)
        self.done = False

    def advance(self, scores: np.ndarray) -> None:
        """Append one token per row chosen from its processed ``scores`` [rows, vocab]."""
        s = self._sampler
        tokens = scores.argmax(axis=-1) if s is None else s.tokens(s.warp(scores))
        rows = np.arange(len(tokens))
        self.totals += np.where(self._unfinished, scores[rows, tokens], 0).astype(np.float32)
        tokens = np.where(self._unfinished, tokens, self._pad)
        self.sequences = np.concatenate([self.sequences, tokens[:, None]], axis=1)
        self._unfinished &= ~np.isin(tokens, self._eos)
        if self.sequences.shape[1] >= self._max_length:
            self._unfinished[:] = False
        self.done = not self._unfinished.any()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Sequences [rows, L] and their summed scores."""
        return self.sequences, self.totals


def host_candidates(step: Step, proc: P.ProcessorSettings, sampler: Sampler | None = None) -> Candidates:
    """Candidates from full logits on the host: log_softmax, processors, running scores, top-k.

    With a ``sampler`` (beam sampling), the warpers follow the processors and the candidates are drawn
    without replacement from ``softmax`` of the running scores, in draw order, as transformers does."""

    def candidates(flat: np.ndarray, running_scores: np.ndarray, keep: int):
        scores = step(flat).astype(np.float32, copy=False)
        # A forced token overwrites every score: its step's log-softmax would be thrown away.
        log_probs = P.apply(proc, flat, scores if P.forces(proc, flat.shape[1]) else log_softmax(scores))
        if sampler is not None:
            log_probs = sampler.warp(log_probs)
        batch, k = running_scores.shape
        vocab = log_probs.shape[-1]
        acc = (log_probs.reshape(batch, k, vocab) + running_scores[:, :, None]).reshape(batch, k * vocab)
        top = topk(acc, keep) if sampler is None else sampler.candidates(acc, keep)
        return np.take_along_axis(acc, top, axis=1), top // vocab, top % vocab

    return candidates


class BeamSearch:
    """Beam search over ``start.shape[0] // num_beams`` items, advanced one token at a time.

    Attributes:
        sequences: The running sequences [items * num_beams, cur_len], ordered (item, beam).
        running_scores: Their scores [items, num_beams].
        keep: Candidates :meth:`advance` expects per item (transformers keeps ``(1 + #EOS) * num_beams``).
        done: Every item's search has stopped.
    """

    def __init__(self, search: SearchSettings, max_length: int, start: np.ndarray):
        k = self._k = search.num_beams
        rows, self._prompt_len = start.shape
        batch = self._batch = rows // k
        self._search, self._max_length = search, max_length
        self._eos = np.asarray(search.eos_token_ids)
        self.keep = max(2, 1 + len(self._eos)) * k
        self._top_k_mask = np.arange(self.keep) < k
        # transformers: `pad_token_id or eos_token_id[0]` -- a pad id of 0 falls through to EOS.
        fill = (search.pad_token_id or int(self._eos[0])) if len(self._eos) else -1
        self._running = np.full((batch, k, max_length), fill, dtype=np.int64)
        self._running[:, :, : self._prompt_len] = start.reshape(batch, k, self._prompt_len)
        self._sequences = self._running.copy()
        self.running_scores = np.zeros((batch, k), dtype=np.float32)
        self.running_scores[:, 1:] = -_BIG
        self._beam_scores = np.full((batch, k), -_BIG, dtype=np.float32)
        self._finished = np.zeros((batch, k), dtype=bool)
        self._unsatisfied = np.ones((batch, 1), dtype=bool)
        self._running_len = np.zeros((batch, k), dtype=np.int64)  # generated tokens per running beam
        self._lengths = np.zeros((batch, k), dtype=np.int64)
        self._batch_offset = (np.arange(batch) * k)[:, None]
        self.cur_len = self._prompt_len
        self.done = False

    @property
    def sequences(self) -> np.ndarray:
        return self._running[:, :, : self.cur_len].reshape(self._batch * self._k, self.cur_len)

    def advance(self, top_scores: np.ndarray, parent: np.ndarray, token: np.ndarray) -> np.ndarray:
        """Extend by the ``keep`` best candidates per item (each [items, keep], best first: scores, beam,
        token); returns the row each new running row continues ([items * num_beams], rows of this search)."""
        k, lp, early = self._k, self._search.length_penalty, self._search.early_stopping
        cur_len, prompt_len = self.cur_len, self._prompt_len
        cand = _take(self._running, parent)
        cand[:, :, cur_len] = token
        cand_len = _take(self._running_len, parent) + 1
        parent_rows = parent + self._batch_offset

        hits = (token[:, :, None] == self._eos).any(axis=2) | (cur_len + 1 >= self._max_length)

        # The best `k` unfinished candidates run on.
        run_scores = top_scores + hits.astype(np.float32) * -_BIG
        nxt = topk(run_scores, k)
        self._running = _take(cand, nxt)
        self.running_scores = _take(run_scores, nxt)
        self._running_len = _take(cand_len, nxt)
        chosen_parents = _take(parent_rows, nxt)

        # Finished candidates among the top `k` compete with the finished hypotheses so far.
        just_finished = hits & self._top_k_mask[None, :]
        normed = top_scores / np.float32((cur_len + 1 - prompt_len) ** lp)
        full = self._finished.all(axis=-1, keepdims=True) & (early is True)
        normed = normed + full.astype(np.float32) * -_BIG
        normed = normed + (~self._unsatisfied).astype(np.float32) * -_BIG
        normed = normed + (~just_finished).astype(np.float32) * -_BIG
        merged_scores = np.concatenate([self._beam_scores, normed.astype(np.float32)], axis=1)
        best = topk(merged_scores, k)
        self._sequences = _take(np.concatenate([self._sequences, cand], axis=1), best)
        self._beam_scores = _take(merged_scores, best)
        self._lengths = _take(np.concatenate([self._lengths, cand_len], axis=1), best)
        self._finished = _take(np.concatenate([self._finished, just_finished], axis=1), best)
        self.cur_len = cur_len = cur_len + 1

        hypothetical = (self._max_length if (early == "never" and lp > 0.0) else cur_len) - prompt_len
        best_running = self.running_scores[:, :1] / np.float32(hypothetical**lp)
        worst_finished = np.where(self._finished, self._beam_scores.min(axis=1, keepdims=True), np.float32(-_BIG))
        self._unsatisfied = self._unsatisfied & (best_running > worst_finished).any(axis=-1, keepdims=True)
        self.done = bool((not self._unsatisfied.any()) or (self._finished.all() and early is True) or hits.all())
        return chosen_parents.reshape(-1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Sequences [items * num_return_sequences, L] and their (length-normalized) scores, best first."""
        n = self._search.num_return_sequences
        out_len = self._prompt_len + int(self._lengths[:, :n].max())
        return (self._sequences[:, :n, :out_len].reshape(self._batch * n, out_len),
                self._beam_scores[:, :n].reshape(-1))
