"""The knowledge index's faiss paths that CI cannot run on a GPU, checked for what they are built from: a
missing faiss is the project's one-line error, and a GPU copy keeps exact indexes in fp32 (faiss'
``useFloat16`` stores Flat vectors themselves in fp16, which could reorder passages against the CPU)."""

from __future__ import annotations

import sys

import faiss
import numpy as np
import pytest

from rag_runtime import Manifest, MissingDependencyError
from rag_runtime.knowledge import KnowledgeIndex
from rag_runtime.knowledge.index import gpu_float16


def _index_dir(bundles):
    export = bundles[("token", "bart")].export
    return export / Manifest.load(export, verify=False).index.dir


def test_without_faiss_the_error_names_the_package(bundles, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(MissingDependencyError, match=r"needs faiss, which is not installed: pip install"):
        KnowledgeIndex(_index_dir(bundles))


@pytest.mark.parametrize(("factory", "rerank", "fp16"), [
    ("Flat", 1, False),            # exact: fp16 storage would change scores and order
    ("IVF64,Flat", 1, False),      # vectors stored as they are, nothing re-ranks them
    ("IVF64,Flat", 4, True),       # candidates re-ranked by exact inner products afterwards
    ("IVF64,PQ16", 1, True),       # fp16 lookup tables over codes that are already approximate
    ("OPQ16_64,IVF64,PQ16", 1, True),
])
def test_gpu_copies_use_fp16_only_where_retrieval_cannot_change(factory, rerank, fp16):
    assert gpu_float16(factory, rerank) is fp16


class _FakeGpuFaiss:
    """faiss' GPU API as the index uses it, recording the cloner options; the 'GPU' copy is the CPU index."""

    def __init__(self):
        self.float16 = []

    def install(self, monkeypatch):
        class GpuClonerOptions:
            useFloat16 = None

        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(faiss, "GpuClonerOptions", GpuClonerOptions, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self.clone, raising=False)

    def clone(self, resources, device, index, options):
        self.float16.append(options.useFloat16)
        return index


def test_a_flat_index_moved_to_the_gpu_keeps_fp32_and_its_answers(bundles, monkeypatch):
    root = _index_dir(bundles)
    cpu = KnowledgeIndex(root)
    fake = _FakeGpuFaiss()
    fake.install(monkeypatch)
    gpu = KnowledgeIndex(root, device="cuda")
    assert gpu.device == "cuda" and fake.float16 == [False]
    queries = np.asarray(cpu.embeddings[:3], dtype=np.float32)
    for got, want in zip(gpu.search(queries, 5), cpu.search(queries, 5), strict=True):
        np.testing.assert_array_equal(got, want)
