"""Greedy and beam search over a ``step`` callable, with transformers 5.x semantics.

``step(sequences)`` receives the running sequences ``[rows, cur_len]`` (rows ordered (item, beam)) and
returns next-token logits ``[rows, vocab]`` float32 for their last position; the caller keeps its own
KV cache. Beam search asks a ``candidates`` callable instead (:func:`host_candidates` builds one from a
``step``; a device-side head can answer it without the logits leaving the device), and
``reorder(parents)`` tells the caller which row each new row continues.

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
Reorder = Callable[[np.ndarray], None]
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
    """
    if x.shape[-1] <= 4 * k:
        return np.argsort(-x, axis=-1, kind="stable")[:, :k]
    n = x.shape[-1]
    part = np.argpartition(x, n - k, axis=-1)[:, n - k :]  # the k largest (no negated copy of a wide row)
    part.sort(axis=-1)  # index order, so the stable sort below breaks ties by index
    order = np.argsort(-np.take_along_axis(x, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Gather along axis 1 with [batch, k] indices, trailing axes kept (transformers' _gather_beams)."""
    return x[np.arange(x.shape[0])[:, None], idx]


def greedy(step: Step, start: np.ndarray, proc: P.ProcessorSettings, search: SearchSettings,
           sampler: Sampler | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns sequences [rows, L] and the sum of the chosen tokens' processed scores per row.

    With a ``sampler``, each token is drawn from the warped scores (transformers' multinomial sampling)
    instead of taken as the best one."""
    seqs = start.astype(np.int64)
    rows = seqs.shape[0]
    unfinished = np.ones(rows, dtype=bool)
    totals = np.zeros(rows, dtype=np.float32)
    pad = search.pad_token_id if search.pad_token_id is not None else search.eos_token_ids[0]
    eos = np.asarray(search.eos_token_ids)
    while True:
        scores = P.apply(proc, seqs, step(seqs))
        tokens = scores.argmax(axis=-1) if sampler is None else sampler.tokens(sampler.warp(scores))
        totals += np.where(unfinished, scores[np.arange(rows), tokens], 0).astype(np.float32)
        tokens = np.where(unfinished, tokens, pad)
        seqs = np.concatenate([seqs, tokens[:, None]], axis=1)
        unfinished &= ~np.isin(tokens, eos)
        if seqs.shape[1] >= proc.max_length:
            unfinished[:] = False
        if not unfinished.any():
            return seqs, totals


def host_candidates(step: Step, proc: P.ProcessorSettings, sampler: Sampler | None = None) -> Candidates:
    """Candidates from full logits on the host: log_softmax, processors, running scores, top-k.

    With a ``sampler`` (beam sampling), the warpers follow the processors and the candidates are drawn
    without replacement from ``softmax`` of the running scores, in draw order, as transformers does."""

    def candidates(flat: np.ndarray, running_scores: np.ndarray, keep: int):
        log_probs = P.apply(proc, flat, log_softmax(step(flat).astype(np.float32, copy=False)))
        if sampler is not None:
            log_probs = sampler.warp(log_probs)
        batch, k = running_scores.shape
        vocab = log_probs.shape[-1]
        acc = (log_probs.reshape(batch, k, vocab) + running_scores[:, :, None]).reshape(batch, k * vocab)
        top = topk(acc, keep) if sampler is None else sampler.candidates(acc, keep)
        return np.take_along_axis(acc, top, axis=1), top // vocab, top % vocab

    return candidates


def beam_search(candidates: Candidates, reorder: Reorder, start: np.ndarray, proc: P.ProcessorSettings,
                search: SearchSettings) -> tuple[np.ndarray, np.ndarray]:
    """Returns sequences [items * num_return_sequences, L] and their (length-normalized) scores."""
    k = search.num_beams
    rows, prompt_len = start.shape
    batch = rows // k
    max_length = proc.max_length
    eos = np.asarray(search.eos_token_ids)
    keep = max(2, 1 + len(eos)) * k
    top_k_mask = np.arange(keep) < k
    lp, early = search.length_penalty, search.early_stopping
    pad = search.pad_token_id
    # transformers: `pad_token_id or eos_token_id[0]` -- a pad id of 0 falls through to EOS.
    fill = (pad or int(eos[0])) if len(eos) else -1

    running = np.full((batch, k, max_length), fill, dtype=np.int64)
    running[:, :, :prompt_len] = start.reshape(batch, k, prompt_len)
    sequences = running.copy()
    running_scores = np.zeros((batch, k), dtype=np.float32)
    running_scores[:, 1:] = -_BIG
    beam_scores = np.full((batch, k), -_BIG, dtype=np.float32)
    finished = np.zeros((batch, k), dtype=bool)
    unsatisfied = np.ones((batch, 1), dtype=bool)
    running_len = np.zeros((batch, k), dtype=np.int64)  # generated tokens per running beam
    lengths = np.zeros((batch, k), dtype=np.int64)
    batch_offset = (np.arange(batch) * k)[:, None]
    cur_len = prompt_len

    while True:
        flat = running[:, :, :cur_len].reshape(batch * k, cur_len)
        top_scores, parent, token = candidates(flat, running_scores, keep)
        cand = _take(running, parent)
        cand[:, :, cur_len] = token
        cand_len = _take(running_len, parent) + 1
        parent_rows = parent + batch_offset

        hits = (token[:, :, None] == eos).any(axis=2) | (cur_len + 1 >= max_length)

        # The best `k` unfinished candidates run on.
        run_scores = top_scores + hits.astype(np.float32) * -_BIG
        nxt = topk(run_scores, k)
        running = _take(cand, nxt)
        running_scores = _take(run_scores, nxt)
        running_len = _take(cand_len, nxt)
        chosen_parents = _take(parent_rows, nxt)

        # Finished candidates among the top `k` compete with the finished hypotheses so far.
        just_finished = hits & top_k_mask[None, :]
        normed = top_scores / np.float32((cur_len + 1 - prompt_len) ** lp)
        full = finished.all(axis=-1, keepdims=True) & (early is True)
        normed = normed + full.astype(np.float32) * -_BIG
        normed = normed + (~unsatisfied).astype(np.float32) * -_BIG
        normed = normed + (~just_finished).astype(np.float32) * -_BIG
        merged_scores = np.concatenate([beam_scores, normed.astype(np.float32)], axis=1)
        best = topk(merged_scores, k)
        sequences = _take(np.concatenate([sequences, cand], axis=1), best)
        beam_scores = _take(merged_scores, best)
        lengths = _take(np.concatenate([lengths, cand_len], axis=1), best)
        finished = _take(np.concatenate([finished, just_finished], axis=1), best)

        reorder(chosen_parents.reshape(-1))
        cur_len += 1

        hypothetical = (max_length if (early == "never" and lp > 0.0) else cur_len) - prompt_len
        best_running = running_scores[:, :1] / np.float32(hypothetical**lp)
        worst_finished = np.where(finished, beam_scores.min(axis=1, keepdims=True), np.float32(-_BIG))
        unsatisfied = unsatisfied & (best_running > worst_finished).any(axis=-1, keepdims=True)
        done = (not unsatisfied.any()) or (finished.all() and early is True) or hits.all()
        if done:
            break

    n = search.num_return_sequences
    out_len = prompt_len + int(lengths[:, :n].max())
    return sequences[:, :n, :out_len].reshape(batch * n, out_len), beam_scores[:, :n].reshape(-1)
