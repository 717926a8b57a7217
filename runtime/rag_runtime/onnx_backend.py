"""onnxruntime sessions for the exported graphs, and the generator backend the decoders drive."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import constants as C
from .errors import ArtifactError

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("rag_runtime needs onnxruntime: pip install 'rag-export[cpu]' (or '[gpu]' for CUDA)") from e
    return onnxruntime


def providers_for(device: str) -> list[str]:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = _ort().get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ValueError(
            "device='cuda' needs onnxruntime-gpu, but this onnxruntime has only "
            f"{', '.join(available)}: pip uninstall onnxruntime && pip install 'rag-export[gpu]'"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def create_session(path: Path, device: str, threads: int | None = None):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers_for(device))
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        if isinstance(e, ValueError) and "device=" in str(e):
            raise
        raise ArtifactError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from e


@dataclass
class EncoderState:
    """Cross-attention K/V [layers, enc_rows, heads, src, head_dim] and the source mask [enc_rows, src]."""

    keys: np.ndarray
    values: np.ndarray
    mask: np.ndarray


@dataclass
class DecodeSession:
    state: EncoderState
    past_keys: np.ndarray
    past_values: np.ndarray


class OnnxGenerator:
    """The exported generator encoder + decoder behind the ``GeneratorBackend`` protocol."""

    def __init__(self, encoder, decoder, dims: dict):
        self.encoder, self.decoder, self.dims = encoder, decoder, dims

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncoderState:
        _, keys, values = self.encoder.run(None, {C.INPUT_IDS: input_ids, C.ATTENTION_MASK: attention_mask})
        return EncoderState(keys, values, attention_mask)

    def select(self, state: EncoderState, rows: np.ndarray) -> EncoderState:
        return EncoderState(state.keys[:, rows], state.values[:, rows], state.mask[rows])

    def _empty_past(self, rows: int) -> np.ndarray:
        d = self.dims
        return np.zeros((d["layers"], rows, d["heads"], 0, d["head_dim"]), dtype=np.float32)

    def start(self, state: EncoderState, beams: int) -> DecodeSession:
        rows = state.mask.shape[0] * beams
        return DecodeSession(state, self._empty_past(rows), self._empty_past(rows))

    def _run(self, state: EncoderState, ids: np.ndarray, past_k: np.ndarray, past_v: np.ndarray):
        return self.decoder.run(None, {
            C.DECODER_INPUT_IDS: ids, C.PAST_KEYS: past_k, C.PAST_VALUES: past_v,
            C.CROSS_KEYS: state.keys, C.CROSS_VALUES: state.values, C.ENCODER_ATTENTION_MASK: state.mask,
        })

    def step(self, session: DecodeSession, tokens: np.ndarray) -> np.ndarray:
        logits, session.past_keys, session.past_values = self._run(
            session.state, np.ascontiguousarray(tokens, dtype=np.int64), session.past_keys, session.past_values)
        return logits[:, -1]

    def reorder(self, session: DecodeSession, rows: np.ndarray) -> None:
        if not np.array_equal(rows, np.arange(len(rows))):
            session.past_keys = session.past_keys[:, rows]
            session.past_values = session.past_values[:, rows]

    def score(self, state: EncoderState, sequences: np.ndarray) -> np.ndarray:
        rows = state.mask.shape[0] * sequences.shape[0]
        ids = np.tile(sequences.astype(np.int64), (state.mask.shape[0], 1))
        empty = self._empty_past(rows)
        return self._run(state, ids, empty, empty)[0]
