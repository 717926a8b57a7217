"""Iteration-level scheduling: requests' questions join and leave one running decode.

The event loop admits a request (or refuses it at once: 429 when ``max_queue`` questions would wait) and
awaits its future. One worker thread loops: it takes the requests admitted since the last step, retrieves
their passages and builds their contexts, adds their questions to the decode engine, runs one engine step
(joiners' encoder, one decoder call over every active row, rescoring), and answers each request whose
questions have all ended. A request whose client left or whose deadline passed has its questions cancelled:
they leave the running decode before the next decoder call, freeing their rows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .batcher import BatchFailed, DeadlineExceeded, QueueFull, ShuttingDown
from .limits import ServeLimits
from .metrics import ServeMetrics

logger = logging.getLogger("rag_runtime.serve")


@dataclass(eq=False)
class EngineJob:
    """One request's questions in the scheduler.

    Attributes:
        operation: ``"generate"`` or ``"retrieve"``.
        questions: The request's questions, in order.
        params: ``retrieve``: its keywords; ``generate``: the resolved ``GenerationOptions``.
        deadline: ``time.monotonic()`` after which the request is answered 504 and its questions leave.
        future: Resolved (on the event loop) with one result per question, or an exception.
        queue_s: Seconds from admission until its questions joined the decode.
        inference_s: Seconds from joining until its last question ended.
        batch_size: Mean questions decoding per step while its questions decoded (itself included).
    """

    operation: str
    questions: list[str]
    params: Any
    deadline: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_size: float = 0.0
    started: bool = False
    cancelled: str | None = None
    _tickets: list = field(default_factory=list)
    _prepared: list = field(default_factory=list)
    _company: list = field(default_factory=list)

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        """Answer the request from any thread (once)."""

        def set_once():
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)

        self.loop.call_soon_threadsafe(set_once)


class EngineScheduler:
    """One decode engine over the service's pipeline, stepped by one worker thread.

    Args:
        pipeline: Returns the service's loaded pipeline (it loads after the scheduler is built).
        max_rows: Returns the engine's row budget (known once the export is loaded).
        limits: Queue, deadline and batch bounds.
        metrics: Where queue depth, steps, rows, joins and leaves are recorded.
    """

    def __init__(self, pipeline, max_rows, limits: ServeLimits, metrics: ServeMetrics):
        self._pipeline, self._max_rows, self.limits, self.metrics = pipeline, max_rows, limits, metrics
        self._joins_seen = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rag-load")
        self._lock = threading.Condition()
        self._inbox: deque[EngineJob] = deque()
        self._jobs: list[EngineJob] = []
        self._engine = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.consecutive_failures = 0

    @property
    def queued_questions(self) -> int:
        """Questions admitted and not decoding yet."""
        with self._lock:
            waiting = sum(len(j.questions) for j in self._inbox)
        return waiting + (self._engine.pending_questions if self._engine is not None else 0)

    @property
    def idle(self) -> bool:
        """Nothing admitted is unanswered."""
        with self._lock:
            return not self._inbox and not self._jobs

    @property
    def engine(self):
        """The decode engine (None until the first request after loading)."""
        return self._engine

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rag-decode", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop after the current step; unanswered requests get ``ShuttingDown``."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 60)
        with self._lock:
            unanswered, self._jobs = [*self._inbox, *self._jobs], []
            self._inbox.clear()
        for job in unanswered:
            job.resolve(error=ShuttingDown("the server stopped before answering this request"))
        self.metrics.queue_depth.set(0)
        self.executor.shutdown(wait=True)

    def submit(self, operation: str, questions: list[str], params, timeout_s: float) -> EngineJob:
        """Admit a request or refuse it at once.

        Raises:
            QueueFull: ``max_queue`` questions would wait.
        """
        waiting = self.queued_questions
        if waiting + len(questions) > self.limits.max_queue:
            raise QueueFull(f"{waiting} questions are queued (max_queue {self.limits.max_queue})")
        loop = asyncio.get_running_loop()
        job = EngineJob(operation, questions, params, time.monotonic() + timeout_s, loop.create_future(), loop)
        with self._lock:
            self._inbox.append(job)
            self._lock.notify()
        self.metrics.queue_depth.set(self.queued_questions)
        return job

    def abandon(self, job: EngineJob, reason: str) -> bool:
        """The client left or the deadline passed: its questions leave the decode at the next step.
        Returns True (the request is answered 504) unless it was already answered."""
        if job.future.done() or job.cancelled:
            return not job.future.done() or job.cancelled is not None
        job.cancelled = reason
        with self._lock:
            if job in self._inbox:
                self._inbox.remove(job)
                self._lock.notify()
        for ticket in job._tickets:
            ticket.cancel()
        self.metrics.cancelled.labels(reason).inc()
        job.resolve(error=DeadlineExceeded(f"answered 504 ({reason}); its questions left the decode"))
        return True

    # -- the worker thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._inbox and not (self._engine and self._engine.busy):
                    self._lock.wait(timeout=0.5)
                if self._stopping:
                    return
                new = list(self._inbox)
                self._inbox.clear()
                self._jobs.extend(new)
            try:
                self._start(new)
                self._expire()
                if self._engine is not None and self._engine.busy:
                    self._step()
            except Exception as e:  # never let the worker die: fail what it was doing
                logger.error("scheduler step failed: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                logger.debug("scheduler failure", exc_info=True)
                self._fail_all(e)

    def _ensure_engine(self, pipe):
        if self._engine is None:
            self._engine = pipe.engine(self._max_rows(), self.limits.max_batch_size, listener=self._observe)
            self._joins_seen = 0
        return self._engine

    def _start(self, jobs: list[EngineJob]) -> None:
        """New requests: retrieval answers at once; generation prepares contexts and joins the engine."""
        pipe = self._pipeline()
        for job in jobs:
            if job.cancelled:
                self._finish(job)
                continue
            try:
                if job.operation == "retrieve":
                    start = time.monotonic()
                    job.queue_s = start - job.enqueued
                    results = pipe.retrieve(job.questions, **job.params)
                    job.inference_s = time.monotonic() - start
                    job.resolve(results)
                    self._finish(job)
                    continue
                job._prepared = pipe.prepare(job.questions, job.params)
                engine = self._ensure_engine(pipe)
                job._tickets = [engine.add(p.request.decode, p.request.contexts, p.request.rescore_contexts, tag=job)
                                for p in job._prepared]
                job.started = True
            except Exception as e:  # one bad request fails alone
                self._failed(job, e)
        self.metrics.queue_depth.set(self.queued_questions)

    def _expire(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._jobs if j.deadline <= now and not j.cancelled and not j.future.done()]:
            self.abandon(job, "deadline")

    def _step(self) -> None:
        engine = self._engine
        ended = engine.step()
        active = engine.active_questions
        self.metrics.active_questions.set(active)
        self.metrics.inflight.set(active)
        self.metrics.joins.inc(engine.stats.joins - self._joins_seen)
        self._joins_seen = engine.stats.joins
        for job in self._jobs:
            if any(t.state == "active" for t in job._tickets):
                job._company.append(active)
        for ticket in ended:
            self.metrics.leaves.labels(ticket.state).inc()
            if ticket.state == "failed":
                self.consecutive_failures += 1
        if any(t.state == "done" for t in ended):
            self.consecutive_failures = 0
        for job in {t.tag for t in ended}:
            if all(t.state not in ("pending", "active") for t in job._tickets):
                self._answer(job)
        self.metrics.queue_depth.set(self.queued_questions)

    def _answer(self, job: EngineJob) -> None:
        tickets = job._tickets
        joined = max((t.joined_at for t in tickets if t.joined_at), default=time.monotonic())
        job.queue_s = joined - job.enqueued  # admission (not the worker picking it up) to the last join
        job.inference_s = time.monotonic() - joined
        job.batch_size = sum(job._company) / len(job._company) if job._company else 0.0
        failed = next((t for t in tickets if t.state == "failed"), None)
        if job.cancelled:  # answered 504 already; counted as cancelled
            self._finish(job)
            return
        if failed is not None:
            self.metrics.failed_batches.inc()
            job.resolve(error=BatchFailed(f"inference failed: {type(failed.error).__name__}"))
        else:
            pipe = self._pipeline()
            job.resolve([pipe.answer(p, t.result) for p, t in zip(job._prepared, tickets, strict=True)])
        self.metrics.queue_seconds.observe(job.queue_s)
        self.metrics.inference_seconds.labels(job.operation).observe(job.inference_s)
        self.metrics.batch_size.labels(job.operation).observe(len(job.questions))
        self._finish(job)

    def _failed(self, job: EngineJob, error: BaseException) -> None:
        logger.error("%s of %d questions failed: %s: %s", job.operation, len(job.questions), type(error).__name__,
                     str(error).splitlines()[0] if str(error) else "")
        self.consecutive_failures += 1
        self.metrics.failed_batches.inc()
        job.resolve(error=BatchFailed(f"inference failed: {type(error).__name__}"))
        for ticket in job._tickets:
            ticket.cancel()
        self._finish(job)

    def _fail_all(self, error: BaseException) -> None:
        for job in list(self._jobs):
            self._failed(job, error)
        self._engine = None

    def _finish(self, job: EngineJob) -> None:
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)

    def _observe(self, phase: str, seconds: float, rows: int) -> None:
        m = self.metrics
        if phase == "decode":
            m.step_seconds.observe(seconds)
            m.decoder_rows.observe(rows)
        elif phase == "encode":
            m.encode_seconds.observe(seconds)
        else:
            m.rescore_seconds.observe(seconds)
