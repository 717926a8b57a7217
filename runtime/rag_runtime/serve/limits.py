"""The server's bounds: batching, queueing, deadlines and per-request caps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import InvalidOptionError

SCHEDULERS = ("engine", "request")


@dataclass(frozen=True)
class ServeLimits:
    """Everything that can wait or grow has a bound here; all are reported by ``GET /info``.

    Attributes:
        scheduler: ``engine`` (questions join and leave one running decode between its steps) or
            ``request`` (requests with equal parameters batched into one ``generate`` call, run to the end).
        max_batch_size: Questions decoding together at most (1 = batching off): in the engine, questions
            in the running decode; with request batching, questions in one ``generate`` call.
        max_rows: Engine: decoder rows one step may hold (memory and step time); None derives it from the
            export's cache bytes per row and the machine's memory. A question that needs more is refused.
        max_wait_ms: Request batching: how long the oldest queued question waits for others with equal
            parameters.
        max_queue: Questions allowed to wait; a request that would exceed it gets 429 at once.
        timeout_s: Default deadline of a request; still queued past it, it gets 504 and is never computed.
        drain_timeout_s: On SIGTERM/SIGINT, how long queued and in-flight work may take to finish.
        max_questions: Questions one request may carry (413 above).
        max_question_chars: Characters of one question (422 above).
        max_num_beams: Cap on ``num_beams`` (and ``num_return_sequences``).
        max_n_docs: Cap on ``n_docs``.
        max_length: Cap on ``max_length`` (and ``min_length``).
        max_body_bytes: Size of a request body (413 above).
        max_timeout_s: Cap on a request's own ``timeout_s``.
        failures_until_unready: Consecutive failed batches after which ``/health/ready`` says 503.
    """

    scheduler: str = "engine"
    max_batch_size: int = 8
    max_rows: int | None = None
    max_wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    max_questions: int = 32
    max_question_chars: int = 2000
    max_num_beams: int = 8
    max_n_docs: int = 20
    max_length: int = 256
    max_body_bytes: int = 1 << 20
    max_timeout_s: float = 300.0
    failures_until_unready: int = 3

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise InvalidOptionError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "scheduler" or (f.name == "max_rows" and value is None):
                continue
            floor = 0 if f.name == "max_wait_ms" else 1e-9
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < floor:
                raise InvalidOptionError(f"{f.name} must be a positive number, got {value!r}")

    def as_dict(self) -> dict:
        """The limits as plain JSON values."""
        return dataclasses.asdict(self)
