"""Errors the CLI maps to a one-line message and exit code 2."""

from __future__ import annotations

from rag_runtime.errors import RagError


class ExportError(RagError):
    """A user-facing export failure: bad model id, unsupported checkpoint, existing output, ..."""


class ValidationError(ExportError):
    """An exported graph disagrees with PyTorch: beyond its tolerance grossly (or at all, with
    ``--strict``), or in the decisions beam search takes from it.

    Attributes:
        graph: Graph name.
        output: The output (and step) that failed.
        reason: What is wrong with it, with the figures.
    """

    def __init__(self, graph: str, output: str, reason: str):
        self.graph, self.output, self.reason = graph, output, reason
        super().__init__(f"validation failed: {graph} output {output!r} {reason}; if the checkpoint is sound, "
                         "loosen --atol/--rtol, or skip with --no-validate")
