"""``create_app``: the FastAPI app over one pipeline, shared by tests, the uvicorn CLI and Ray Serve."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import platform
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..errors import InvalidOptionError
from ..options import OPTIONS
from ..results import RagOutput, retrieval_to_dict
from .limits import ServeLimits
from .service import PipelineSource, Service
from .validation import ApiError, parse_generation, parse_questions, parse_timeout, read_json

logger = logging.getLogger("rag_runtime.serve")
access_logger = logging.getLogger("rag_runtime.serve.access")


def create_app(pipeline: PipelineSource, limits: ServeLimits | None = None, *, api_key: str | None = None,
               load_in_background: bool = True, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """Build the HTTP app over one pipeline.

    Args:
        pipeline: A loaded ``RagPipeline``, or a callable returning one (loaded on the worker thread at
            startup).
        limits: Batching, queue, deadline and per-request bounds (default: ``ServeLimits()``).
        api_key: If set, every endpoint but the health checks needs ``Authorization: Bearer <api_key>``.
        load_in_background: Start serving health checks before loading and warm-up finish (readiness says
            503 meanwhile); False makes startup wait for them (Ray Serve replicas).
        on_fatal: Called if loading or warm-up fails.

    Returns:
        The app; its ``Service`` is ``app.state.service``.

    Raises:
        IndexUnavailableError: ``pipeline`` is loaded and has no knowledge index (``rag-serve`` checks the
            export before loading it).
    """
    limits = limits or ServeLimits()
    if not callable(pipeline) and pipeline.index is None:
        pipeline.retriever.require_index()  # the service answers by retrieval: refuse now, not at warm-up
    service = Service(pipeline, limits, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler.start()
        if load_in_background:
            prepare = asyncio.get_running_loop().create_task(service.prepare())
        else:
            await service.prepare()
            prepare = None
        yield
        if prepare is not None and not prepare.done():
            prepare.cancel()
        await service.scheduler.stop()

    app = FastAPI(title="rag-serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    _add_routes(app, service, limits, api_key)
    return app


Handler = Callable[[Request, dict], Awaitable[Response]]


def _route(app: FastAPI, service: Service, method: str, path: str, key: bytes | None, fn: Handler) -> None:
    """Register ``fn`` with auth, error mapping, metrics and the access log around it."""

    async def endpoint(request: Request) -> Response:
        stats = {"id": request.headers.get("x-request-id") or uuid.uuid4().hex[:16], "questions": 0}
        started = time.monotonic()
        try:
            if key is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(), key):
                raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer ...)",
                               headers={"WWW-Authenticate": "Bearer"})
            response = await fn(request, stats)
        except ApiError as e:
            response = JSONResponse(e.body(), e.status, headers=e.headers)
            stats["error"] = e.type
        except Exception as e:  # the client sees one line; the log keeps the reason
            logger.error("%s failed: %s: %s", path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            logger.debug("handler failure", exc_info=True)
            response = JSONResponse({"error": "internal error", "type": "internal"}, 500)
        _account(service, path, response, stats, time.monotonic() - started)
        return response

    app.add_api_route(path, endpoint, methods=[method])


def _add_routes(app: FastAPI, service: Service, limits: ServeLimits, api_key: str | None) -> None:
    key = f"Bearer {api_key}".encode() if api_key else None

    async def live(request: Request, stats: dict) -> Response:
        return JSONResponse({"status": "live"})

    async def ready(request: Request, stats: dict) -> Response:
        return JSONResponse({"status": service.readiness()}, 200 if service.ready else 503)

    async def info(request: Request, stats: dict) -> Response:
        if service.pipeline is None:
            raise ApiError(503, "not_ready", "the export is still loading", headers={"Retry-After": "1"})
        out = _model_info(service.pipeline)
        out["versions"] = {"export": out["versions"], "rag_runtime": __version__, "python": platform.python_version()}
        return JSONResponse({**out, "limits": limits.as_dict(), "scheduler": _scheduler_info(service),
                             "options": _options_info(service.pipeline, limits)})

    async def metrics(request: Request, stats: dict) -> Response:
        text, content_type = service.metrics.render()
        return Response(text, media_type=content_type)

    async def generate(request: Request, stats: dict) -> Response:
        return await _answer(service, limits, request, stats, "generate")

    async def retrieve(request: Request, stats: dict) -> Response:
        return await _answer(service, limits, request, stats, "retrieve")

    _route(app, service, "GET", "/health/live", None, live)
    _route(app, service, "GET", "/health/ready", None, ready)
    _route(app, service, "GET", "/info", key, info)
    _route(app, service, "GET", "/metrics", key, metrics)
    _route(app, service, "POST", "/v1/generate", key, generate)
    _route(app, service, "POST", "/v1/retrieve", key, retrieve)


async def _answer(service: Service, limits: ServeLimits, request: Request, stats: dict, operation: str) -> Response:
    """Parse, validate, queue and wait; one result per question, in order."""
    service.admit()
    service.active += 1
    try:
        body = await read_json(request, limits)
        questions = parse_questions(body, limits)
        stats["questions"] = len(questions)
        timeout_s = parse_timeout(body, limits)
        params = parse_generation(body)
        if operation == "retrieve":
            params = _retrieve_params(params, limits)
        else:
            opts = service.validate_generation(params)
            if service.limits.scheduler == "engine":
                params = opts
        job = service.submit(operation, questions, params, timeout_s)
        results = await service.wait(job, request)
        stats.update(queue_s=job.queue_s, inference_s=job.inference_s, batch=job.batch_size)
    finally:
        service.active -= 1
    to_json = _generated if operation == "generate" else retrieval_to_dict
    headers = {"x-queue-time": f"{job.queue_s * 1000:.1f}", "x-inference-time": f"{job.inference_s * 1000:.1f}",
               "x-batch-size": f"{job.batch_size:.3g}", "x-request-id": stats["id"]}
    return JSONResponse({"results": [to_json(q, r) for q, r in zip(questions, results, strict=True)]},
                        headers=headers)


def _retrieve_params(params: dict, limits: ServeLimits) -> dict:
    extra = sorted(set(params) - {"n_docs"})
    if extra:
        raise ApiError(422, "unknown_field", f"unknown field {extra[0]!r} for /v1/retrieve; accepted are: question, "
                       "questions, n_docs, timeout_s", extra[0])
    n_docs = params.get("n_docs")
    if n_docs is None:
        return {"n_docs": None}
    try:
        n_docs = OPTIONS["n_docs"].check(n_docs)
    except InvalidOptionError as e:
        raise ApiError(422, e.code, str(e), "n_docs") from None
    if n_docs > limits.max_n_docs:
        raise ApiError(422, "limit_exceeded", f"'n_docs' ({n_docs}) exceeds the server's max_n_docs "
                       f"({limits.max_n_docs})", "n_docs")
    return {"n_docs": n_docs}


def _account(service: Service, endpoint: str, response: Response, stats: dict, elapsed: float) -> None:
    """Metrics and one structured access log line per request."""
    service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    service.metrics.request_seconds.labels(endpoint).observe(elapsed)
    if endpoint.startswith("/health") or endpoint == "/metrics":
        return  # probes and scrapes would drown the log
    fields = {"id": stats["id"], "endpoint": endpoint, "status": response.status_code,
              "questions": stats["questions"], "queue_ms": round(stats.get("queue_s", 0.0) * 1000, 1),
              "inference_ms": round(stats.get("inference_s", 0.0) * 1000, 1), "batch": stats.get("batch", 0),
              "total_ms": round(elapsed * 1000, 1), "error": stats.get("error", "")}
    access_logger.info(" ".join(f"{k}={v}" for k, v in fields.items()), extra={"access": fields})


def _generated(question: str, r: RagOutput) -> dict:
    return {**r.to_dict(), "question": question}


def _scheduler_info(service: Service) -> dict:
    """How questions are scheduled, with the engine's budgets and what it holds now."""
    if service.limits.scheduler != "engine":
        return {"kind": "request", "max_batch_size": service.limits.max_batch_size,
                "max_wait_ms": service.limits.max_wait_ms}
    engine = service.scheduler.engine
    return {"kind": "engine", "max_batch_size": service.limits.max_batch_size, **(service.budget or {}),
            "active_questions": engine.active_questions if engine else 0,
            "active_rows": engine.active_rows if engine else 0,
            "queued_questions": service.scheduler.queued_questions}


def _options_info(pipe, limits: ServeLimits) -> dict:
    """Every generation option a request may set: its type, the export's default and the server's cap."""
    defaults = pipe.options()
    return {name: {"type": opt.type.name, "default": getattr(defaults, name), "help": opt.help,
                   "cap": {"limit": opt.cap, "value": getattr(limits, opt.cap)} if opt.cap else None}
            for name, opt in OPTIONS.items()}


def _model_info(pipe) -> dict:
    """What /info says about the export: the one place that reads the pipeline's manifest."""
    m = pipe.manifest
    index = {"size": m.index.count, "type": m.index.factory} if m.index else {"size": None, "type": None}
    return {"kind": m.kind, "generator": m.generator_type, "source": m.source, "precision": m.precision,
            "index": index, "device": pipe.device, "versions": dict(m.versions)}
