"""Starting ``rag-serve``: the checks before anything starts, and the uvicorn server that drains on a signal.

Shared by the command line (:mod:`rag_runtime.serve.cli`) and the Ray Serve application
(:mod:`rag_runtime.serve.ray_app`).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from ..errors import IndexUnavailableError, InvalidOptionError, RagError, require
from .limits import ServeLimits


@dataclass(frozen=True)
class ServerSettings:
    """What a server answers from and where it listens.

    Attributes:
        export: Export directory (checked by :func:`check_servable`).
        host: Address to bind.
        port: Port to bind.
        device: ``"cpu"`` or ``"cuda"``.
        threads: onnxruntime intra-op threads (None: all cores).
        api_key: Bearer key for every endpoint but the health checks (None: no key).
    """

    export: str
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    threads: int | None = None
    api_key: str | None = None


def api_key_from_env(var: str | None) -> str | None:
    """The key held by environment variable ``var`` (None when ``var`` is None).

    Raises:
        InvalidOptionError: ``var`` is not set or empty.
    """
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise InvalidOptionError(f"--api-key-env {var}: the environment variable is not set or empty")
    return key


def require_serving() -> None:
    """Raise :class:`MissingDependencyError` naming the ``serve`` extra unless its packages are installed."""
    for module in ("fastapi", "prometheus_client", "uvicorn"):
        require(module, "serve", "rag-serve")


def check_servable(export: str) -> None:
    """Refuse, before anything starts, an export the service could not answer from: rag-serve answers
    questions by retrieval, so the export needs a knowledge index."""
    from ..artifact import Manifest

    if not os.path.isdir(export):
        raise InvalidOptionError(f"{export} is not a directory (expected the output of rag-export)")
    if Manifest.load(export, verify=False).index is None:
        raise IndexUnavailableError(
            f"{export} has no knowledge index and rag-serve answers questions by retrieval, so it does not start: "
            f"build an index and attach it (rag-index build ...; rag-index attach {export} INDEX_DIR; the export's "
            f"last lines and the README's 'From the hub' give the steps); meanwhile rag-generate {export} "
            "QUESTION --passages FILE answers from passages you give")


def serve_uvicorn(settings: ServerSettings, limits: ServeLimits) -> int:
    """Serve with uvicorn until SIGTERM/SIGINT (then drain); returns the exit status.

    Raises:
        RagError: The pipeline failed to load (the service's fatal error).
    """
    import uvicorn

    from ..pipeline import RagPipeline
    from .app import create_app

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: readiness 503, queued and in-flight requests answered, then uvicorn stops."""

        async def serve(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            # Not recording the signal: uvicorn would re-raise it after shutdown and the exit status would
            # say "killed" instead of 0.
            if self.should_exit or getattr(self, "_draining", False):
                self.should_exit = self.force_exit = True
                return
            self._draining = True
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

        async def _drain(self) -> None:
            await app.state.service.drain(limits.drain_timeout_s)
            self.should_exit = True

    def load() -> RagPipeline:
        return RagPipeline.load(settings.export, device=settings.device, threads=settings.threads)

    def stop() -> None:
        server.should_exit = True

    app = create_app(load, limits, api_key=settings.api_key, on_fatal=stop)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=limits.drain_timeout_s, lifespan="on")
    server = DrainingServer(config)
    server.run()
    error = app.state.service.fatal_error
    if isinstance(error, RagError):
        raise error
    return 1 if error is not None or not server.started else 0
