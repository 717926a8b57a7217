"""Passage embeddings from an export's ``context_encoder.onnx`` (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import constants as C
from ..artifact import Manifest
from ..errors import ArtifactError
from ..files import sha256_file
from ..graph_io import GraphIO
from ..sessions import create_session
from ..tokenization import TextTokenizer


class ContextEncoder:
    """DPR context encoder: ``(title, text)`` pairs -> [n, dim] float32, as transformers' RAG
    custom-knowledge example embeds them (``tokenizer(titles, texts, truncation=True, padding="longest")``).

    Attributes:
        dim: Embedding dimension.
        identity: ``{"source", "sha256", "dim"}``, recorded in the index it helps build.
    """

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int | None = None):
        root = Path(export_dir)
        manifest = Manifest.load(root, verify=False)
        graph = manifest.graphs.get(C.CONTEXT_ENCODER)
        tok = manifest.tokenizers.get(C.CONTEXT_TOKENIZER)
        if graph is None or tok is None:
            raise ArtifactError(f"{root} has no context encoder: export with `rag-export MODEL OUT "
                                "--context-encoder DPR_CONTEXT_ENCODER`")
        path = root / graph.file
        digest = sha256_file(path)
        if digest != graph.sha256:
            raise ArtifactError(f"{path} does not match its sha256 in the manifest: corrupted or replaced")
        self._io = GraphIO(C.CONTEXT_ENCODER, graph)
        self._io.require(C.INPUT_IDS, C.ATTENTION_MASK, C.PASSAGE_EMBEDDING)
        self.session = create_session(path, device, threads)
        self.tokenizer = TextTokenizer(root / tok.file, tok)
        self.dim = int(next(o.shape[-1] for o in self.session.get_outputs() if o.name == C.PASSAGE_EMBEDDING))
        self.identity = {"source": manifest.context_encoder_source or manifest.source,
                         "sha256": digest, "dim": self.dim}

    def embed(self, titles: list[str], texts: list[str]) -> np.ndarray:
        ids, mask = self.tokenizer.encode(list(zip(titles, texts, strict=True)),
                                          max_length=self.tokenizer.model_max_length)
        out = self._io.run(self.session, {C.INPUT_IDS: ids, C.ATTENTION_MASK: mask}, [C.PASSAGE_EMBEDDING])
        return out[C.PASSAGE_EMBEDDING].astype(np.float32, copy=False)
