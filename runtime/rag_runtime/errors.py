"""Errors raised by the runtime for problems a user can fix."""


class ArtifactError(Exception):
    """The export directory is missing, corrupted or does not match this runtime."""


class IndexUnavailableError(ArtifactError):
    """The export has no knowledge index: retrieval needs one (generate_from_context does not)."""
