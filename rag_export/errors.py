"""Errors the CLI maps to a one-line message and exit code 2."""

from __future__ import annotations

from rag_runtime.errors import RagError


class ExportError(RagError):
    """A user-facing export failure: bad model id, unsupported checkpoint, existing output, ..."""


class ValidationError(ExportError):
    """An exported graph disagrees with PyTorch beyond tolerance.

    Attributes:
        graph: Graph name.
        output: Output name with the largest violation.
        max_diff: Its maximum absolute difference.
        atol: The tolerance it was checked against.
    """

    def __init__(self, graph: str, output: str, max_diff: float, atol: float):
        self.graph, self.output, self.max_diff, self.atol = graph, output, max_diff, atol
        super().__init__(
            f"validation failed: {graph} output {output!r} differs from PyTorch by {max_diff:.3g} "
            f"(atol {atol:g}); re-run with a larger --atol to accept it, or --no-validate to skip"
        )
