"""Errors for problems a user can fix. Every command maps :class:`RagError` to one line and exit code 2."""

from __future__ import annotations


class RagError(Exception):
    """Base of every user-facing error: bad input, a missing or corrupted artifact, a missing extra."""


class ArtifactError(RagError):
    """The export directory is missing, corrupted or does not match this runtime."""


class IndexUnavailableError(ArtifactError):
    """The export has no knowledge index: retrieval needs one (generate_from_context does not)."""


class OutputExistsError(RagError):
    """An output directory is not empty and replacing it was not asked for."""


class InvalidOptionError(RagError, ValueError):
    """A generation or command option has an invalid value (a ``ValueError``, as callers expect).

    Attributes:
        field: The option at fault, when one is (the service names it in its 422 response).
        code: ``invalid_value``, or ``invalid_type`` when the value is not even of the option's type.
    """

    def __init__(self, message: str, field: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.field, self.code = field, code


class UnsupportedOptionError(InvalidOptionError):
    """A transformers generation parameter this runtime does not implement (refused, never ignored)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message, field, code="unsupported_option")


class UnknownOptionError(RagError, TypeError):
    """An option name no function here accepts (a ``TypeError``, like an unexpected keyword argument).

    Attributes:
        field: The unknown name.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidInputError(RagError, TypeError):
    """An input of the wrong type (a question that is not a string)."""


class MissingDependencyError(RagError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install 'rag-export[extra]'``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed: pip install 'rag-export[{extra}]'"
        ) from e
