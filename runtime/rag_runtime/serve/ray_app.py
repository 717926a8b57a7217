"""Ray Serve scale-out: the same FastAPI app through ``@serve.ingress``, one pipeline per replica.

Local: ``rag-serve OUT/ --ray --replicas N``. Cluster: ``serve deploy`` a config whose ``import_path`` is
``rag_runtime.serve.ray_app:app_builder`` (see ``ray_config.example.yaml``).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import asdict, dataclass

from ..errors import require
from .limits import ServeLimits
from .startup import ServerSettings, api_key_from_env, check_servable

logger = logging.getLogger("rag_runtime.serve")
APP_NAME = "rag"


@dataclass(frozen=True)
class RayScaling:
    """How many replicas Ray Serve runs (the keywords of :func:`build_application` of the same names).

    Attributes:
        replicas: Replicas to start (the autoscaling minimum when ``max_replicas`` is set).
        max_replicas: Enables autoscaling between ``replicas`` and this.
        target_ongoing_requests: Autoscaling target of requests in progress per replica.
        replica_cpus: CPUs Ray reserves per replica.
    """

    replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    replica_cpus: float = 1.0


def _import_ray():
    return require("ray", "serve-ray", "rag-serve --ray"), require("ray.serve", "serve-ray", "rag-serve --ray")


def build_application(export: str, limits: ServeLimits | None = None, *, api_key: str | None = None,
                      device: str = "cpu", threads: int | None = None, replicas: int = 1,
                      max_replicas: int | None = None, target_ongoing_requests: float = 4.0,
                      replica_cpus: float = 1.0):
    """A Ray Serve application: ``replicas`` copies of the app, each loading its own pipeline.

    Args:
        export: Export directory, readable at the same path on every node.
        limits: The server's bounds, per replica.
        api_key: Bearer key for every endpoint but the health checks.
        device: ``"cpu"`` or ``"cuda"`` (then give each replica a GPU with ``ray_actor_options``).
        threads: onnxruntime intra-op threads per replica.
        replicas: Replicas to start (the autoscaling minimum when ``max_replicas`` is set).
        max_replicas: Enables autoscaling between ``replicas`` and this.
        target_ongoing_requests: Autoscaling target of requests in progress per replica.
        replica_cpus: CPUs Ray reserves per replica.

    Returns:
        A bound deployment for ``serve.run`` (or an application builder's return value).
    """
    _, serve = _import_ray()
    from ..pipeline import RagPipeline
    from .app import create_app

    check_servable(export)

    limits = limits or ServeLimits()

    def build_app():
        # Runs in each replica: its own pipeline, batcher and metrics; startup waits for load and warm-up so
        # Serve routes nothing to a replica that cannot answer yet.
        return create_app(lambda: RagPipeline.load(export, device=device, threads=threads), limits,
                          api_key=api_key, load_in_background=False)

    scaling = ({"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                       "target_ongoing_requests": target_ongoing_requests}}
               if max_replicas else {"num_replicas": replicas})

    @serve.deployment(name="RagDeployment", ray_actor_options={"num_cpus": replica_cpus},
                      max_ongoing_requests=limits.max_queue + limits.max_batch_size,
                      graceful_shutdown_timeout_s=limits.drain_timeout_s, health_check_period_s=5, **scaling)
    @serve.ingress(build_app)
    class RagDeployment:
        """One replica; Serve restarts it when ``check_health`` raises."""

        def check_health(self) -> None:
            service = self.app.state.service
            if service.readiness() in ("failing", "failed"):
                raise RuntimeError(f"replica not healthy: {service.readiness()}")

    return RagDeployment.bind()


def app_builder(args: dict):
    """Application builder for Serve config files (``import_path: rag_runtime.serve.ray_app:app_builder``).

    ``args``: ``export`` (required), ``limits`` (a mapping of ``ServeLimits`` fields), ``api_key_env`` (an
    environment variable holding the key, read where the application is built), and any keyword of
    :func:`build_application` (``replicas``, ``max_replicas``, ``target_ongoing_requests``...).
    """
    args = dict(args)
    limits = ServeLimits(**args.pop("limits", {}))
    key_var = args.pop("api_key_env", None)
    if key_var:
        args["api_key"] = api_key_from_env(key_var)
    return build_application(args.pop("export"), limits, **args)


def run_local(settings: ServerSettings, limits: ServeLimits, scaling: RayScaling) -> int:
    """``rag-serve OUT --ray``: start a local Ray, serve until SIGTERM/SIGINT, then shut everything down."""
    ray, serve = _import_ray()
    stop = threading.Event()
    ray.init(include_dashboard=False)
    # After ray.init, which installs its own fatal-signal handlers (SIGTERM would abort the driver).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        application = build_application(settings.export, limits, api_key=settings.api_key, device=settings.device,
                                        threads=settings.threads, **asdict(scaling))
        serve.run(application, name=APP_NAME, route_prefix="/")
        logger.info("Ray Serve answering on http://%s:%d with %d replica(s)", settings.host, settings.port,
                    scaling.replicas)
        stop.wait()
        logger.info("shutting down Ray Serve (replicas drain for up to %.0f s)", limits.drain_timeout_s)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
