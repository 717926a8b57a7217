"""``rag-serve OUT/``: answer questions over HTTP (uvicorn, or Ray Serve with ``--ray``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from ..commands import run_command
from ..errors import IndexUnavailableError, InvalidOptionError, RagError, require
from .limits import SCHEDULERS, ServeLimits

logger = logging.getLogger("rag_runtime.serve")
_LIMIT_OPTIONS = {
    "scheduler": "engine: questions join and leave one running decode between its steps; request: requests "
                 "with equal parameters batched into one generate call, run to the end",
    "max_batch_size": "questions decoding together at most (1 = batching off)",
    "max_rows": "engine: decoder rows per step (default: from the export's cache bytes per row and the "
                "machine's memory); a question needing more is refused",
    "max_wait_ms": "request scheduler: how long the oldest queued question waits for others with equal "
                   "parameters",
    "max_queue": "questions allowed to wait; beyond it 429 at once",
    "timeout_s": "default deadline; still queued past it: 504, never computed",
    "drain_timeout_s": "on SIGTERM/SIGINT, how long queued and in-flight requests may take",
    "max_questions": "questions per request (413 above)",
    "max_question_chars": "characters per question",
    "max_num_beams": "cap on num_beams and num_return_sequences",
    "max_n_docs": "cap on n_docs",
    "max_length": "cap on max_length and min_length",
    "max_body_bytes": "request body size (413 above)",
    "max_timeout_s": "cap on a request's own timeout_s",
    "failures_until_unready": "failed batches in a row after which /health/ready says 503",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``rag-serve``."""
    p = argparse.ArgumentParser(prog="rag-serve", description="Serve a rag-export directory over HTTP.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("export", help="directory written by rag-export")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--api-key-env", metavar="VAR", default=None,
                   help="environment variable holding the key that clients send as 'Authorization: Bearer KEY'")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    defaults = ServeLimits()
    g = p.add_argument_group("limits (reported by GET /info)")
    for name, help in _LIMIT_OPTIONS.items():
        value = getattr(defaults, name)
        kind = dict(choices=SCHEDULERS) if name == "scheduler" else dict(type=int if value is None else type(value))
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, default=value, help=help, **kind)
    r = p.add_argument_group("Ray Serve (pip install 'rag-export[serve-ray]')")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve on a local Ray instance")
    r.add_argument("--replicas", type=int, default=1, help="replicas, one pipeline each")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscale between --replicas and this")
    r.add_argument("--target-ongoing-requests", type=float, default=4.0, help="autoscaling target per replica")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    return p


def _api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise InvalidOptionError(f"--api-key-env {var}: the environment variable is not set or empty")
    return key


def _import_serving() -> None:
    for module in ("fastapi", "prometheus_client", "uvicorn"):
        require(module, "serve", "rag-serve")


def _serve_uvicorn(args: argparse.Namespace, limits: ServeLimits, api_key: str | None) -> int:
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
        return RagPipeline.load(args.export, device=args.device, threads=args.threads)

    def stop() -> None:
        server.should_exit = True

    app = create_app(load, limits, api_key=api_key, on_fatal=stop)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=limits.drain_timeout_s, lifespan="on")
    server = DrainingServer(config)
    server.run()
    error = app.state.service.fatal_error
    if isinstance(error, RagError):
        raise error
    return 1 if error is not None or not server.started else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rag-serve``; returns the exit status."""
    args = build_parser().parse_args(argv)
    # A service's log wants times and levels, unlike the one-shot commands' progress lines.
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command("rag-serve", lambda: _serve(args))


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


def _serve(args: argparse.Namespace) -> int:
    limits = ServeLimits(**{name: getattr(args, name) for name in _LIMIT_OPTIONS})
    api_key = _api_key(args.api_key_env)
    _import_serving()
    check_servable(args.export)
    if args.ray:
        from .ray_app import run_local

        return run_local(args, limits, api_key)
    return _serve_uvicorn(args, limits, api_key)


if __name__ == "__main__":
    sys.exit(main())
