"""Tokenizers from ``tokenizer.json`` behaving like the transformers fast tokenizers they came from."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .artifact import TokenizerFile

logger = logging.getLogger(__name__)

_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the transformers-side settings the manifest recorded.

    Not thread-safe: encoding switches truncation on and off; give each thread its own pipeline.
    """

    def __init__(self, path: str | Path, info: TokenizerFile):
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_token_id = info.pad_token_id
        self.cleanup = bool(info.clean_up_tokenization_spaces)
        self.model_max_length = int(info.model_max_length or 512)

    def encode(self, texts: list[str] | list[tuple[str, str]], max_length: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize with special tokens, truncate to ``max_length`` (as transformers' ``truncation=True``
        does, through the same library call), right-pad to the longest row. ``(a, b)`` tuples are encoded
        as pairs (DPR passages: title, text), truncated longest-first."""
        if max_length is not None:
            self._tok.enable_truncation(max_length)
        try:
            ids = [e.ids for e in self._tok.encode_batch(texts)]
        finally:
            self._tok.no_truncation()
        width = max((len(r) for r in ids), default=0)
        out = np.full((len(ids), width), self.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, r in enumerate(ids):
            out[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return out, mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.cleanup:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text
