"""rag_export: compile a Hugging Face RAG checkpoint into ONNX graphs plus everything needed to serve it."""

from .checkpoint import Checkpoint, load_checkpoint
from .errors import ExportError, ValidationError
from .export import export, export_context_encoder

__all__ = ["Checkpoint", "ExportError", "ValidationError", "export", "export_context_encoder", "load_checkpoint"]
