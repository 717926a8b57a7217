"""Test and benchmark support for rag-export (installed with the ``dev`` extra, never by the runtime).

- :mod:`rag_testing.factory`: RAG checkpoints built offline (tokenizers, random weights, a knowledge base).
- :mod:`rag_testing.corpus`: the bundled corpus and questions.
- :mod:`rag_testing.reference`: transformers' RAG ``generate``, the parity reference.
- :mod:`rag_testing.serve_process`: a real ``rag-serve`` process on a free port.

The submodules import torch, transformers or httpx when imported; this one imports nothing.
"""
