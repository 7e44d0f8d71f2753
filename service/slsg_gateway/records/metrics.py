"""The review loop's numbers as Prometheus gauges, read from the record store at scrape time.

Every replica reports the same store-wide figures (dashboards take ``max`` over instances):
``slsg_review_pending{line}`` (anomalous verdicts nobody reviewed yet) and
``slsg_reviewed_inspections{model, version, decision, verdict}`` (reviewed records by the gateway's decision
and the operator's verdict; operator-confirmed precision per model version is
``{decision="anomalous", verdict="defect"}`` over the sum of ``{decision="anomalous"}``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from slsg_gateway.records.store import RecordStore

log = logging.getLogger(__name__)


class ReviewCollector(Collector):
    """Queries the store at most every ``min_interval_s`` (scrapes from several Prometheus share it)."""

    def __init__(self, line_label: Callable[[str | None], str], store: RecordStore | None = None,
                 min_interval_s: float = 10.0) -> None:
        self.store = store
        self.line_label = line_label
        self.min_interval_s = min_interval_s
        self._cached: tuple[float, dict[str, int], list[tuple[str, int, str, str, int]]] | None = None

    def _read(self) -> tuple[dict[str, int], list[tuple[str, int, str, str, int]]]:
        now = time.monotonic()
        if self._cached and now - self._cached[0] < self.min_interval_s:
            return self._cached[1], self._cached[2]
        pending: dict[str, int] = {}
        for line, n in self.store.pending_by_line().items():
            label = self.line_label(line)  # bounded label values, as for the decision counters
            pending[label] = pending.get(label, 0) + n
        counts = self.store.review_counts()
        self._cached = (now, pending, counts)
        return pending, counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending_family = GaugeMetricFamily("slsg_review_pending", "anomalous verdicts awaiting an operator's review",
                                           labels=["line"])
        reviewed_family = GaugeMetricFamily("slsg_reviewed_inspections", "reviewed inspections by the gateway's "
                                            "decision and the operator's verdict",
                                            labels=["model", "version", "decision", "verdict"])
        try:
            pending, counts = self._read() if self.store is not None else ({}, [])
        except Exception:  # a store outage must not break /metrics
            log.exception("could not read review figures from %s", self.store.description)
            pending, counts = {}, []
        for line, n in sorted(pending.items()):
            pending_family.add_metric([line], n)
        for model, version, decision, verdict, n in counts:
            reviewed_family.add_metric([model, str(version), decision, verdict], n)
        yield pending_family
        yield reviewed_family
