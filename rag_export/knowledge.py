"""Export a RagRetriever knowledge base into the runtime's index format (no datasets, no pickles).

Layout under ``index/``: ``passages.jsonl`` (one ``{"title", "text"}`` object per line, row = doc id),
``passages.offsets.npy`` (int64 byte offsets of each line, for random access), ``embeddings.npy``
(float32 [N, dim], memory-mappable, for exact doc scores) and ``index.faiss`` (the faiss index as written
by ``faiss.write_index``), described by ``index.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from rag_runtime import constants as C

from .errors import ExportError

logger = logging.getLogger(__name__)


def write_passage_store(out_dir: Path, rows, count: int, dim: int) -> None:
    """Stream ``(title, text, embedding)`` rows into the passage store and the embeddings file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    offsets = np.empty(count + 1, dtype=np.int64)
    emb = np.lib.format.open_memmap(out_dir / C.INDEX_EMBEDDINGS_FILE, mode="w+", dtype=np.float32,
                                    shape=(count, dim))
    pos = 0
    n = 0
    with open(out_dir / C.INDEX_PASSAGES_FILE, "wb") as f:
        for title, text, vector in rows:
            if n >= count:
                raise ExportError(f"knowledge base has more rows than announced ({count})")
            line = (json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            offsets[n] = pos
            f.write(line)
            pos += len(line)
            emb[n] = vector
            n += 1
    if n != count:
        raise ExportError(f"knowledge base has {n} rows, expected {count}")
    offsets[count] = pos
    np.save(out_dir / C.INDEX_OFFSETS_FILE, offsets)
    emb.flush()
    del emb


def export_custom_index(config, checkpoint_dir: str, out_dir: Path) -> dict:
    """Export the ``index_name="custom"`` knowledge base named by a RagConfig; returns index.json."""
    import datasets
    import faiss

    from .checkpoint import resolve_local_path

    passages = resolve_local_path(config.passages_path, checkpoint_dir)
    index_path = resolve_local_path(config.index_path, checkpoint_dir)
    for what, p in (("passages_path", passages), ("index_path", index_path)):
        if p is None or not p.exists():
            raise ExportError(f"the checkpoint's retriever {what} does not exist: {p}; fix the path in config.json "
                              "or export with --no-index")
    ds = datasets.load_from_disk(str(passages))
    missing = {"title", "text", "embeddings"} - set(ds.column_names)
    if missing:
        raise ExportError(f"knowledge base {passages} lacks columns {sorted(missing)}")
    index = faiss.read_index(str(index_path))
    count, dim = len(ds), index.d
    if index.ntotal != count:
        raise ExportError(f"faiss index {index_path} holds {index.ntotal} vectors but the passages are {count}")
    if dim != config.retrieval_vector_size:
        raise ExportError(f"faiss index dimension {dim} != retrieval_vector_size {config.retrieval_vector_size}")

    def rows():
        for batch in ds.iter(batch_size=4096):
            vectors = np.asarray(batch["embeddings"], dtype=np.float32)
            yield from zip(batch["title"], batch["text"], vectors, strict=True)

    write_passage_store(out_dir, rows(), count, dim)
    shutil.copyfile(index_path, out_dir / C.INDEX_FAISS_FILE)
    meta = {"count": count, "dim": dim, "metric": "inner_product" if index.metric_type == faiss.METRIC_INNER_PRODUCT
            else "l2", "faiss_type": type(index).__name__, "source": str(passages)}
    (out_dir / C.INDEX_META_FILE).write_text(json.dumps(meta, indent=2))
    return meta
