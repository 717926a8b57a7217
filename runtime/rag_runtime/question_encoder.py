"""Stage 1: questions -> DPR question embeddings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import constants as C
from .artifact import Manifest
from .sessions import create_session
from .tokenization import TextTokenizer

logger = logging.getLogger(__name__)


class QuestionEncoder:
    """The exported DPR question encoder and its tokenizer.

    Attributes:
        tokenizer: The question tokenizer (contextualization decodes questions with it too).
    """

    def __init__(self, session, tokenizer: TextTokenizer):
        self._session, self.tokenizer = session, tokenizer

    @classmethod
    def load(cls, export_dir: Path, manifest: Manifest, device: str = "cpu",
             threads: int | None = None) -> QuestionEncoder:
        """The question encoder of an export, on its own (searching an index needs nothing else)."""
        tok = manifest.tokenizers[C.QUESTION_TOKENIZER]
        session = create_session(export_dir / manifest.graph(C.QUESTION_ENCODER).file, device, threads)
        return cls(session, TextTokenizer(export_dir / tok.file, tok))

    def encode(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [batch, len] (truncated like the reference, with a warning) and embeddings [batch, dim]."""
        tok = self.tokenizer
        ids, mask = tok.encode(questions)
        if ids.shape[1] > tok.model_max_length:
            logger.warning("question longer than %d tokens: truncated", tok.model_max_length)
            ids, mask = tok.encode(questions, max_length=tok.model_max_length)
        (emb,) = self._session.run(None, {C.INPUT_IDS: ids, C.ATTENTION_MASK: mask})
        return ids, emb
