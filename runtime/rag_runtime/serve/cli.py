"""``rag-serve OUT/``: answer questions over HTTP (uvicorn, or Ray Serve with ``--ray``)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..commands import run_command
from .limits import SCHEDULERS, ServeLimits
from .startup import ServerSettings, api_key_from_env, check_servable, require_serving, serve_uvicorn

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rag-serve``; returns the exit status."""
    args = build_parser().parse_args(argv)
    # A service's log wants times and levels, unlike the one-shot commands' progress lines.
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command("rag-serve", lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    limits = ServeLimits(**{name: getattr(args, name) for name in _LIMIT_OPTIONS})
    settings = ServerSettings(args.export, host=args.host, port=args.port, device=args.device,
                              threads=args.threads, api_key=api_key_from_env(args.api_key_env))
    require_serving()
    check_servable(args.export)
    if args.ray:
        from .ray_app import RayScaling, run_local

        return run_local(settings, limits, RayScaling(replicas=args.replicas, max_replicas=args.max_replicas,
                                                    target_ongoing_requests=args.target_ongoing_requests,
                                                    replica_cpus=args.replica_cpus))
    return serve_uvicorn(settings, limits)


if __name__ == "__main__":
    sys.exit(main())
