"""onnxruntime sessions for the exported graphs, and the generator backend the decoders drive."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import constants as C
from .artifact import DecoderDims
from .decoding.search import log_softmax
from .sessions import _ort, create_session, providers_for  # noqa: F401  (the last two moved to sessions)

logger = logging.getLogger(__name__)


class _Device:
    """Where onnxruntime keeps tensors for a device name, as IOBinding and OrtValue spell it."""

    def __init__(self, device: str):
        self.name, self.id = ("cuda", 0) if device == "cuda" else ("cpu", 0)

    def value(self, array: np.ndarray):
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.name, self.id)


@dataclass
class EncoderState:
    """Every layer's cross-attention keys, then every layer's values (each [enc_rows, heads, src, head_dim]),
    and the source mask [enc_rows, src], as onnxruntime values on the session's device (``mask`` also on
    the host, for shapes)."""

    cross: list
    mask_value: object
    mask: np.ndarray


@dataclass
class DecodeSession:
    """One decode's device-resident state: the self-attention cache and the pending beam reorder."""

    state: EncoderState
    rows: int
    past: list | None = None  # every layer's keys, then values (OrtValues) once the first step has run
    beam_idx: np.ndarray | None = None


class OnnxGenerator:
    """The exported generator encoder + decoder (+ RAG-Token head) behind the ``GeneratorBackend``
    protocol, driven with IOBinding on any execution provider.

    Encoder outputs, cross K/V and the self-attention KV cache stay on the session's device for the whole
    decode (onnxruntime values passed from one call to the next); beam reordering happens inside the
    decoder graph (``beam_idx``). Per step only the new token ids and the beam bookkeeping cross to the
    host: the logits ([rows, vocab]) do only when the host needs them (:meth:`step`), not on the fused
    RAG-Token path (:meth:`rag_token_candidates`).
    """

    def __init__(self, encoder, decoder, dims: DecoderDims, head=None, device: str = "cpu", scorer=None):
        self.encoder, self.decoder, self.head, self.scorer, self.dims = encoder, decoder, head, scorer, dims
        self.vocab = int(dims.vocab)
        self._device = _Device(device)
        layers = dims.layers
        self._cross_names = C.per_layer(layers, C.CROSS_KEYS, C.CROSS_VALUES)
        self._past_names = C.per_layer(layers, C.PAST_KEYS, C.PAST_VALUES)
        self._present_names = C.per_layer(layers, C.PRESENT_KEYS, C.PRESENT_VALUES)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncoderState:
        io = self.encoder.io_binding()
        io.bind_cpu_input(C.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        io.bind_cpu_input(C.ATTENTION_MASK, mask)
        for name in self._cross_names:
            io.bind_output(name, self._device.name, self._device.id)
        self.encoder.run_with_iobinding(io)
        return EncoderState(io.get_outputs(), self._device.value(mask), mask)

    def select(self, state: EncoderState, rows: np.ndarray) -> EncoderState:
        value = self._device.value
        return EncoderState([value(kv.numpy()[rows]) for kv in state.cross], value(state.mask[rows]), state.mask[rows])

    def _empty_past(self, rows: int) -> np.ndarray:
        d = self.dims
        return np.zeros((rows, d.heads, 0, d.head_dim), dtype=d.kv_dtype)

    def start(self, state: EncoderState, beams: int) -> DecodeSession:
        return DecodeSession(state, state.mask.shape[0] * beams)

    def _decode(self, session: DecodeSession, ids: np.ndarray, logits_on_host: bool):
        """One decoder call; advances the session's cache; returns the bound logits value."""
        io = self.decoder.io_binding()
        io.bind_cpu_input(C.DECODER_INPUT_IDS, np.ascontiguousarray(ids, dtype=np.int64))
        if session.past is None:
            empty = self._empty_past(session.rows)
            for name in self._past_names:
                io.bind_cpu_input(name, empty)
        else:
            for name, value in zip(self._past_names, session.past, strict=True):
                io.bind_ortvalue_input(name, value)
        beam_idx = session.beam_idx if session.beam_idx is not None else np.arange(session.rows, dtype=np.int64)
        io.bind_cpu_input(C.BEAM_IDX, beam_idx)
        state = session.state
        for name, value in zip(self._cross_names, state.cross, strict=True):
            io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_input(C.ENCODER_ATTENTION_MASK, state.mask_value)
        dev = self._device
        io.bind_output(C.LOGITS, "cpu" if logits_on_host else dev.name, 0 if logits_on_host else dev.id)
        for name in self._present_names:
            io.bind_output(name, dev.name, dev.id)
        self.decoder.run_with_iobinding(io)
        logits, *session.past = io.get_outputs()
        session.beam_idx = None
        return logits

    def step(self, session: DecodeSession, tokens: np.ndarray) -> np.ndarray:
        return self._decode(session, tokens, logits_on_host=True).numpy()[:, -1]

    def rag_token_candidates(self, session: DecodeSession, tokens: np.ndarray, doc_logprior: np.ndarray,
                             beam_scores: np.ndarray, banned: np.ndarray, keep: int
                             ) -> tuple[np.ndarray, np.ndarray]:
        logits = self._decode(session, tokens, logits_on_host=False)
        io = self.head.io_binding()
        io.bind_ortvalue_input(C.LOGITS, logits)
        io.bind_cpu_input(C.DOC_LOGPRIOR, np.ascontiguousarray(doc_logprior, dtype=np.float32))
        io.bind_cpu_input(C.BEAM_SCORES, np.ascontiguousarray(beam_scores, dtype=np.float32))
        io.bind_cpu_input(C.BANNED, np.ascontiguousarray(banned, dtype=np.int64))
        io.bind_cpu_input(C.TOP_K, np.array([keep], dtype=np.int64))
        io.bind_output(C.TOP_SCORES, "cpu")
        io.bind_output(C.TOP_IDS, "cpu")
        self.head.run_with_iobinding(io)
        scores, ids = io.copy_outputs_to_cpu()
        return scores, ids

    def reorder(self, session: DecodeSession, rows: np.ndarray) -> None:
        session.beam_idx = np.ascontiguousarray(rows, dtype=np.int64)

    def label_logprobs(self, state: EncoderState, sequences: np.ndarray, labels: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced ``n`` sequences against every encoder row (rows ordered (encoder row, sequence)):
        the log-probability of each label and the sum of all log-probabilities per position, each
        [enc_rows * n, L]. With the exported scorer the logits stay on the device."""
        enc_rows = state.mask.shape[0]
        ids = np.tile(sequences.astype(np.int64), (enc_rows, 1))
        labels = np.ascontiguousarray(np.tile(labels.astype(np.int64), (enc_rows, 1)))
        session = DecodeSession(state, enc_rows * sequences.shape[0])
        if self.scorer is None:  # exports made before the scorer graph: the host computes it
            lp = log_softmax(self._decode(session, ids, logits_on_host=True).numpy().astype(np.float32))
            return np.take_along_axis(lp, labels[:, :, None], axis=2)[:, :, 0], lp.sum(axis=2)
        logits = self._decode(session, ids, logits_on_host=False)
        io = self.scorer.io_binding()
        io.bind_ortvalue_input(C.LOGITS, logits)
        io.bind_cpu_input(C.LABELS, labels)
        io.bind_output(C.LABEL_LOGPROBS, "cpu")
        io.bind_output(C.LOGPROB_SUMS, "cpu")
        self.scorer.run_with_iobinding(io)
        picked, sums = io.copy_outputs_to_cpu()
        return picked, sums
