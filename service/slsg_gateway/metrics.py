"""Prometheus metrics on the gateway's own registry (several apps in one process stay apart).

Label values are bounded: models are only labelled once known to the backend (else "unknown"),
production lines only if listed in settings (else "other").
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from slsg_gateway.records.metrics import ReviewCollector
from slsg_gateway.records.store import RecordStore

STAGES = ("decode", "preprocess", "infer", "postprocess", "total")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class GatewayMetrics:
    """All gateway metrics; ``render()`` gives the text exposition format."""

    def __init__(self, lines: list[str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.known_lines = set(lines or [])
        r = self.registry
        self.requests = Counter("slsg_requests", "HTTP requests by route, model and status",
                                ["route", "model", "status"], registry=r)
        self.stage_seconds = Histogram("slsg_stage_seconds", "latency of each inspection stage",
                                       ["model", "stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.scores = Histogram("slsg_score", "calibrated anomaly scores", ["model"],
                                buckets=_SCORE_BUCKETS, registry=r)
        self.decisions = Counter("slsg_decisions", "inspection decisions", ["model", "line", "decision"],
                                 registry=r)
        self.batch_size = Histogram("slsg_batch_size", "images per backend call", ["model"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("slsg_queue_depth", "images waiting for a batch", ["model"], registry=r)
        self.in_flight = Gauge("slsg_in_flight", "inspection requests being processed", registry=r)
        self.backend_errors = Counter("slsg_backend_errors", "failed backend calls", ["model", "kind"],
                                      registry=r)
        self.model_version = Gauge("slsg_model_version_info", "served version (1 = serving)",
                                   ["model", "version"], registry=r)
        self.records_written = Counter("slsg_records_written", "inspection records stored", registry=r)
        self.records_dropped = Counter("slsg_records_dropped", "inspection records not stored (queue full, "
                                       "store error, shutting down)", ["reason"], registry=r)
        self.reviews = Counter("slsg_reviews", "operator reviews given through this gateway",
                               ["model", "version", "line", "verdict"], registry=r)
        # the review loop's figures, read from the record store at scrape time (empty while records are off)
        self.review_figures = ReviewCollector(self.line_label)
        r.register(self.review_figures)
        # desired state (NAME/serving.json, reconciled by slsg_gateway.reconcile)
        self.desired_version = Gauge("slsg_model_desired_version", "version the model's serving.json asks for",
                                     ["model"], registry=r)
        self.version_mismatch = Gauge("slsg_model_version_mismatch",
                                      "1 while the served version differs from the desired one", ["model"],
                                      registry=r)
        self.desired_state_invalid = Gauge("slsg_desired_state_invalid",
                                           "1 while the model's serving.json cannot be used (the served "
                                           "version stays)", ["model"], registry=r)
        self.reconcile_errors = Counter("slsg_reconcile_errors", "failed steps towards the desired state",
                                        ["model", "kind"], registry=r)

    def line_label(self, line_id: str | None) -> str:
        if not line_id:
            return "none"
        return line_id if line_id in self.known_lines else "other"

    def observe_stages(self, model: str, timings_ms: dict[str, float]) -> None:
        for stage in STAGES:
            self.stage_seconds.labels(model, stage).observe(timings_ms[stage] / 1e3)

    def set_served_version(self, model: str, version: int | None) -> None:
        """Keep exactly one version series per model (removes the old one on reload/unload)."""
        for labels in list(self.model_version._metrics):  # (model, version) tuples
            if labels[0] == model:
                self.model_version.remove(*labels)
        if version is not None:
            self.model_version.labels(model, str(version)).set(1)

    def watch_records(self, store: RecordStore) -> None:
        """Report the review loop's numbers from ``store`` at every scrape."""
        self.review_figures.store = store
    def forget_desired_state(self, model: str) -> None:
        """Drop the desired-state series of a model whose serving.json went away."""
        for gauge in (self.desired_version, self.version_mismatch, self.desired_state_invalid):
            try:
                gauge.remove(model)
            except KeyError:
                pass  # never set for this model

    def render(self) -> bytes:
        return generate_latest(self.registry)
