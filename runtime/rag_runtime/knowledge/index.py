"""Search a knowledge index: faiss (CPU, or GPU when faiss has GPUs), shards, exact doc scores."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .. import constants as C
from ..errors import ArtifactError, InvalidOptionError, require
from .store import IndexMeta, PassageStore

logger = logging.getLogger(__name__)

EXACT_FACTORIES = ("Flat", "IndexFlatIP", "IndexFlatL2", "IndexFlat")


def _faiss():
    return require("faiss", "cpu", "a knowledge index (retrieval)")


def gpu_float16(factory: str, rerank: int) -> bool:
    """Whether a GPU copy of a ``factory`` index may hold fp16 (faiss' ``GpuClonerOptions.useFloat16``).

    For Flat and IVF-Flat indexes the flag stores the vectors themselves in fp16, so distances (and the
    order of near passages) would differ from the CPU's fp32 search; only PQ codes' lookup tables, already
    an approximation, or an index whose candidates are re-ranked by exact inner products afterwards can
    take fp16 without changing what is retrieved."""
    return "PQ" in factory.upper() or rerank > 1


class KnowledgeIndex:
    """Passages, their embeddings and faiss shards over them (see :mod:`rag_runtime.knowledge.store`).

    Doc scores are exact inner products between the question vector and the stored embeddings, as
    transformers' RagRetriever computes them; an index built without stored embeddings scores with
    faiss' own distances instead (exact for Flat, approximate for PQ).

    Args:
        root: Index directory.
        device: ``"cuda"`` puts the faiss index on the GPUs faiss sees (one shard per GPU, round robin;
            fp16 lookup tables for PQ); without GPU faiss it stays on the CPU, with a warning.
        nprobe: Inverted lists visited per query (IVF indexes).
        ef_search: Candidate list size (HNSW indexes).
        rerank: For approximate indexes with stored embeddings, fetch ``rerank * n_docs`` candidates and
            keep the best ``n_docs`` by exact inner product (default 4; 1 turns it off).
    """

    def __init__(self, root: str | Path, device: str = "cpu", *, nprobe: int | None = None,
                 ef_search: int | None = None, rerank: int | None = None):
        faiss = _faiss()
        self.root = Path(root)
        self.meta = IndexMeta.load(self.root)
        self.count, self.dim = self.meta.count, self.meta.dim
        shards = []
        for name in self.meta.shards:
            try:
                shards.append(faiss.read_index(str(self.root / name)))
            except RuntimeError as e:
                raise ArtifactError(f"cannot read faiss index {self.root / name}: {str(e).splitlines()[0]}") from e
        self._phi = self.meta.mips_phi
        faiss_dim = self.dim + (self._phi is not None)
        if sum(s.ntotal for s in shards) != self.count or any(s.d != faiss_dim for s in shards):
            raise ArtifactError(f"knowledge index in {self.root} is inconsistent: faiss holds "
                                f"{sum(s.ntotal for s in shards)} vectors of dim {shards[0].d}, index.json says "
                                f"{self.count} of dim {self.dim}")
        self.embeddings = (np.load(self.root / C.INDEX_EMBEDDINGS_FILE, mmap_mode="r")
                           if self.meta.embeddings else None)
        self.passages = PassageStore(self.root)
        exact = self.meta.factory in EXACT_FACTORIES
        self.rerank = 1 if exact or self.embeddings is None else max(1, rerank if rerank is not None else 4)
        self.device = "cpu"
        if device == "cuda":
            shards = self._to_gpu(faiss, shards)
        if len(shards) == 1:
            self.index = shards[0]
        else:
            self.index = faiss.IndexShards(faiss_dim, True, True)  # threaded, successive ids
            for s in shards:
                self.index.add_shard(s)
            self._shards = shards  # IndexShards does not own them
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)
        logger.info("knowledge index: %d passages, dim %d, %s in %d shard(s), faiss on %s", self.count,
                    self.dim, self.meta.factory, len(shards), self.device)

    def _to_gpu(self, faiss, shards: list) -> list:
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if not hasattr(faiss, "StandardGpuResources") or gpus == 0:
            logger.warning("faiss has no GPU support here (faiss-cpu build): searching on the CPU")
            return shards
        options = faiss.GpuClonerOptions()
        options.useFloat16 = gpu_float16(self.meta.factory, self.rerank)
        self._gpu_resources = [faiss.StandardGpuResources() for _ in range(min(gpus, len(shards)))]
        try:
            moved = [faiss.index_cpu_to_gpu(self._gpu_resources[i % gpus], i % gpus, s, options)
                     for i, s in enumerate(shards)]
        except RuntimeError as e:  # e.g. HNSW and PQ fast-scan have no GPU version
            logger.warning("faiss cannot move %s to the GPU (%s): searching on the CPU; Flat, IVF-Flat, "
                           "IVF-SQ and 8-bit IVF-PQ indexes run on GPUs", self.meta.factory, str(e).splitlines()[0])
            return shards
        self.device = "cuda"
        logger.info("faiss: %d shard(s) on %d GPU(s), %s", len(moved), gpus,
                    "fp16 (PQ lookup tables, or re-ranked by exact scores)" if options.useFloat16 else "fp32 vectors")
        return moved

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set IVF ``nprobe`` / HNSW ``efSearch`` on every shard that has them."""
        faiss = _faiss()
        shards = getattr(self, "_shards", [self.index])
        for s in shards:
            if nprobe is not None:
                ivf = faiss.try_extract_index_ivf(s) if hasattr(faiss, "try_extract_index_ivf") else None
                if ivf is None:
                    raise InvalidOptionError(f"nprobe applies to IVF indexes; this one is {self.meta.factory}")
                ivf.nprobe = int(nprobe)
            if ef_search is not None:
                hnsw = getattr(faiss.downcast_index(s), "hnsw", None)
                if hnsw is None:
                    raise InvalidOptionError(f"ef_search applies to HNSW indexes; this one is {self.meta.factory}")
                hnsw.efSearch = int(ef_search)

    def search(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n_docs`` doc ids [batch, n_docs] and their scores [batch, n_docs] (float32)."""
        if n_docs > self.count:
            raise InvalidOptionError(f"n_docs={n_docs} exceeds the {self.count} passages in the index")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        fetch = min(self.count, n_docs * self.rerank)
        if self._phi is None:
            distances, ids = self.index.search(queries, fetch)
        else:  # L2 over augmented vectors: |q - x|^2 = |q|^2 + phi^2 - 2 q.x
            padded = np.hstack([queries, np.zeros((len(queries), 1), dtype=np.float32)])
            distances, ids = self.index.search(padded, fetch)
            norms = np.einsum("bd,bd->b", queries, queries)[:, None]
            distances = (norms + self._phi**2 - distances) / 2
        if (ids[:, :n_docs] < 0).any():
            raise ArtifactError(f"the faiss index returned fewer than n_docs={n_docs} results; raise nprobe / "
                                "ef_search")
        if self.embeddings is None:
            return ids, distances.astype(np.float32)
        safe = np.where(ids < 0, ids[:, :1], ids)
        vectors = np.asarray(self.embeddings[safe.reshape(-1)], dtype=np.float32).reshape(*ids.shape, self.dim)
        scores = np.einsum("bd,bnd->bn", queries, vectors).astype(np.float32)
        if fetch == n_docs:
            return ids, scores
        scores[ids < 0] = -np.inf
        best = np.argsort(-scores, axis=1, kind="stable")[:, :n_docs]
        return np.take_along_axis(ids, best, 1), np.take_along_axis(scores, best, 1)

    def passage(self, doc_id: int) -> dict:
        return self.passages[doc_id]
