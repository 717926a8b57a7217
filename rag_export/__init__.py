"""rag_export: compile a Hugging Face RAG checkpoint into ONNX graphs plus everything needed to serve it."""

from .checkpoint import Checkpoint, load_checkpoint
from .errors import ExportError, ValidationError
from .export import export

__all__ = ["Checkpoint", "ExportError", "ValidationError", "export", "load_checkpoint"]
