"""Knowledge indexes: passage stores, embeddings and faiss shards; building, loading and searching them."""

from .build import BuildOptions, StoredEmbeddings, build_index, resolve_factory
from .encoder import ContextEncoder
from .index import KnowledgeIndex
from .sources import PassageError, PassageReader
from .store import IndexMeta, PassageStore, PassageWriter

__all__ = ["BuildOptions", "ContextEncoder", "IndexMeta", "KnowledgeIndex", "PassageError", "PassageReader",
           "PassageStore", "PassageWriter", "StoredEmbeddings", "build_index", "resolve_factory"]
