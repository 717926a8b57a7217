"""The state behind one app: its pipeline, batcher, readiness, draining and request waiting."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from starlette.requests import Request

from ..engine import row_budget
from ..errors import InvalidOptionError, UnknownOptionError
from ..options import OPTIONS, GenerationOptions, source_of
from ..pipeline import RagPipeline
from .batcher import Batcher, BatchFailed, DeadlineExceeded, Job, QueueFull, ShuttingDown
from .limits import ServeLimits
from .metrics import ServeMetrics
from .scheduler import EngineJob, EngineScheduler
from .validation import ApiError

logger = logging.getLogger("rag_runtime.serve")

WARMUP_QUESTION = "who wrote the warm-up question?"
PipelineSource = RagPipeline | Callable[[], RagPipeline]


class Service:
    """One pipeline behind HTTP: loading, warm-up, admission, waiting and draining.

    Args:
        pipeline: A loaded pipeline, or a callable that loads one (run on the worker thread at startup,
            so liveness answers while a large export loads).
        limits: The server's bounds.
        on_fatal: Called when loading or warm-up fails (the CLI stops the server and exits 2).
    """

    def __init__(self, pipeline: PipelineSource, limits: ServeLimits, on_fatal: Callable[[], None] | None = None):
        self.pipeline = pipeline if isinstance(pipeline, RagPipeline) else None
        self._loader = None if isinstance(pipeline, RagPipeline) else pipeline
        self.limits, self.on_fatal = limits, on_fatal
        self.metrics = ServeMetrics()
        self.budget: dict | None = None  # the engine's row budget, once the export is loaded
        self.scheduler = (EngineScheduler(lambda: self.pipeline, self._max_rows, limits, self.metrics)
                          if limits.scheduler == "engine" else Batcher(self._run_batch, limits, self.metrics))
        self.state = "loading" if self.pipeline is None else "warming_up"
        self.fatal_error: BaseException | None = None
        self.draining = False
        self.active = 0  # admitted /v1 requests not yet answered

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, not draining, and not failing batch after batch."""
        return (self.state == "ready" and not self.draining
                and self.scheduler.consecutive_failures < self.limits.failures_until_unready)

    def readiness(self) -> str:
        """``ready``, or why not: ``loading``, ``warming_up``, ``draining``, ``failing`` or ``failed``."""
        if self.draining:
            return "draining"
        if self.state == "ready" and not self.ready:
            return "failing"
        return self.state

    async def prepare(self) -> None:
        """Load (if given a loader) and answer one warm-up question on the worker thread."""
        loop = asyncio.get_running_loop()
        try:
            if self.pipeline is None:
                started = time.monotonic()
                self.pipeline = await loop.run_in_executor(self.scheduler.executor, self._loader)
                logger.info("loaded the export in %.1f s", time.monotonic() - started)
                self.state = "warming_up"
            if self.limits.scheduler == "engine":
                self.budget = row_budget(self.pipeline.manifest, self.limits.max_length, self.limits.max_rows)
                logger.info("engine: at most %d decoder rows per step (%.1f MB of cache and logits per row)",
                            self.budget["max_rows"], self.budget["bytes_per_row"] / 1e6)
            started = time.monotonic()
            await loop.run_in_executor(self.scheduler.executor, self.pipeline.generate, [WARMUP_QUESTION])
            logger.info("warm-up answer in %.0f ms; ready", (time.monotonic() - started) * 1000)
            self.state = "ready"
        except Exception as e:
            self.state, self.fatal_error = "failed", e
            logger.error("startup failed: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            if self.on_fatal is not None:
                self.on_fatal()

    def admit(self) -> None:
        """Refuse /v1 work while draining or before warm-up (503)."""
        if self.draining:
            raise ApiError(503, "draining", "the server is shutting down", headers={"Connection": "close"})
        if self.state != "ready":
            raise ApiError(503, "not_ready", f"the server is not ready ({self.state})", headers={"Retry-After": "1"})

    def validate_generation(self, params: dict) -> GenerationOptions:
        """The runtime's own validation of the request's generation options, then the server's caps on the
        resolved values (the export's defaults included: the caps bound the work actually done)."""
        try:
            opts = self.pipeline.options(**params)
        except (UnknownOptionError, InvalidOptionError) as e:
            code = getattr(e, "code", "unknown_field")
            raise ApiError(422, code, str(e).splitlines()[0], e.field) from None
        for name, opt in OPTIONS.items():
            if opt.cap is None:
                continue
            limit = getattr(self.limits, opt.cap)
            value = self.pipeline.generator.passages_needed(opts) if name == "n_docs" else getattr(opts, name)
            if value > limit:
                field = source_of(name, params)
                said = (f"({params[field]})" if field in params and params[field] is not None
                        else f"would be {value} (with the export's defaults)")
                raise ApiError(422, "limit_exceeded", f"'{field}' {said} exceeds the server's {opt.cap} ({limit})",
                               field)
        rows = self.pipeline.generator.rows(opts)
        if self.budget is not None and rows > self.budget["max_rows"]:
            field = "n_docs" if "n_docs" in params or "num_beams" not in params else "num_beams"
            raise ApiError(422, "limit_exceeded", f"a question would need {rows} decoder rows (n_docs {opts.n_docs} x "
                           f"num_beams {opts.num_beams}), over the server's max_rows ({self.budget['max_rows']})",
                           field)
        return opts

    def submit(self, operation: str, questions: list[str], params, timeout_s: float) -> Job | EngineJob:
        """Queue the questions or refuse with 429 at once. ``params``: the request's keywords (the engine
        takes a generation request's resolved options)."""
        try:
            return self.scheduler.submit(operation, questions, params, timeout_s)
        except QueueFull as e:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, "queue_full", f"overloaded: {e}", headers={"Retry-After": "1"}) from None

    async def wait(self, job: Job | EngineJob, request: Request) -> list:
        """The job's results; 504 at its deadline (the engine: its questions leave the running decode;
        request batching: only if it has not started); dropped if the client leaves."""
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            timeout = max(0.0, job.deadline - time.monotonic())
            done, _ = await asyncio.wait({job.future, watcher}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if job.future not in done:
                reason = "disconnect" if watcher in done else "deadline"
                if self.scheduler.abandon(job, reason):
                    raise ApiError(504, "deadline_exceeded", f"not answered within its deadline ({reason})")
                # Already computing: cancelling would waste the work, so the answer is sent anyway.
            return await job.future
        except DeadlineExceeded:
            raise ApiError(504, "deadline_exceeded", "not answered within its deadline") from None
        except BatchFailed as e:
            raise ApiError(500, "inference_failed", str(e)) from None
        except ShuttingDown as e:
            raise ApiError(503, "shutting_down", str(e), headers={"Connection": "close"}) from None
        except asyncio.CancelledError:
            self.scheduler.abandon(job, "disconnect")
            raise
        finally:
            watcher.cancel()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait until queued and in-flight requests are answered; False on timeout."""
        self.draining = True
        logger.info("draining: %d requests in progress, %d questions queued", self.active,
                    self.scheduler.queued_questions)
        deadline = time.monotonic() + timeout_s
        while (self.active or not self.scheduler.idle) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        drained = not self.active and self.scheduler.idle
        if not drained:
            logger.error("drain timeout: %d requests still in progress", self.active)
        return drained

    def _max_rows(self) -> int:
        return self.budget["max_rows"] if self.budget else (self.limits.max_rows or 1)

    def _run_batch(self, operation: str, questions: list[str], params: dict) -> list:
        if operation == "retrieve":
            return self.pipeline.retrieve(questions, **params)
        return self.pipeline.generate(questions, **params)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (uvicorn sends ``http.disconnect`` once the body is read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a server that repeats body messages must not make this spin
