"""Prometheus metrics of one service instance (names prefixed ``rag_``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latencies span a tiny CPU model (milliseconds) to a large one under load (tens of seconds).
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64)
_ROWS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048)


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
        # The decode engine (scheduler "engine").
        self.active_questions = Gauge("rag_active_questions", "Questions in the running decode", registry=r)
        self.decoder_rows = Histogram("rag_decoder_rows", "Decoder rows per engine step", buckets=_ROWS, registry=r)
        self.step_seconds = Histogram("rag_step_duration_seconds", "One engine step: the decoder call and its "
                                      "host work", buckets=_SECONDS, registry=r)
        self.encode_seconds = Histogram("rag_join_encode_duration_seconds", "Encoding the questions that join, "
                                        "between steps", buckets=_SECONDS, registry=r)
        self.rescore_seconds = Histogram("rag_rescore_duration_seconds", "RAG-Sequence rescoring of the questions "
                                         "whose searches ended, per step", buckets=_SECONDS, registry=r)
        self.joins = Counter("rag_engine_joins", "Questions that joined the running decode", registry=r)
        self.leaves = Counter("rag_engine_leaves", "Questions that left the running decode, by reason (done, "
                              "cancelled, failed)", ["reason"], registry=r)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
