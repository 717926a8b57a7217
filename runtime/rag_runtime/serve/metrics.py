"""Prometheus metrics of one service instance (names prefixed ``rag_``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latencies span a tiny CPU model (milliseconds) to a large one under load (tens of seconds).
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64)


class ServeMetrics:
    """The service's counters, gauges and histograms, in a registry of their own.

    A registry per instance keeps several apps in one process (tests, Ray replicas) from colliding.

    Attributes:
        registry: The registry ``GET /metrics`` renders.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rag_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("rag_request_duration_seconds", "Request latency, arrival to response",
                                         ["endpoint"], buckets=_SECONDS, registry=r)
        self.queue_seconds = Histogram("rag_queue_duration_seconds", "Time a request waited before its batch ran",
                                       buckets=_SECONDS, registry=r)
        self.inference_seconds = Histogram("rag_inference_duration_seconds", "Compute time of one batch",
                                           ["operation"], buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("rag_batch_size", "Questions per computed batch", ["operation"],
                                    buckets=_BATCH, registry=r)
        self.queue_depth = Gauge("rag_queue_depth", "Questions waiting for a batch", registry=r)
        self.inflight = Gauge("rag_inflight_questions", "Questions being computed", registry=r)
        self.rejected = Counter("rag_rejected", "Requests refused before queueing, by reason", ["reason"],
                                registry=r)
        self.cancelled = Counter("rag_cancelled", "Queued requests dropped without compute, by reason",
                                 ["reason"], registry=r)
        self.failed_batches = Counter("rag_failed_batches", "Batches whose inference raised", registry=r)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
