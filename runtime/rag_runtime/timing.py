"""Optional stage timing: the benchmarks and the service plug a :class:`StageTimer` into a pipeline;
without one, the stages time nothing."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext

from .sessions import session_report


class StageTimer:
    """Accumulated wall time per pipeline stage, and per onnxruntime graph: ``onnxruntime/<graph>`` in all,
    and ``<stage>/onnxruntime/<graph>`` within the stage that called it (``decode``, ``rescore``, ...).

    Attributes:
        totals: Seconds per name since the last :meth:`reset`.
        counts: Times each name ran (for a graph: its calls) since the last :meth:`reset`.
        values: Quantities the stages report with :meth:`add` (the engine: ``decode/rows`` per step summed,
            ``rescore/positions``, ``generator_encode/rows``, ...).
        session_reports: Per graph of the pipelines it timed, what onnxruntime granted its session: providers, their
            options and, on CUDA, node placement (:func:`rag_runtime.sessions.session_report`).
    """

    enabled = True

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.values: dict[str, float] = defaultdict(float)
        self.session_reports: dict[str, dict] = {}
        self._stack: list[str] = []

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()
        self.values.clear()

    @property
    def current(self) -> str | None:
        """The innermost stage running now (None outside any)."""
        return self._stack[-1] if self._stack else None

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()
            self.totals[name] += time.perf_counter() - t0
            self.counts[name] += 1

    def add(self, name: str, value: float) -> None:
        """Add ``value`` to the quantity ``name``."""
        self.values[name] += value


class NullTimer:
    """The timer of a pipeline nobody measures."""

    enabled = False

    def stage(self, name: str) -> AbstractContextManager:
        return nullcontext()

    def add(self, name: str, value: float) -> None:
        pass


class TimedSession:
    """An onnxruntime session whose runs add to the timer's ``onnxruntime`` and ``onnxruntime/<graph>``."""

    def __init__(self, session, timer: StageTimer, graph: str):
        self._session, self._timer, self._stage = session, timer, f"onnxruntime/{graph}"
        timer.session_reports[graph] = session_report(session)

    def _timed(self, run, *args, **kwargs):
        outer = self._timer.current
        with self._timer.stage(f"{outer}/{self._stage}" if outer else self._stage), \
                self._timer.stage("onnxruntime"), self._timer.stage(self._stage):
            return run(*args, **kwargs)

    def run(self, *args, **kwargs):
        return self._timed(self._session.run, *args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        return self._timed(self._session.run_with_iobinding, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)
