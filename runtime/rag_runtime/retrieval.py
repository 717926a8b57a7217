"""The knowledge index: faiss search plus the memory-mapped passage store and embeddings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from . import constants as C
from .errors import ArtifactError

logger = logging.getLogger(__name__)


class KnowledgeIndex:
    """Passages, their embeddings and a faiss index over them, as written by rag-export.

    Doc scores are exact inner products between the question vector and the stored embeddings, as
    transformers' RagRetriever computes them.
    """

    def __init__(self, index_dir: str | Path, device: str = "cpu"):
        import faiss

        root = Path(index_dir)
        for name in (C.INDEX_FAISS_FILE, C.INDEX_EMBEDDINGS_FILE, C.INDEX_PASSAGES_FILE, C.INDEX_OFFSETS_FILE):
            if not (root / name).is_file():
                raise ArtifactError(f"knowledge index file {root / name} is missing")
        try:
            self.index = faiss.read_index(str(root / C.INDEX_FAISS_FILE))
        except RuntimeError as e:
            raise ArtifactError(f"cannot read faiss index {root / C.INDEX_FAISS_FILE}: {e}") from e
        self.embeddings = np.load(root / C.INDEX_EMBEDDINGS_FILE, mmap_mode="r")
        self.offsets = np.load(root / C.INDEX_OFFSETS_FILE)
        self._passages = open(root / C.INDEX_PASSAGES_FILE, "rb")  # noqa: SIM115 -- lives with the index
        self.count, self.dim = self.embeddings.shape
        if self.index.ntotal != self.count or len(self.offsets) != self.count + 1:
            raise ArtifactError(f"knowledge index in {root} is inconsistent: {self.index.ntotal} vectors, "
                                f"{self.count} embeddings, {len(self.offsets) - 1} passages")
        self.device = "cpu"
        if device == "cuda":
            self._to_gpu(faiss)
        logger.info("knowledge index: %d passages, dim %d, faiss on %s", self.count, self.dim, self.device)

    def _to_gpu(self, faiss) -> None:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            logger.warning("faiss has no GPU support here (faiss-cpu build); searching on the CPU")
            return
        self._gpu_res = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True  # fp16 lookup tables for PQ indexes; exact scores come from embeddings
        self.index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index, options)
        self.device = "cuda"

    def search(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n_docs`` ids [batch, n_docs] and their stored embeddings [batch, n_docs, dim]."""
        if n_docs > self.count:
            raise ValueError(f"n_docs={n_docs} exceeds the {self.count} passages in the index")
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n_docs)
        if (ids < 0).any():
            raise ArtifactError(f"the faiss index returned fewer than n_docs={n_docs} results")
        return ids, np.asarray(self.embeddings[ids.reshape(-1)], dtype=np.float32).reshape(*ids.shape, self.dim)

    def passage(self, doc_id: int) -> dict:
        start, end = int(self.offsets[doc_id]), int(self.offsets[doc_id + 1])
        self._passages.seek(start)
        return json.loads(self._passages.read(end - start))
