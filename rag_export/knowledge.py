"""Import a transformers RagRetriever knowledge base (``datasets.save_to_disk`` directory with title,
text and embeddings columns, plus its ``.faiss`` file) into the runtime's index format."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from rag_runtime import constants as C
from rag_runtime.knowledge import IndexMeta, PassageWriter

from .errors import ExportError

logger = logging.getLogger(__name__)


def import_knowledge_base(passages: Path, index_path: Path, out_dir: Path, expected_dim: int | None = None,
                          embeddings_dtype: str = "float32") -> IndexMeta:
    """Write ``out_dir`` (which must not exist yet) from a saved dataset and its faiss index.

    Doc ids stay the dataset's row numbers, so retrieval matches RagRetriever's exactly.
    """
    import datasets
    import faiss

    for what, p in (("passages", passages), ("faiss index", index_path)):
        if p is None or not Path(p).exists():
            raise ExportError(f"knowledge base {what} {p} does not exist")
    try:
        ds = datasets.load_from_disk(str(passages))
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"{passages} is not a dataset saved with datasets.save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        raise ExportError(f"{passages} holds several splits ({', '.join(ds)}); pass the split's directory")
    missing = {"title", "text", "embeddings"} - set(ds.column_names)
    if missing:
        raise ExportError(f"knowledge base {passages} lacks columns {sorted(missing)} (needs title, text, embeddings)")
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        raise ExportError(f"cannot read faiss index {index_path}: {str(e).splitlines()[0]}") from e
    count, dim = len(ds), index.d
    if index.ntotal != count:
        raise ExportError(f"faiss index {index_path} holds {index.ntotal} vectors but the passages are {count}")
    if expected_dim is not None and dim != expected_dim:
        raise ExportError(f"faiss index dimension {dim} does not match the question encoder's {expected_dim}")
    first = np.asarray(ds[0]["embeddings"]) if count else np.zeros(dim)
    if first.shape != (dim,):
        raise ExportError(f"embeddings column has shape {first.shape}, the faiss index dimension is {dim}")

    writer = PassageWriter(out_dir, count, dim, embeddings_dtype)
    for start in range(0, count, 4096):
        batch = ds[start : start + 4096]
        ids = batch["id"] if "id" in batch else [str(i) for i in range(start, start + len(batch["text"]))]
        writer.add([str(i) for i in ids], batch["title"], batch["text"],
                   np.asarray(batch["embeddings"], dtype=np.float32))
    writer.close()
    shutil.copyfile(index_path, out_dir / C.INDEX_FAISS_FILE)
    metric = "inner_product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
    meta = IndexMeta(count=count, dim=dim, metric=metric, factory=type(index).__name__,
                     embeddings=embeddings_dtype, encoder=None, source=str(passages))
    meta.save(out_dir)
    return meta


def export_custom_index(config, checkpoint_dir: str, out_dir: Path) -> IndexMeta:
    """Import the ``index_name="custom"`` knowledge base a RagConfig names."""
    from .checkpoint import resolve_local_path

    passages = resolve_local_path(config.passages_path, checkpoint_dir)
    index_path = resolve_local_path(config.index_path, checkpoint_dir)
    for what, p in (("passages_path", passages), ("index_path", index_path)):
        if p is None or not p.exists():
            raise ExportError(f"the checkpoint's retriever {what} does not exist: {p}; fix the path in config.json "
                              "or export with --no-index")
    return import_knowledge_base(passages, index_path, out_dir, expected_dim=config.retrieval_vector_size)
