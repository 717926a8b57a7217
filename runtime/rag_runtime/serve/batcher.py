"""Dynamic batching: queued questions with equal parameters run together on one worker thread."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .limits import ServeLimits
from .metrics import ServeMetrics

logger = logging.getLogger("rag_runtime.serve")

RunBatch = Callable[[str, list[str], dict], list]
"""``run_batch(operation, questions, params) -> one result per question``, called on the worker thread."""


class QueueFull(Exception):
    """Admitting the request would make more than ``max_queue`` questions wait."""


class DeadlineExceeded(Exception):
    """The request was still queued at its deadline; it was not computed."""


class BatchFailed(Exception):
    """Inference raised for the batch the request was part of."""


class ShuttingDown(Exception):
    """The server stopped before the request was computed (a drain that timed out, a failed start)."""


@dataclass(eq=False)
class Job:
    """One request's questions in the queue.

    Attributes:
        operation: ``"generate"`` or ``"retrieve"``.
        questions: The request's questions, in order.
        params: Keyword arguments of the operation; only jobs with equal ones share a batch.
        deadline: ``time.monotonic()`` after which the job is dropped if it has not started.
        future: Resolved with one result per question, or an exception.
        queue_s: Seconds between admission and the start of its batch.
        inference_s: Seconds its batch computed.
        batch_size: Questions in its batch.
    """

    operation: str
    questions: list[str]
    params: dict
    deadline: float
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0

    @property
    def key(self) -> str:
        return self.operation + json.dumps(self.params, sort_keys=True)


class Batcher:
    """FIFO queue of jobs; a batch closes at ``max_batch_size`` questions or ``max_wait_ms``.

    The oldest job decides which parameters run next, so a rare parameter set is never starved. Inference
    runs on a single worker thread (onnxruntime releases the GIL), so the event loop keeps answering.

    Args:
        run_batch: Computes one batch on the worker thread.
        limits: Batch size, wait and queue bounds.
        metrics: Where queue depth, batch sizes and durations are recorded.
    """

    def __init__(self, run_batch: RunBatch, limits: ServeLimits, metrics: ServeMetrics):
        self._run_batch, self.limits, self.metrics = run_batch, limits, metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rag-infer")
        self._queue: list[Job] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.inflight = 0
        self.consecutive_failures = 0
        self._running: list[Job] = []  # the batch being computed

    @property
    def queued_questions(self) -> int:
        """Questions admitted and not yet computing."""
        return sum(len(j.questions) for j in self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing computing."""
        return not self._queue and not self.inflight

    def start(self) -> None:
        """Start the scheduling task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop scheduling and release the worker thread (after the batch it is computing). Jobs not yet
        answered (the batch cut short, the queue) get ``ShuttingDown`` rather than leaving clients hanging."""
        unanswered = [*self._running, *self._queue]
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in unanswered:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server stopped before answering this request"))
        self._queue.clear()
        self.metrics.queue_depth.set(0)
        self.executor.shutdown(wait=True)

    def submit(self, operation: str, questions: list[str], params: dict, timeout_s: float) -> Job:
        """Admit a job or refuse it at once.

        Raises:
            QueueFull: ``max_queue`` questions would be exceeded.
        """
        if self.queued_questions + len(questions) > self.limits.max_queue:
            raise QueueFull(f"{self.queued_questions} questions are queued (max_queue {self.limits.max_queue})")
        job = Job(operation, questions, params, time.monotonic() + timeout_s,
                  asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self.metrics.queue_depth.set(self.queued_questions)
        self._wakeup.set()
        return job

    def abandon(self, job: Job, reason: str) -> bool:
        """Drop a job that has not started (deadline, client gone); False once it is computing."""
        if job not in self._queue:
            return False
        self._queue.remove(job)
        self.metrics.queue_depth.set(self.queued_questions)
        self.metrics.cancelled.labels(reason).inc()
        if not job.future.done():
            job.future.set_exception(DeadlineExceeded(f"queued past its deadline ({reason})"))
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline <= now or j.future.done()]:
            self.abandon(job, "deadline" if not job.future.done() else "disconnect")

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch = await self._next_batch()
            if batch:
                await self._execute(batch)
                self._wakeup.set()  # whatever queued meanwhile is due now

    async def _next_batch(self) -> list[Job]:
        """Wait until the oldest job's batch is full or has waited ``max_wait_ms``; take it off the queue."""
        while True:
            self._expire()
            if not self._queue:
                return []
            head = self._queue[0]
            same = [j for j in self._queue if j.key == head.key]
            remaining = head.enqueued + self.limits.max_wait_ms / 1000 - time.monotonic()
            if sum(len(j.questions) for j in same) >= self.limits.max_batch_size or remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
                self._wakeup.clear()
            except asyncio.TimeoutError:
                pass
        batch, size = [], 0
        for job in same:
            if batch and size + len(job.questions) > self.limits.max_batch_size:
                break
            batch.append(job)
            size += len(job.questions)
        for job in batch:
            self._queue.remove(job)
        self.metrics.queue_depth.set(self.queued_questions)
        return batch

    async def _execute(self, batch: list[Job]) -> None:
        self._running = batch
        try:
            await self._compute(batch)
        finally:
            self._running = []

    async def _compute(self, batch: list[Job]) -> None:
        questions = [q for job in batch for q in job.questions]
        op, params = batch[0].operation, batch[0].params
        start = time.monotonic()
        for job in batch:
            job.started, job.queue_s, job.batch_size = True, start - job.enqueued, len(questions)
            self.metrics.queue_seconds.observe(job.queue_s)
        self.inflight = len(questions)
        self.metrics.inflight.set(self.inflight)
        self.metrics.batch_size.labels(op).observe(len(questions))
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._run_batch, op, questions, params)
            if len(results) != len(questions):
                raise RuntimeError(f"{op} returned {len(results)} results for {len(questions)} questions")
        except Exception as e:  # one bad batch must not take the service down
            self.consecutive_failures += 1
            self.metrics.failed_batches.inc()
            logger.error("%s batch of %d questions failed: %s: %s", op, len(questions), type(e).__name__,
                         str(e).splitlines()[0] if str(e) else "")
            logger.debug("batch failure", exc_info=True)
            results, error = None, BatchFailed(f"inference failed: {type(e).__name__}")
        else:
            self.consecutive_failures, error = 0, None
        finally:
            elapsed = time.monotonic() - start
            self.inflight = 0
            self.metrics.inflight.set(0)
            self.metrics.inference_seconds.labels(op).observe(elapsed)
        offset = 0
        for job in batch:
            job.inference_s = elapsed
            if not job.future.done():
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(results[offset : offset + len(job.questions)])
            offset += len(job.questions)
