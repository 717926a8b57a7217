"""onnxruntime sessions for the exported graphs, and the generator backend the decode engine drives.

The decoder (export format 4) takes rows of different lengths: each row's position, the row of the
previous call's cache it continues (``beam_idx``), and the map of decoder rows onto encoder rows for the
beam-folded cross-attention (``cross_query_rows``/``decoder_slots``: any number of beams per passage). The
self-attention cache lives in preallocated slot buffers: the decoder reads one set, gathers the rows it
continues into the other (bound as its output), and returns the new keys and values, which the host writes
at each row's position; the two sets swap every call. The cross-attention K/V of every passage in the
decode sit in one buffer, to which joining questions append and from which leaving ones are removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import constants as C
from .artifact import DecoderDims, GraphFile
from .decoding.search import log_softmax
from .graph_io import GraphIO
from .sessions import _ort

logger = logging.getLogger(__name__)

CACHE_CHUNK = 8  # the slot buffers' length grows (and shrinks) in steps of this many positions


@dataclass
class EncoderState:
    """Encoder rows' cross-attention K/V: every layer's keys then values (each [rows, heads, src, head_dim],
    host arrays), and their source mask [rows, src]."""

    cross: list[np.ndarray]
    mask: np.ndarray


def _value(array: np.ndarray, device):
    """``array`` as an onnxruntime value: on the CPU the same memory (no copy), on CUDA a copy."""
    ort = _ort()
    if device.name == "cpu":
        return ort.OrtValue.ortvalue_from_numpy(array)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device.name, device.id)


class _Device:
    def __init__(self, device: str):
        self.name, self.id = ("cuda", 0) if device == "cuda" else ("cpu", 0)


class OnnxGenerator:
    """The exported generator encoder + decoder (+ RAG-Token head, + RAG-Sequence beam step and scorer).

    On the CPU the decode buffers are host arrays that onnxruntime reads and writes in place. On CUDA the
    same buffers are staged through the host at every call: correct, not yet fast (the buffers kept on the
    device are the GPU work still to do).

    Args:
        encoder, decoder, head, scorer: onnxruntime sessions (head: the RAG-Token head or RAG-Sequence's
            beam step; scorer: RAG-Sequence).
        graphs: The manifest's entries of those graphs (their IO is bound by the names they declare).
        dims: The decoder's dimensions.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, encoder, decoder, dims: DecoderDims, graphs: dict[str, GraphFile], head=None,
                 device: str = "cpu", scorer=None):
        self.encoder, self.decoder, self.head, self.scorer, self.dims = encoder, decoder, head, scorer, dims
        self.vocab, self.device = int(dims.vocab), device
        self._device = _Device(device)
        layers = dims.layers
        enc = GraphIO(C.GENERATOR_ENCODER, graphs[C.GENERATOR_ENCODER])
        enc.require(C.INPUT_IDS, C.ATTENTION_MASK)
        self._encoder_cross = enc.per_layer(C.CROSS_KEYS, layers) + enc.per_layer(C.CROSS_VALUES, layers)
        dec = GraphIO(C.GENERATOR_DECODER, graphs[C.GENERATOR_DECODER])
        dec.require(C.DECODER_INPUT_IDS, C.POSITIONS, C.BEAM_IDX, C.CROSS_QUERY_ROWS, C.DECODER_SLOTS,
                    C.ENCODER_ATTENTION_MASK, C.LOGITS)
        self.cross_names = dec.per_layer(C.CROSS_KEYS, layers) + dec.per_layer(C.CROSS_VALUES, layers)
        self.past_names = dec.per_layer(C.PAST_KEYS, layers) + dec.per_layer(C.PAST_VALUES, layers)
        self.present_names = dec.per_layer(C.PRESENT_KEYS, layers) + dec.per_layer(C.PRESENT_VALUES, layers)
        self.new_names = dec.per_layer(C.NEW_KEYS, layers) + dec.per_layer(C.NEW_VALUES, layers)
        if head is not None:  # RAG-Token's head, or RAG-Sequence's beam step (no passage priors)
            name = C.RAG_TOKEN_HEAD if C.RAG_TOKEN_HEAD in graphs else C.BEAM_STEP
            priors = (C.DOC_LOGPRIOR,) if name == C.RAG_TOKEN_HEAD else ()
            GraphIO(name, graphs[name]).require(C.LOGITS, *priors, C.BEAM_SCORES, C.BANNED, C.TOP_K, C.TOP_SCORES,
                                                C.TOP_IDS)
        if scorer is not None:
            GraphIO(C.SEQUENCE_SCORER, graphs[C.SEQUENCE_SCORER]).require(
                C.LOGITS, C.LABELS, C.LABEL_LOGPROBS, C.LOGPROB_SUMS)
        self.kv_dtype = np.dtype(dims.kv_dtype)
        self.logits_dtype = np.dtype(graphs[C.GENERATOR_DECODER].dtype(C.LOGITS))
        self._idle: list[DecodeBatch] = []

    def encode_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncoderState:
        """Run the encoder over context rows: their cross-attention K/V on the host."""
        io = self.encoder.io_binding()
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        io.bind_cpu_input(C.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input(C.ATTENTION_MASK, mask)
        for name in self._encoder_cross:
            io.bind_output(name, "cpu")
        self.encoder.run_with_iobinding(io)
        out = dict(zip(self._encoder_cross, io.get_outputs(), strict=True))  # in the order bound
        return EncoderState([out[name].numpy() for name in self._encoder_cross], mask)

    def select(self, state: EncoderState, rows: np.ndarray) -> EncoderState:
        return EncoderState([kv[rows] for kv in state.cross], state.mask[rows])

    def new_batch(self, max_rows: int) -> DecodeBatch:
        """Empty decode buffers for up to ``max_rows`` decoder rows (a released batch's memory if one is
        idle; allocated as needed otherwise)."""
        batch = self._idle.pop() if self._idle else DecodeBatch(self, max_rows)
        batch.max_rows = max_rows
        batch.reset()
        return batch

    def release(self, batch: DecodeBatch) -> None:
        """Give a batch's memory back for the next :meth:`new_batch`."""
        self._idle.append(batch)

    def run_decoder(self, feeds: dict, past: list, present: list | None, new: list | None, logits=None):
        """One decoder call. ``past``/``present``/``new`` are per-layer host arrays (``present``/``new``/
        ``logits``: where the outputs go, None to let onnxruntime allocate them); returns the logits."""
        ort, dev = _ort(), self._device
        io = self.decoder.io_binding()
        for name, array in feeds.items():
            io.bind_ortvalue_input(name, _value(array, dev))
        for name, array in zip(self.past_names, past, strict=True):
            io.bind_ortvalue_input(name, _value(array, dev))
        targets = {C.LOGITS: logits,
                   **dict(zip(self.present_names, present or [None] * len(self.present_names), strict=True)),
                   **dict(zip(self.new_names, new or [None] * len(self.new_names), strict=True))}
        for name, array in targets.items():
            if array is not None and dev.name == "cpu":  # onnxruntime writes into the array itself
                io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
            else:
                io.bind_output(name, "cpu")
        self.decoder.run_with_iobinding(io)
        if dev.name != "cpu" or any(a is None for a in targets.values()):
            for (name, array), value in zip(targets.items(), io.get_outputs(), strict=True):  # in the order bound
                if array is None:
                    targets[name] = value.numpy()
                elif dev.name != "cpu":
                    array[...] = value.numpy()
        return targets[C.LOGITS]

    def run_head(self, logits: np.ndarray, doc_logprior: np.ndarray | None, beam_scores: np.ndarray,
                 banned: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """The fused head on logits the decoder wrote: the RAG-Token head (``doc_logprior`` given) or
        RAG-Sequence's beam step (None), whichever graph this export has."""
        io = self.head.io_binding()
        io.bind_ortvalue_input(C.LOGITS, _value(logits, self._device))
        if doc_logprior is not None:
            io.bind_cpu_input(C.DOC_LOGPRIOR, np.ascontiguousarray(doc_logprior, dtype=np.float32))
        io.bind_cpu_input(C.BEAM_SCORES, np.ascontiguousarray(beam_scores, dtype=np.float32))
        io.bind_cpu_input(C.BANNED, np.ascontiguousarray(banned, dtype=np.int64))
        io.bind_cpu_input(C.TOP_K, np.array([keep], dtype=np.int64))
        io.bind_output(C.TOP_SCORES, "cpu")
        io.bind_output(C.TOP_IDS, "cpu")
        self.head.run_with_iobinding(io)
        out = dict(zip((C.TOP_SCORES, C.TOP_IDS), io.copy_outputs_to_cpu(), strict=True))  # in the order bound
        return out[C.TOP_SCORES], out[C.TOP_IDS]

    def label_logprobs_many(self, requests: list[tuple[EncoderState, np.ndarray, np.ndarray]], max_tokens: int
                            ) -> list[tuple[np.ndarray, np.ndarray]]:
        """RAG-Sequence rescoring for several questions: each request's candidates [n, L] teacher-forced
        against each of its encoder rows (its rescoring passages), one decoder call per passage index for
        all requests together (split so a call holds at most ``max_tokens`` positions). Per request: the
        labels' log-probabilities and the sums of all log-probabilities, each [passages, n, L]."""
        out = [(np.empty((len(s.mask), len(c), c.shape[1]), np.float32),
                np.empty((len(s.mask), len(c), c.shape[1]), np.float32)) for s, c, _ in requests]
        passages = max(len(s.mask) for s, _, _ in requests)
        for d in range(passages):
            members = [i for i, (s, _, _) in enumerate(requests) if d < len(s.mask)]
            for chunk in _chunks(members, [requests[i][1].size for i in members], max_tokens):
                picked, sums = self._teacher_force([self.select(requests[i][0], np.array([d])) for i in chunk],
                                                   [requests[i][1] for i in chunk], [requests[i][2] for i in chunk])
                for i, p, s in zip(chunk, picked, sums, strict=True):
                    out[i][0][d], out[i][1][d] = p, s
        return out

    def teacher_forced(self, states: list[EncoderState], sequences: list[np.ndarray]) -> np.ndarray:
        """Each group of sequences ([n, L] each) teacher-forced against its one encoder row, in one decoder
        call with an empty cache: the logits [sum of n, max L, vocab] (rows after a group's own length are
        padding)."""
        width = max(s.mask.shape[1] for s in states)
        length = max(q.shape[1] for q in sequences)
        counts = [len(q) for q in sequences]
        rows, fold = sum(counts), max(counts)
        cross = [np.zeros((len(states), kv.shape[1], width, kv.shape[3]), dtype=kv.dtype) for kv in states[0].cross]
        mask = np.zeros((len(states), width), dtype=np.int64)
        ids = np.zeros((rows, length), dtype=np.int64)  # after a sequence's end: padding nobody reads
        slots = np.zeros((len(states), fold), dtype=np.int64)  # an empty slot reads row 0, unread
        row_slots = np.empty(rows, dtype=np.int64)
        at = 0
        for e, (state, seqs) in enumerate(zip(states, sequences, strict=True)):
            w = state.mask.shape[1]
            for buf, kv in zip(cross, state.cross, strict=True):
                buf[e, :, :w] = kv[0]
            mask[e, :w] = state.mask[0]
            n = len(seqs)
            ids[at : at + n, : seqs.shape[1]] = seqs
            slots[e, :n] = np.arange(at, at + n)
            row_slots[at : at + n] = e * fold + np.arange(n)
            at += n
        d = self.dims
        empty = [np.zeros((1, d.heads, 0, d.head_dim), dtype=self.kv_dtype)] * len(self.past_names)
        feeds = {C.DECODER_INPUT_IDS: ids, C.POSITIONS: np.zeros(rows, dtype=np.int64),
                 C.BEAM_IDX: np.zeros(rows, dtype=np.int64), C.CROSS_QUERY_ROWS: slots, C.DECODER_SLOTS: row_slots,
                 C.ENCODER_ATTENTION_MASK: mask, **dict(zip(self.cross_names, cross, strict=True))}
        return self.run_decoder(feeds, empty, None, None)

    def _teacher_force(self, states: list[EncoderState], sequences: list[np.ndarray], labels: list[np.ndarray]):
        """Label log-probabilities and log-probability sums per group, [n, L] each (see
        :meth:`teacher_forced`); with the scorer graph the logits never leave the device."""
        logits = self.teacher_forced(states, sequences)
        tgt = np.zeros(logits.shape[:2], dtype=np.int64)
        at = 0
        for lab in labels:
            tgt[at : at + len(lab), : lab.shape[1]] = lab
            at += len(lab)
        if self.scorer is None:  # exports made before the scorer graph: the host computes it
            lp = log_softmax(logits.astype(np.float32))
            picked, sums = np.take_along_axis(lp, tgt[:, :, None], axis=2)[:, :, 0], lp.sum(axis=2)
        else:
            io = self.scorer.io_binding()
            io.bind_ortvalue_input(C.LOGITS, _value(logits, self._device))
            io.bind_cpu_input(C.LABELS, tgt)
            io.bind_output(C.LABEL_LOGPROBS, "cpu")
            io.bind_output(C.LOGPROB_SUMS, "cpu")
            self.scorer.run_with_iobinding(io)
            out = dict(zip((C.LABEL_LOGPROBS, C.LOGPROB_SUMS), io.copy_outputs_to_cpu(), strict=True))
            picked, sums = out[C.LABEL_LOGPROBS], out[C.LOGPROB_SUMS]
        splits = np.cumsum([len(q) for q in sequences])[:-1]
        return ([p[:, : q.shape[1]] for p, q in zip(np.split(picked, splits), sequences, strict=True)],
                [s[:, : q.shape[1]] for s, q in zip(np.split(sums, splits), sequences, strict=True)])


def _chunks(items: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """``items`` in order, grouped so each group's sizes sum to at most ``limit`` (one item at least)."""
    groups, current, total = [], [], 0
    for item, size in zip(items, sizes, strict=True):
        if current and total + size > limit:
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += size
    return groups + ([current] if current else [])


class _Store:
    """Flat memory, allocated once and grown when needed, viewed as a contiguous array of whatever shape
    fits: a cache of another length is a new view of the same memory, not a new allocation (fresh pages
    cost a page fault on first write, which in a decode loop is most of a copy's cost). It starts zeroed
    and only ever holds model outputs, so the positions a mask hides are finite (a NaN there would survive
    the mask)."""

    def __init__(self, dtype, growth: list[int]):
        self.data = np.zeros(0, dtype)
        self._growth = growth  # shared by a batch's stores: counts reallocations (views taken before go stale)

    def view(self, shape: tuple[int, ...], keep: int = 0) -> np.ndarray:
        """The first ``prod(shape)`` elements as an array of ``shape``, growing the memory if needed (its
        first ``keep`` elements carried over)."""
        size = int(np.prod(shape))
        if size > self.data.size:
            grown = np.zeros(max(size, 2 * self.data.size), self.data.dtype)
            grown[:keep] = self.data[:keep]
            self.data = grown
            self._growth[0] += 1
        return self.data[:size].reshape(shape)


class DecodeBatch:
    """The running decode's buffers, reused from step to step (and, through the generator's pool, from
    one ``generate`` call to the next).

    Attributes:
        encoder_rows: Passages in the cross-attention buffer (rows ``0 .. encoder_rows - 1``).
        rows: Decoder rows of the last call (the cache rows the next call may continue).
        cache_length: Positions the slot buffers hold per row.
    """

    def __init__(self, gen: OnnxGenerator, max_rows: int):
        self._gen, self.max_rows = gen, max_rows
        d = gen.dims
        self._heads, self._dim = d.heads, d.head_dim
        n = len(gen.past_names)
        self._growth = [0]
        self._cross = [_Store(gen.kv_dtype, self._growth) for _ in range(n)]
        self._mask = _Store(np.int64, self._growth)
        self._slots = [[_Store(gen.kv_dtype, self._growth) for _ in range(n)] for _ in range(2)]
        self._new = [_Store(gen.kv_dtype, self._growth) for _ in range(n)]
        self._logits = _Store(gen.logits_dtype, self._growth)
        # The decoder's bindings per layout (slot set, rows, lengths): a step whose shapes did not change binds
        # only its token ids, positions and row maps (the buffers' own bindings are kept).
        self._bound: dict[tuple, tuple] = {}
        self.reset()

    def reset(self) -> None:
        """Empty, keeping the memory."""
        self.encoder_rows, self.rows, self.cache_length, self.source_length = 0, 0, 0, 0
        self._widths = np.zeros(0, dtype=np.int64)
        self._cur = 0

    # -- encoder rows ---------------------------------------------------------------------------------

    def _cross_views(self, rows: int, width: int, keep: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
        shape = (rows, self._heads, width, self._dim)
        return ([s.view(shape, keep * self._heads * width * self._dim) for s in self._cross],
                self._mask.view((rows, width), keep * width))

    def add_encoder_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> int:
        """Encode contexts and append their cross K/V; returns the first new encoder row."""
        state = self._gen.encode_rows(input_ids, attention_mask)
        n, width = state.mask.shape
        first = self.encoder_rows
        if width > self.source_length:
            self._relayout_cross(width)
        cross, mask = self._cross_views(first + n, self.source_length, keep=first)
        for buf, kv in zip(cross, state.cross, strict=True):
            buf[first:, :, :width] = kv
        mask[first:] = 0
        mask[first:, :width] = state.mask
        self._widths = np.concatenate([self._widths[:first], state.mask.sum(axis=1)])
        self.encoder_rows += n
        return first

    def encoder_state(self, first: int, count: int) -> EncoderState:
        """A copy of ``count`` encoder rows from ``first``, at their own width."""
        width = int(self._widths[first : first + count].max())
        cross, mask = self._cross_views(self.encoder_rows, self.source_length)
        return EncoderState([buf[first : first + count, :, :width].copy() for buf in cross],
                            mask[first : first + count, :width].copy())

    def remove_encoder_rows(self, first: int, count: int) -> None:
        """Drop ``count`` encoder rows from ``first`` (later rows move down)."""
        end = self.encoder_rows
        cross, mask = self._cross_views(end, self.source_length)
        for buf in (*cross, mask):
            buf[first : end - count] = buf[first + count : end]
        self._widths = np.delete(self._widths[:end], np.arange(first, first + count))
        self.encoder_rows -= count

    def _relayout_cross(self, width: int) -> None:
        """The cross-attention buffer with another source length (its rows copied over)."""
        rows, old = self.encoder_rows, self.source_length
        if rows:
            cross, mask = self._cross_views(rows, old)
            saved, saved_mask = [c.copy() for c in cross], mask.copy()
            cross, mask = self._cross_views(rows, width)
            keep = min(old, width)
            for buf, prev in zip(cross, saved, strict=True):
                buf[:, :, :keep] = prev[:, :, :keep]
            mask[:] = 0
            mask[:, :keep] = saved_mask[:, :keep]
        self.source_length = width

    # -- decoder steps --------------------------------------------------------------------------------

    def decode(self, tokens: np.ndarray, positions: np.ndarray, beam_idx: np.ndarray, cross_query_rows: np.ndarray,
               decoder_slots: np.ndarray) -> np.ndarray:
        """One decoder call: row ``i`` feeds ``tokens[i]`` at ``positions[i]``, continuing cache row
        ``beam_idx[i]`` of the last call. Returns the logits [rows, vocab] (valid until the next call)."""
        gen, rows = self._gen, len(tokens)
        self._fit_cache(int(positions.max()) + 1)
        self._fit_cross()
        small = {C.DECODER_INPUT_IDS: tokens.reshape(rows, 1), C.POSITIONS: positions, C.BEAM_IDX: beam_idx,
                 C.CROSS_QUERY_ROWS: cross_query_rows, C.DECODER_SLOTS: decoder_slots}
        if gen.device != "cpu":  # staged through the host (see OnnxGenerator)
            past, present, new, logits = self._views(rows)
            gen.run_decoder({**small, **self._cross_feeds()}, past, present, new, logits)
        else:
            io, present, new, logits = self._binding(rows)
            for name, array in small.items():
                io.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
            gen.decoder.run_with_iobinding(io)
        # The new keys and values at each row's position; rows of one question share it (basic slicing).
        edges = np.flatnonzero(np.diff(positions)) + 1
        for start, end in zip(np.r_[0, edges], np.r_[edges, rows], strict=True):
            at = int(positions[start])
            for buf, kv in zip(present, new, strict=True):
                buf[start:end, :, at] = kv[start:end, :, 0]
        self._cur, self.rows = 1 - self._cur, rows
        return logits[:, 0]

    def _views(self, rows: int):
        """This call's past (read), present (written), new keys/values and logits arrays."""
        length, past_rows = self.cache_length, max(self.rows, 1)
        shape = (self._heads, length, self._dim)
        return ([s.view((past_rows, *shape)) for s in self._slots[self._cur]],
                [s.view((rows, *shape)) for s in self._slots[1 - self._cur]],
                [s.view((rows, self._heads, 1, self._dim)) for s in self._new],
                self._logits.view((rows, 1, self._gen.vocab)))

    def _cross_feeds(self) -> dict:
        cross, mask = self._cross_views(self.encoder_rows, self.source_length)
        return {C.ENCODER_ATTENTION_MASK: mask, **dict(zip(self._gen.cross_names, cross, strict=True))}

    def _binding(self, rows: int):
        """The decoder's IOBinding for this call's layout, its buffers bound (kept while the layout lasts)."""
        key = (self._cur, rows, max(self.rows, 1), self.cache_length, self.encoder_rows, self.source_length)
        entry = self._bound.get(key)
        if entry is None or entry[0] != self._growth[0]:
            gen = self._gen
            past, present, new, logits = self._views(rows)
            io = gen.decoder.io_binding()
            value = _ort().OrtValue.ortvalue_from_numpy
            for name, array in (*zip(gen.past_names, past, strict=True), *self._cross_feeds().items()):
                io.bind_ortvalue_input(name, value(array))
            for name, array in ((C.LOGITS, logits), *zip(gen.present_names, present, strict=True),
                                *zip(gen.new_names, new, strict=True)):
                io.bind_ortvalue_output(name, value(array))
            if len(self._bound) > 8:  # layouts come and go as questions join and leave
                self._bound.clear()
            entry = self._bound[key] = (self._growth[0], io, present, new, logits)
        return entry[1:]

    def head(self, rows: slice) -> _Head:
        """The fused head over ``rows`` of the last call's logits."""
        return _Head(self._gen, self._logits.view((self.rows, 1, self._gen.vocab))[rows])

    def _fit_cache(self, length: int) -> None:
        """Cache slots of at least ``length`` positions: a new length (grown, or shrunk when twice what is
        needed) in chunks, the rows the next call continues carried over into the other slot set."""
        want = -(-length // CACHE_CHUNK) * CACHE_CHUNK
        old = self.cache_length
        if old >= length and old <= 2 * want:
            return
        rows = max(self.rows, 1)
        keep = min(old, want)
        for src, dst in zip(self._slots[self._cur], self._slots[1 - self._cur], strict=True):
            before = src.view((rows, self._heads, old, self._dim))
            after = dst.view((rows, self._heads, want, self._dim))
            after[:, :, :keep] = before[:, :, :keep]
        self._cur, self.cache_length = 1 - self._cur, want

    def _fit_cross(self) -> None:
        """Shrink the cross-attention buffer's source length once the longest passages have left."""
        width = int(self._widths[: self.encoder_rows].max()) if self.encoder_rows else 0
        if self.source_length > max(2 * width, 64):
            self._relayout_cross(width)


class _Head:
    """:class:`rag_runtime.decoding.rag.FusedHead` (or the beam step) over one question's rows of the
    decoder's logits."""

    def __init__(self, gen: OnnxGenerator, logits: np.ndarray):
        self._gen, self._logits, self.vocab = gen, logits, gen.vocab

    def __call__(self, doc_logprior, beam_scores, banned, keep):
        return self._gen.run_head(self._logits, doc_logprior, beam_scores, banned, keep)
