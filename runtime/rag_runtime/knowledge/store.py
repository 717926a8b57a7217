"""The on-disk knowledge index: passages, their embeddings and faiss shards, described by ``index.json``.

Layout of an index directory (no pickles, nothing that needs ``datasets``)::

    index.json              IndexMeta below: counts, dimension, dtypes, faiss factory, shards, file sizes
    passages.jsonl          one {"id", "title", "text"} object per line; line number = doc id
    passages.offsets.npy    int64 [count + 1] byte offsets of the lines (random access)
    embeddings.npy          float32 or float16 [count, dim], memory-mapped (exact doc scores)
    index.faiss             the faiss index (or index.0.faiss, index.1.faiss, ... for shards)

Doc ids are row numbers, as transformers' RagRetriever numbers its dataset rows; a passage's own id
from the source file is kept as ``pid``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import constants as C
from ..artifact import IndexRef
from ..errors import ArtifactError
from ..files import atomic_write_text

META_VERSION = 1


@dataclass
class IndexMeta:
    """``index.json``.

    Attributes:
        count: Passages (= vectors).
        dim: Embedding dimension.
        metric: ``inner_product`` (DPR) or ``l2``.
        factory: The faiss factory string the index was built with (or the index class, when imported).
        shards: faiss files, searched together with ids in file order.
        embeddings: dtype of ``embeddings.npy`` (``float32``/``float16``), or None when not stored (doc
            scores then come from index distances).
        encoder: Identity of the context encoder that made the embeddings (``{"source", "sha256", "dim"}``),
            None when unknown (imported knowledge bases).
        source: Where the passages came from.
        mips_phi: Set for graph indexes searched by L2 over augmented vectors: the largest embedding norm
            Φ; each vector x is stored as [x, sqrt(Φ² - |x|²)] and queries as [q, 0], so the L2 nearest
            neighbours are the largest inner products (as DPR builds its HNSW index).
        files: Byte size of every file, to catch truncated copies without hashing gigabytes.
    """

    count: int
    dim: int
    metric: str = "inner_product"
    factory: str = "Flat"
    shards: list[str] = field(default_factory=lambda: [C.INDEX_FAISS_FILE])
    embeddings: str | None = "float32"
    encoder: dict | None = None
    source: str | None = None
    mips_phi: float | None = None
    files: dict[str, int] = field(default_factory=dict)
    version: int = META_VERSION

    def save(self, root: Path) -> None:
        names = [C.INDEX_PASSAGES_FILE, C.INDEX_OFFSETS_FILE, *self.shards]
        if self.embeddings:
            names.append(C.INDEX_EMBEDDINGS_FILE)
        self.files = {n: (root / n).stat().st_size for n in names}
        atomic_write_text(root / C.INDEX_META_FILE, json.dumps(asdict(self), indent=2) + "\n")

    def manifest_entry(self, directory: str) -> IndexRef:
        """The export manifest's ``index`` entry for this index at ``directory`` (relative to the export
        directory, or absolute)."""
        return IndexRef(dir=directory, count=self.count, dim=self.dim, factory=self.factory, encoder=self.encoder)

    @classmethod
    def load(cls, root: Path) -> IndexMeta:
        """Read ``index.json`` and check every file it lists is present with its recorded size."""
        path = root / C.INDEX_META_FILE
        if not root.is_dir():
            raise ArtifactError(f"knowledge index directory {root} does not exist")
        if not path.is_file():
            raise ArtifactError(f"{root} has no {C.INDEX_META_FILE}: not a knowledge index (build one with "
                                "`rag-index build` or `rag-index import`)")
        try:
            raw = json.loads(path.read_text())
            meta = cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
        except (json.JSONDecodeError, TypeError) as e:
            raise ArtifactError(f"{path} is corrupted: {e}") from e
        if meta.version > META_VERSION:
            raise ArtifactError(f"{path} has index format {meta.version}; this runtime reads up to {META_VERSION}")
        for name, size in meta.files.items():
            f = root / name
            if not f.is_file():
                raise ArtifactError(f"knowledge index file {f} is missing; rebuild the index or restore the file")
            if f.stat().st_size != size:
                raise ArtifactError(f"knowledge index file {f} has {f.stat().st_size} bytes, {size} expected: "
                                    "truncated or replaced; rebuild the index or restore the file")
        return meta


class PassageWriter:
    """Streams passages and embeddings into an index directory; ``resume_from`` continues a partial one.

    Memory stays flat: lines are appended to ``passages.jsonl``, offsets and embeddings go to
    memory-mapped arrays sized for ``count`` rows up front.
    """

    def __init__(self, root: Path, count: int, dim: int, dtype: str = "float32", resume_from: int = 0):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.count, self.dim, self.n = root, count, dim, resume_from
        mode = "r+" if resume_from else "w+"
        self.offsets = np.lib.format.open_memmap(root / C.INDEX_OFFSETS_FILE, mode=mode, dtype=np.int64,
                                                 shape=(count + 1,))
        self.embeddings = (np.lib.format.open_memmap(root / C.INDEX_EMBEDDINGS_FILE, mode=mode,
                                                     dtype=np.dtype(dtype), shape=(count, dim))
                           if dtype else None)
        start = int(self.offsets[resume_from]) if resume_from else 0
        self._file = open(root / C.INDEX_PASSAGES_FILE, "r+b" if resume_from else "wb")  # noqa: SIM115
        self._file.truncate(start)
        self._file.seek(start)
        self.offsets[resume_from] = start

    def add(self, pids, titles, texts, vectors: np.ndarray | None) -> None:
        n = len(texts)
        if self.n + n > self.count:
            raise ArtifactError(f"more passages than the {self.count} counted")
        lines = [(json.dumps({"id": pid, "title": title, "text": text}, ensure_ascii=False) + "\n").encode()
                 for pid, title, text in zip(pids, titles, texts, strict=True)]
        sizes = np.fromiter(map(len, lines), dtype=np.int64, count=n)
        self.offsets[self.n + 1 : self.n + n + 1] = self.offsets[self.n] + np.cumsum(sizes)
        self._file.write(b"".join(lines))
        if self.embeddings is not None:
            self.embeddings[self.n : self.n + n] = vectors
        self.n += n

    def flush(self) -> None:
        """Make everything added so far durable (a resumed build restarts from here)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self.offsets.flush()
        if self.embeddings is not None:
            self.embeddings.flush()

    def close(self) -> None:
        if self.n != self.count:
            raise ArtifactError(f"wrote {self.n} passages, {self.count} counted")
        self.flush()
        self._file.close()
        del self.offsets, self.embeddings


class PassageStore:
    """Random access to the passages of an index directory."""

    def __init__(self, root: Path):
        self.offsets = np.load(root / C.INDEX_OFFSETS_FILE, mmap_mode="r")
        self._file = open(root / C.INDEX_PASSAGES_FILE, "rb")  # noqa: SIM115 -- lives with the store

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, doc_id: int) -> dict:
        start, end = int(self.offsets[doc_id]), int(self.offsets[doc_id + 1])
        self._file.seek(start)
        return json.loads(self._file.read(end - start))
