"""Stage 2: question embeddings -> passages, from the export's knowledge index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import IndexUnavailableError
from .knowledge import KnowledgeIndex
from .results import Document


class Retriever:
    """Top-``n_docs`` passages per question, with exact inner-product scores.

    Attributes:
        index: The knowledge index, or None when the export has none (then only
            ``generate_from_context`` works).
    """

    def __init__(self, index: KnowledgeIndex | None, export_dir: Path):
        self.index, self._export_dir = index, export_dir

    def require_index(self) -> KnowledgeIndex:
        if self.index is None:
            raise IndexUnavailableError(
                f"{self._export_dir} has no knowledge index, so questions cannot be answered by retrieval: build "
                "one and attach it (`rag-index attach`), or give the passages to answer from (rag-generate "
                "--passages FILE, RagPipeline.generate_from_passages)")
        return self.index

    def search(self, embeddings: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """Doc ids and scores, each [batch, n_docs], best first."""
        return self.require_index().search(embeddings, n_docs)

    def passage(self, doc_id: int) -> dict:
        return self.require_index().passage(int(doc_id))

    def documents(self, doc_ids: np.ndarray, scores: np.ndarray) -> list[Document]:
        """One question's passages as :class:`Document` results."""
        docs = []
        for doc_id, score in zip(doc_ids, scores, strict=True):
            p = self.passage(int(doc_id))
            docs.append(Document(int(doc_id), p["title"], p["text"], float(score), p.get("id")))
        return docs
