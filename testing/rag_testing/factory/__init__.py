"""RAG checkpoints built offline: tokenizers, random weights, a knowledge base and its faiss index.

The result loads through transformers' ``from_pretrained`` exactly like a hub checkpoint. Sizes: ``tiny``
(for tests), ``base`` (BART-base / DPR-base dimensions, vocab 50265, for benchmarks) and ``large``
(rag-token-nq dimensions: BART-large generator, DPR-base question encoder). Weights are random but scaled
so that generated sequences vary. The parts: :mod:`.families` (one spec per generator family of the
exporter's registry), :mod:`.tokenizers`, :mod:`.configs`, :mod:`.weights`, :mod:`.knowledge`,
:mod:`.checkpoint` (the whole, and saving it).
"""

from .checkpoint import make_checkpoint, save_checkpoint
from .configs import SIZES
from .families import GeneratorSpec, generator_spec, generators
from .knowledge import embed_knowledge

__all__ = ["SIZES", "GeneratorSpec", "embed_knowledge", "generator_spec", "generators", "make_checkpoint",
           "save_checkpoint"]
