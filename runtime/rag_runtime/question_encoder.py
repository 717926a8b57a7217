"""Stage 1: questions -> DPR question embeddings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import constants as C
from .artifact import GraphFile, Manifest
from .graph_io import GraphIO
from .sessions import create_session
from .tokenization import TextTokenizer

logger = logging.getLogger(__name__)


class QuestionEncoder:
    """The exported DPR question encoder and its tokenizer.

    Args:
        session: The graph's onnxruntime session.
        tokenizer: The question tokenizer.
        graph: The graph's manifest entry (its IO is bound by the names it declares).

    Attributes:
        tokenizer: The question tokenizer (contextualization decodes questions with it too).
    """

    def __init__(self, session, tokenizer: TextTokenizer, graph: GraphFile):
        self._session, self.tokenizer = session, tokenizer
        self._io = GraphIO(C.QUESTION_ENCODER, graph)
        self._io.require(C.INPUT_IDS, C.ATTENTION_MASK, C.QUESTION_EMBEDDING)

    @classmethod
    def load(cls, export_dir: Path, manifest: Manifest, device: str = "cpu",
             threads: int | None = None) -> QuestionEncoder:
        """The question encoder of an export, on its own (searching an index needs nothing else)."""
        tok = manifest.tokenizers[C.QUESTION_TOKENIZER]
        graph = manifest.graph(C.QUESTION_ENCODER)
        return cls(create_session(export_dir / graph.file, device, threads), TextTokenizer(export_dir / tok.file, tok),
                   graph)

    def encode(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [batch, len] (truncated like the reference, with a warning) and embeddings [batch, dim]."""
        tok = self.tokenizer
        ids, mask = tok.encode(questions)
        if ids.shape[1] > tok.model_max_length:
            logger.warning("question longer than %d tokens: truncated", tok.model_max_length)
            ids, mask = tok.encode(questions, max_length=tok.model_max_length)
        out = self._io.run(self._session, {C.INPUT_IDS: ids, C.ATTENTION_MASK: mask}, [C.QUESTION_EMBEDDING])
        return ids, out[C.QUESTION_EMBEDDING]
