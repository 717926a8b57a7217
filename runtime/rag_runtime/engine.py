"""The decode engine: iteration-level batching, where questions join and leave a running decode.

``add()`` a question at any time (its contexts, passage scores and its own options, as a
:class:`~rag_runtime.decoding.rag.QuestionDecode`); each :meth:`DecodeEngine.step` runs ONE decoder call over
the rows of every question still searching, whatever their beams, passages, lengths, processors and
stopping rules; a question whose search is done leaves at once and frees its rows. Questions added between
steps join at the next one: their generator encoder runs then, all joiners in one call. RAG-Sequence
questions whose per-passage searches finished are rescored in the same step, several questions' candidates
in shared calls. A cancelled question leaves before the next decoder call.

Row layout of a decoder call: the rows of the questions in the order they joined, each question's rows
ordered (passage, beam); the encoder rows (one per passage) in the same order in the cross-attention
buffer. Each question's self-attention cache rows live in the engine's slot buffers and are moved by the
decoder call itself (``beam_idx``: the beam reorder, the rows that leave and the rows that join are one
gather), so joining and leaving cost nothing beyond the rows themselves.

``RagPipeline.generate`` runs on this engine too: a batch is every question added before the first step.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .decoding.rag import Decoded, QuestionDecode
from .errors import InvalidOptionError
from .timing import NullTimer, StageTimer

logger = logging.getLogger(__name__)

# A teacher-forced rescoring call holds [rows, L, vocab] logits: bound its rows (times L).
RESCORE_TOKENS = 4096
MEMORY_SHARE = 0.25  # of the machine's memory, for the default row budget
DEFAULT_ROWS_CEILING = 1024  # beyond this a step is too long for anyone's latency, whatever the memory


def row_budget(manifest, max_length: int, max_rows: int | None = None, memory: int | None = None) -> dict:
    """The engine's decoder-row budget for an export: what one row costs at the longest answer allowed
    (``max_length`` tokens) -- its self-attention cache in both slot sets, its logits, and the cross-attention
    K/V of a passage (a row owns one when it is its passage's only beam) -- and how many rows fit in a
    quarter of ``memory`` (default: the machine's), unless ``max_rows`` is given.

    Returns:
        ``max_rows`` (the budget), ``bytes_per_row``, ``cache_bytes_per_row`` (its self-attention part),
        ``derived_max_rows`` and ``memory_bytes`` (what the default was derived from).
    """
    d = manifest.decoder
    positions = min(max_length, d.max_positions or max_length)
    per_position = 2 * d.layers * d.heads * d.head_dim * np.dtype(d.kv_dtype).itemsize  # keys + values
    cache = 2 * per_position * positions
    per_row = cache + per_position * manifest.rag.max_combined_length + 4 * d.vocab
    memory = memory or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    derived = max(1, int(memory * MEMORY_SHARE) // per_row)
    return {"max_rows": int(max_rows or min(derived, DEFAULT_ROWS_CEILING)), "bytes_per_row": int(per_row),
            "cache_bytes_per_row": int(cache), "derived_max_rows": int(derived), "memory_bytes": int(memory)}


class RowBudgetError(InvalidOptionError):
    """A question needs more decoder rows than the engine's budget: it could never be decoded."""

    def __init__(self, message: str):
        super().__init__(message, "n_docs")


@dataclass(eq=False)
class Ticket:
    """One question's place in the engine.

    Attributes:
        decode: Its decoding state (kind, options, search).
        contexts: Generator encoder input ids and mask of its passages (``decode.encoder_rows`` rows).
        rescore_contexts: RAG-Sequence: ids and mask of the passages candidates are rescored against (None:
            the rows of ``contexts``).
        tag: The caller's (the service keeps its request here).
        state: ``pending``, ``active``, ``done``, ``cancelled`` or ``failed``.
        result: Its answers once done.
        error: Why it failed.
        queued_s: Seconds from ``add`` to joining the decode.
        decode_s: Seconds from joining to done.
        joined_at: ``time.monotonic()`` when it joined the decode (0: never).
        steps: Decoder calls it took part in.
    """

    decode: QuestionDecode
    contexts: tuple[np.ndarray, np.ndarray]
    rescore_contexts: tuple[np.ndarray, np.ndarray] | None = None
    tag: Any = None
    state: str = "pending"
    result: Decoded | None = None
    error: BaseException | None = None
    queued_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    _added: float = field(default_factory=time.monotonic)
    joined_at: float = 0.0
    _row: int = -1  # first decoder row in the last call (-1: not in it)
    _enc: int = -1  # first encoder row in the cross-attention buffer
    _parents: np.ndarray | None = None
    _rescore_state: Any = None
    _cancel: bool = False

    def cancel(self) -> None:
        """Leave the decode before the next step (a no-op once done)."""
        self._cancel = True


@dataclass
class EngineStats:
    """What the engine did, cumulative (the service turns these into metrics).

    Attributes:
        steps: Decoder calls.
        rows: Decoder rows summed over the calls.
        joins: Questions that joined a decode.
        leaves: Questions that left it, by reason (``done``, ``cancelled``, ``failed``).
        decode_seconds: Time in decoder calls with their host work.
        encode_seconds: Time encoding joiners between steps.
        rescore_seconds: Time rescoring RAG-Sequence candidates.
    """

    steps: int = 0
    rows: int = 0
    joins: int = 0
    leaves: dict[str, int] = field(default_factory=lambda: {"done": 0, "cancelled": 0, "failed": 0})
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0
    rescore_seconds: float = 0.0


StepListener = Callable[[str, float, int], None]
"""``listener(phase, seconds, rows)`` after each ``decode`` step, ``encode`` of joiners and ``rescore``."""


class DecodeEngine:
    """Questions decoded together, joining and leaving between decoder calls.

    Args:
        backend: The exported generator (``OnnxGenerator``): encodes contexts, owns the decode buffers and
            runs the decoder, the fused head and the scorer.
        max_rows: Decoder rows one call may hold (the memory and latency budget); a question that needs
            more is refused by :meth:`add`, one that does not fit yet waits for rows to free.
        max_questions: Questions decoding at once at most (None: as many as the rows allow).
        timer: Accumulates ``generator_encode``, ``decode`` and ``rescore`` wall time.
        listener: Called after each phase with its duration and rows (the service's metrics).
    """

    def __init__(self, backend, max_rows: int, max_questions: int | None = None,
                 timer: StageTimer | NullTimer | None = None, listener: StepListener | None = None):
        self.backend, self.max_rows, self.max_questions = backend, int(max_rows), max_questions
        self._timer = timer or NullTimer()
        self._listener = listener
        self._batch = backend.new_batch(self.max_rows)
        self._pending: deque[Ticket] = deque()
        self._active: list[Ticket] = []  # joined and searching, in row order
        self.stats = EngineStats()

    @property
    def busy(self) -> bool:
        """Questions are waiting or decoding."""
        return bool(self._pending or self._active)

    @property
    def active_questions(self) -> int:
        return len(self._active)

    @property
    def pending_questions(self) -> int:
        return len(self._pending)

    @property
    def active_rows(self) -> int:
        return sum(t.decode.rows for t in self._active)

    def add(self, decode: QuestionDecode, contexts: tuple[np.ndarray, np.ndarray],
            rescore_contexts: tuple[np.ndarray, np.ndarray] | None = None, tag: Any = None) -> Ticket:
        """Queue a question; it joins at the next step with room for its rows.

        Raises:
            RowBudgetError: It needs more rows than ``max_rows``.
        """
        if decode.rows > self.max_rows:
            raise RowBudgetError(f"the question needs {decode.rows} decoder rows (passages x beams), over the "
                                 f"engine's max_rows ({self.max_rows}); use fewer n_docs or num_beams")
        ticket = Ticket(decode, contexts, rescore_contexts, tag)
        self._pending.append(ticket)
        return ticket

    def step(self) -> list[Ticket]:
        """Admit joiners, run one decoder call, finish the questions whose search ended (RAG-Sequence ones
        rescored first); returns the tickets that ended during this step (done, cancelled or failed)."""
        ended: list[Ticket] = []
        self._drop_cancelled(ended)
        joining: list[Ticket] = []
        finished: list[Ticket] = []
        try:
            self._admit(joining)
            if self._active:
                self._decode_step()
            finished = [t for t in self._active if not t.decode.searching]
            for t in finished:
                self._remove(t)
            self._finish(finished)
            for t in finished:
                self._end(t, "done", ended)
        except Exception as e:  # a failed call fails the questions in it, not the engine
            logger.error("decode step failed: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            logger.debug("decode step failure", exc_info=True)
            for t in dict.fromkeys([*self._active, *joining, *finished]):
                if t not in ended:
                    self._end(t, "failed", ended, error=e)
            self._active = []
            self._batch = self.backend.new_batch(self.max_rows)  # the old buffers' state is unknown
        return ended

    def run(self) -> None:
        """Step until every added question has ended."""
        while self.busy:
            self.step()

    def close(self) -> None:
        """Give the decode buffers back to the backend (for the next engine); the engine is unusable after."""
        self.backend.release(self._batch)
        self._batch = None

    # -- phases ---------------------------------------------------------------------------------------

    def _drop_cancelled(self, ended: list[Ticket]) -> None:
        for t in [t for t in self._pending if t._cancel]:
            self._pending.remove(t)
            self._end(t, "cancelled", ended)
        for t in [t for t in self._active if t._cancel]:
            self._remove(t)
            self._end(t, "cancelled", ended)

    def _admit(self, joining: list[Ticket]) -> None:
        """Pending questions join (into ``joining``, then the decode), oldest first, while their rows fit (a
        big one is not overtaken)."""
        rows = self.active_rows
        room = (self.max_questions or len(self._pending)) - len(self._active)
        while self._pending and rows + self._pending[0].decode.rows <= self.max_rows and len(joining) < room:
            t = self._pending.popleft()
            rows += t.decode.rows
            joining.append(t)
        if not joining:
            return
        start = time.perf_counter()
        with self._timer.stage("generator_encode"):
            first = self._batch.add_encoder_rows(*_stack([t.contexts for t in joining]))
            offsets = first + np.cumsum([0] + [t.decode.encoder_rows for t in joining[:-1]])
            rescored = [t for t in joining if t.rescore_contexts is not None]
            if rescored:
                states = self.backend.encode_rows(*_stack([t.rescore_contexts for t in rescored]))
                at = 0
                for t in rescored:
                    n = len(t.rescore_contexts[0])
                    t._rescore_state = self.backend.select(states, np.arange(at, at + n))
                    at += n
        now = time.monotonic()
        for t, offset in zip(joining, offsets, strict=True):
            t._enc, t.state, t.joined_at, t.queued_s = int(offset), "active", now, now - t._added
            if t.decode.rescores and t.rescore_contexts is None:  # rescored against the rows it decodes from
                t._rescore_state = self._batch.encoder_state(t._enc, t.decode.encoder_rows)
        self._active.extend(joining)
        self.stats.joins += len(joining)
        self._timer.add("generator_encode/rows", sum(t.decode.encoder_rows for t in joining))
        self._observe("encode", time.perf_counter() - start, sum(t.decode.encoder_rows for t in joining))

    def _decode_step(self) -> None:
        start = time.perf_counter()
        layout = [(t, t.decode) for t in self._active]
        tokens = np.concatenate([d.tokens() for _, d in layout])
        positions = np.concatenate([np.full(d.rows, d.past_length, dtype=np.int64) for _, d in layout])
        beam_idx, row, fold = [], 0, max(d.beams for _, d in layout)
        enc_rows = self._batch.encoder_rows
        slots = np.zeros((enc_rows, fold), dtype=np.int64)  # an empty slot reads row 0; its result is dropped
        row_slots = np.empty(len(tokens), dtype=np.int64)
        for t, d in layout:
            source = np.arange(d.rows) if t._parents is None else t._parents
            beam_idx.append(t._row + source if t._row >= 0 else np.zeros(d.rows, dtype=np.int64))
            rows = row + np.arange(d.rows).reshape(d.encoder_rows, d.beams)
            slots[t._enc : t._enc + d.encoder_rows, : d.beams] = rows
            row_slots[rows] = (np.arange(t._enc, t._enc + d.encoder_rows)[:, None] * fold + np.arange(d.beams))
            t._row, row = row, row + d.rows
        with self._timer.stage("decode"):
            logits = self._batch.decode(tokens, positions, np.concatenate(beam_idx), slots, row_slots)
            for t, d in layout:
                rows = slice(t._row, t._row + d.rows)
                head = self._batch.head(rows) if d.wants_head() else None
                t._parents = d.advance(None if head else logits[rows], head)
                t.steps += 1
        self.stats.steps += 1
        self.stats.rows += len(tokens)
        self._timer.add("decode/rows", len(tokens))
        self._timer.add("decode/questions", len(layout))
        self._observe("decode", time.perf_counter() - start, len(tokens))

    def _finish(self, finished: list[Ticket]) -> None:
        """Answers of the questions whose search ended; RAG-Sequence candidates are teacher-forced against
        every rescoring passage first, the candidates of all these questions sharing calls."""
        rescored = [t for t in finished if t.decode.needs_rescoring]
        for t in finished:
            if t not in rescored:
                t.result = t.decode.finish()
        if not rescored:
            return
        start = time.perf_counter()
        requests = [(t._rescore_state, *t.decode.rescoring()) for t in rescored]
        with self._timer.stage("rescore"):
            scored = self.backend.label_logprobs_many(requests, max_tokens=RESCORE_TOKENS)
        for t, (picked, sums) in zip(rescored, scored, strict=True):
            t.result = t.decode.finish(picked, sums, self.backend.vocab)
        self._timer.add("rescore/positions", sum(r[1].size * len(r[0].mask) for r in requests))
        self._timer.add("rescore/candidates", sum(len(r[1]) for r in requests))
        self._observe("rescore", time.perf_counter() - start, sum(len(r[1]) for r in requests))

    # -- bookkeeping ----------------------------------------------------------------------------------

    def _remove(self, t: Ticket) -> None:
        """Take a joined question's rows and encoder rows out of the decode (its cache rows simply drop out
        of the next call's gather)."""
        self._active.remove(t)
        self._batch.remove_encoder_rows(t._enc, t.decode.encoder_rows)
        for other in self._active:
            if other._enc > t._enc:
                other._enc -= t.decode.encoder_rows

    def _end(self, t: Ticket, reason: str, ended: list[Ticket], error: BaseException | None = None) -> None:
        t.state, t.error = reason, error
        if t.joined_at:
            t.decode_s = time.monotonic() - t.joined_at
        self.stats.leaves[reason] += 1
        ended.append(t)

    def _observe(self, phase: str, seconds: float, rows: int) -> None:
        setattr(self.stats, f"{phase}_seconds", getattr(self.stats, f"{phase}_seconds") + seconds)
        if self._listener is not None:
            self._listener(phase, seconds, rows)


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several questions' (ids, mask) rows in one batch, right-padded to the longest (masked)."""
    width = max(ids.shape[1] for ids, _ in pairs)
    rows = sum(len(ids) for ids, _ in pairs)
    out_ids = np.zeros((rows, width), dtype=np.int64)
    out_mask = np.zeros((rows, width), dtype=np.int64)
    at = 0
    for ids, mask in pairs:
        out_ids[at : at + len(ids), : ids.shape[1]] = ids
        out_mask[at : at + len(ids), : ids.shape[1]] = mask
        at += len(ids)
    return out_ids, out_mask
