"""Optional stage timing: the benchmarks and the service plug a :class:`StageTimer` into a pipeline;
without one, the stages time nothing."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext

from .sessions import describe


class StageTimer:
    """Accumulated wall time per pipeline stage, and per onnxruntime graph (``onnxruntime/<graph>``).

    Attributes:
        totals: Seconds per stage name since the last :meth:`reset`.
        sessions: Per graph of the pipelines it timed, what onnxruntime granted its session: providers, their
            options and, on CUDA, node placement (:func:`rag_runtime.sessions.describe`).
    """

    enabled = True

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.sessions: dict[str, dict] = {}

    def reset(self) -> None:
        self.totals.clear()

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0


class NullTimer:
    """The timer of a pipeline nobody measures."""

    enabled = False

    def stage(self, name: str) -> AbstractContextManager:
        return nullcontext()


class TimedSession:
    """An onnxruntime session whose runs add to the timer's ``onnxruntime`` and ``onnxruntime/<graph>``."""

    def __init__(self, session, timer: StageTimer, graph: str):
        self._session, self._timer, self._stage = session, timer, f"onnxruntime/{graph}"
        timer.sessions[graph] = describe(session)

    def _timed(self, run, *args, **kwargs):
        with self._timer.stage("onnxruntime"), self._timer.stage(self._stage):
            return run(*args, **kwargs)

    def run(self, *args, **kwargs):
        return self._timed(self._session.run, *args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        return self._timed(self._session.run_with_iobinding, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)
