"""The checkpoint's knowledge base: passages embedded by its DPR context encoder, saved as a dataset with a
faiss index (transformers' custom-knowledge layout, which ``RagRetriever`` and ``rag-export`` read)."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def embed_passages(ctx_model, tokenizer, passages: list[dict]):
    """float32 [passages, dim]: DPR passage encoding of "title [SEP] text", padding masked, segment ids all 0
    (as ``rag-index build`` embeds; transformers' RAG example passes input_ids alone, leaving padding
    unmasked)."""
    import numpy as np
    import torch

    ctx_model.eval()
    embeddings = []
    with torch.no_grad():
        for i in range(0, len(passages), 64):
            chunk = passages[i : i + 64]
            enc = tokenizer([p["title"] for p in chunk], [p["text"] for p in chunk], truncation=True,
                            max_length=512, padding="longest", return_tensors="pt")
            embeddings.append(ctx_model(enc.input_ids, attention_mask=enc.attention_mask).pooler_output.numpy())
    return np.concatenate(embeddings).astype("float32")


def write_knowledge_base(out: Path, passages: list[dict], embeddings, index_type: str) -> Path:
    """The passages, their embeddings and a faiss index of ``index_type`` (a factory string) under
    ``out/knowledge`` (replaced if present); returns that directory."""
    import shutil

    import datasets
    import faiss

    kb_dir = (out / "knowledge").resolve()
    shutil.rmtree(kb_dir, ignore_errors=True)
    ds = datasets.Dataset.from_dict({
        "title": [p["title"] for p in passages],
        "text": [p["text"] for p in passages],
        "embeddings": [e for e in embeddings],
    })
    ds.save_to_disk(str(kb_dir / "passages"))
    index = faiss.index_factory(embeddings.shape[1], index_type, faiss.METRIC_INNER_PRODUCT)
    ds.add_faiss_index("embeddings", custom_index=index)
    ds.get_index("embeddings").save(str(kb_dir / "passages.faiss"))
    return kb_dir


def embed_knowledge(out: Path, passages: list[dict], ctx_model, tokenizer, index_type: str) -> Path:
    """:func:`embed_passages` then :func:`write_knowledge_base`; returns the knowledge base directory."""
    t0 = time.perf_counter()
    embeddings = embed_passages(ctx_model, tokenizer, passages)
    print(f"[factory] embedded {len(passages)} passages in {time.perf_counter() - t0:.1f}s", file=sys.stderr,
          flush=True)
    return write_knowledge_base(out, passages, embeddings, index_type)
