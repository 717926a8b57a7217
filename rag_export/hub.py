"""Where a model's files come from: a local directory, the Hugging Face cache, or the hub.

Given a hub id and no network, transformers' ``from_pretrained`` asks the hub for every optional file it
might use (each request retried five times with backoff) before it falls back to the cache: minutes
for one checkpoint. And whatever went wrong, it says the same thing. :func:`resolve` asks the hub once,
with huggingface_hub's metadata timeout and no retries, then loads from the hub when it answers, or from
the cached snapshot directory when it does not (``from_pretrained`` on a directory makes no request);
when neither works it says which of the cases it is: offline with nothing cached, no such repository
(with the closest known id when the name looks misspelt), a gated or private repository, an invalid id.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError

logger = logging.getLogger(__name__)

# Published RAG checkpoints and the DPR context encoders their indexes were embedded with (names to
# suggest for a misspelt id; none of them is ever downloaded unless asked for).
KNOWN_IDS = ("facebook/rag-token-nq", "facebook/rag-sequence-nq", "facebook/rag-token-base",
             "facebook/rag-sequence-base", "facebook/dpr-ctx_encoder-single-nq-base",
             "facebook/dpr-ctx_encoder-multiset-base")


@dataclass(frozen=True)
class Resolved:
    """A model source as ``from_pretrained`` should load it.

    Attributes:
        source: As the user gave it (what the manifest records).
        location: What to pass to ``from_pretrained``: a directory, or the hub id itself.
        origin: ``"directory"`` (a local checkpoint), ``"hub"`` (the hub answered) or ``"cache"`` (the
            cached snapshot of a hub id).
    """

    source: str
    location: str
    origin: str

    @property
    def directory(self) -> str | None:
        """The local directory holding the files (None until a hub download has happened)."""
        return None if self.origin == "hub" else self.location


def looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a mistyped path."""
    parent = os.path.dirname(source)
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or bool(parent and os.path.isdir(parent))


def resolve(source: str, what: str = "checkpoint") -> Resolved:
    """Where to load ``source`` (a directory or a hub id) from.

    Args:
        source: Local directory or hub id.
        what: What it is, for messages (``"checkpoint"``, ``"DPR context encoder"``).

    Raises:
        ExportError: A path that does not exist, an invalid id, or a hub id that can be loaded neither
            from the hub nor from the cache (the message says why and what to do).
    """
    if os.path.isdir(source):
        return Resolved(source, source, "directory")
    if looks_like_path(source):
        raise ExportError(f"no such {what} directory: {source}")
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError as e:
        raise ExportError(f"{source!r} is neither a directory nor a valid hub model id "
                          f"({str(e).splitlines()[0]}); give a checkpoint directory or an id like org/name") from e
    cached = cached_snapshot(source)
    if constants.is_offline_mode():
        if cached is None:
            raise ExportError(f"{source} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                              "HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE to download it, or "
                              f"copy a cache that holds it (its folder models--{source.replace('/', '--')}) to "
                              f"that directory{_did_you_mean(source)}")
        return Resolved(source, str(cached), "cache")
    problem, fatal = _ask_hub(source)
    if problem is None:
        return Resolved(source, source, "hub")
    if cached is not None:
        logger.warning("%s; loading %s from the Hugging Face cache (%s). With HF_HUB_OFFLINE=1 the hub is not "
                       "asked", problem, source, cached)
        return Resolved(source, str(cached), "cache")
    if fatal:
        raise ExportError(f"{problem}{_did_you_mean(source)}")
    raise ExportError(f"cannot download {source}: {problem}, and it is not in the Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}). Connect to the network, or download it where there is one "
                      f"(`hf download {source}`), copy that cache here (HF_HOME or HF_HUB_CACHE) and set "
                      "HF_HUB_OFFLINE=1, or pass a checkpoint directory")


def cached_snapshot(repo_id: str) -> Path | None:
    """The cache's snapshot directory of ``repo_id`` at ``refs/main``, if it holds the model's config."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def _ask_hub(repo_id: str) -> tuple[str | None, bool]:
    """One metadata request, no retries: ``(None, _)`` when the model is there, else what is wrong and
    whether it is final (the repository is missing or closed to us) rather than a connection problem."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint, timeout = constants.ENDPOINT, constants.HF_HUB_ETAG_TIMEOUT
    try:
        HfApi(endpoint=endpoint).model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        return (f"{repo_id} is gated on the hub: accept its conditions at {endpoint}/{repo_id} and log in "
                "(`hf auth login`)"), True
    except RepositoryNotFoundError:
        return (f"{repo_id} does not exist on the hub ({endpoint}), or it is private and you are not logged "
                "in (`hf auth login`)"), True
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        return f"the hub ({endpoint}) answered HTTP {status}", False
    except Exception as e:  # connection refused, DNS failure, timeout, proxy errors: the hub is unreachable
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "timeout" in type(e).__name__.lower():
            cause = f"no answer within {timeout:g} s (HF_HUB_ETAG_TIMEOUT)"
        return f"the hub ({endpoint}) is not reachable ({cause})", False
    return None, False


def _did_you_mean(source: str) -> str:
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    cached = [p.name[len("models--"):].replace("--", "/") for p in cache.glob("models--*")] if cache.is_dir() else []
    close = difflib.get_close_matches(source, [*KNOWN_IDS, *cached], n=1, cutoff=0.85)
    return f" (did you mean {close[0]}?)" if close and close[0] != source else ""


def adopt_library_logging() -> None:
    """Print transformers' and huggingface_hub's records once, through the command's handler.

    Both libraries attach a stderr handler of their own; huggingface_hub's records then also reach the
    root logger's handler (the command's), so every hub warning was printed twice. Commands call this
    after :func:`rag_runtime.commands.setup_logging`; library users keep their own logging setup.
    """
    try:
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:  # the exporter's extra is not installed: the command says so itself
        return
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    hub = hub_logging.get_logger()
    for handler in list(hub.handlers):
        hub.removeHandler(handler)
    hub.propagate = True
