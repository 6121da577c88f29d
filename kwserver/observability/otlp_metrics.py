"""`--enable-metrics`: the reference's metrics pushed over OTLP, from the master.

Workers already write their evaluation totals for the Prometheus endpoint (metrics.WorkerMetrics); the
master reads the merged totals every `OTEL_METRIC_EXPORT_INTERVAL` milliseconds (60 s by default, as
the SDK's periodic reader) in a thread of its own and hands them to the official OTLP exporter as
cumulative sums and histograms. The request path is unchanged: a slow or absent collector only
delays that thread.

The SDK's own periodic reader is not used: its values would have to be recorded through the SDK's
instruments in every worker, and it restarts its thread in every forked child.

What is sent is what the reference sends: the meter `kubewarden`,
`kubewarden_policy_evaluations_total` and `kubewarden_policy_evaluation_latency_milliseconds`, with
the attribute set of each kind of request (absent attributes are absent, not empty; `accepted` and
`mutated` are booleans, `error_code` an integer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from kwserver.observability import otlp
from kwserver.observability.metrics import ARCHIVE_LOCK, LATENCY_BUCKETS_MS, OVERFLOW_LABEL, EvaluationCollector

log = logging.getLogger(__name__)

METER_NAME = "kubewarden"
EVALUATIONS = "kubewarden_policy_evaluations"
LATENCY = "kubewarden_policy_evaluation_latency_milliseconds"
DEFAULT_INTERVAL_MS = 60_000
DEFAULT_TIMEOUT_MS = 30_000
# At shutdown an absent collector may hold the master this long at most.
FINAL_EXPORT_TIMEOUT_MS = 5_000

Attributes = dict[str, str | bool | int]


def evaluation_attributes(labels: Mapping[str, str]) -> Attributes:
    """The reference's attributes for one labelled series of the Prometheus metrics."""
    if labels.get(OVERFLOW_LABEL):
        return {"otel.metric.overflow": True}
    if labels.get("initialization_error"):
        return {"policy_name": labels["policy_name"], "initialization_error": labels["initialization_error"]}
    attributes: Attributes = {"policy_name": labels["policy_name"], "policy_mode": labels["policy_mode"]}
    raw = not labels.get("request_origin")  # only raw requests have no origin
    if not raw:
        attributes["resource_kind"] = labels.get("resource_kind", "")
        attributes["resource_request_operation"] = labels.get("resource_request_operation", "")
    attributes["accepted"] = labels.get("accepted") == "true"
    attributes["mutated"] = labels.get("mutated") == "true"
    if not raw:
        attributes["request_origin"] = labels["request_origin"]
        if labels.get("resource_namespace"):
            attributes["resource_namespace"] = labels["resource_namespace"]
    if labels.get("error_code"):
        attributes["error_code"] = int(labels["error_code"])
    return attributes


def _series_key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "le"))


def read_evaluations(families: Iterable[Any]) -> tuple[dict, dict]:
    """Counter totals and histogram states, by label set, from merged Prometheus metric families.

    Histograms come back as {labels: (cumulative bucket counts in LATENCY_BUCKETS_MS order then +Inf, sum)}.
    """
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    histograms: dict[tuple[tuple[str, str], ...], tuple[list[float], float]] = {}
    bounds = [float(b) for b in LATENCY_BUCKETS_MS] + [float("inf")]
    for family in families:
        if family.name == EVALUATIONS:
            for sample in family.samples:
                if sample.name == EVALUATIONS + "_total":
                    counts[_series_key(sample.labels)] = sample.value
        elif family.name == LATENCY:
            for sample in family.samples:
                key = _series_key(sample.labels)
                cumulative, total = histograms.get(key, ([0.0] * len(bounds), 0.0))
                if sample.name == LATENCY + "_bucket":
                    cumulative[bounds.index(float(sample.labels["le"]))] = sample.value
                elif sample.name == LATENCY + "_sum":
                    total = sample.value
                histograms[key] = (cumulative, total)
    return counts, histograms


def metrics_data(families: Iterable[Any], resource: Any, start_ns: int, now_ns: int) -> Any:
    """The OTLP payload (the SDK's MetricsData) of the reference's two instruments."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    counts, histograms = read_evaluations(families)
    cumulative = AggregationTemporality.CUMULATIVE
    counter_points = [
        NumberDataPoint(attributes=evaluation_attributes(dict(key)), start_time_unix_nano=start_ns,
                        time_unix_nano=now_ns, value=int(value))
        for key, value in sorted(counts.items())
    ]
    histogram_points = []
    for key, (buckets, total) in sorted(histograms.items()):
        per_bucket = [int(count - previous) for previous, count in zip([0.0, *buckets[:-1]], buckets, strict=True)]
        histogram_points.append(HistogramDataPoint(
            attributes=evaluation_attributes(dict(key)), start_time_unix_nano=start_ns, time_unix_nano=now_ns,
            count=int(buckets[-1]), sum=int(total), bucket_counts=per_bucket,
            explicit_bounds=[float(b) for b in LATENCY_BUCKETS_MS], min=None, max=None,
        ))
    metrics = []
    if counter_points:
        metrics.append(Metric(name=EVALUATIONS + "_total", description="", unit="",
                              data=Sum(counter_points, cumulative, is_monotonic=True)))
    if histogram_points:
        metrics.append(Metric(name=LATENCY, description="", unit="", data=Histogram(histogram_points, cumulative)))
    scope = ScopeMetrics(InstrumentationScope(METER_NAME), metrics, schema_url="")
    return MetricsData([ResourceMetrics(resource, [scope], schema_url="")])


class MetricsPush:
    """The master's export thread: reads the merged counts and exports them, every interval and at stop."""

    def __init__(self, directory: str, exporter: Any, resource: Any, interval_seconds: float,
                 timeout_millis: int = DEFAULT_TIMEOUT_MS):
        self.directory = directory
        self.exporter = exporter
        self.resource = resource
        self.interval_seconds = interval_seconds
        self.timeout_millis = timeout_millis
        self.start_ns = time.time_ns()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)

    @classmethod
    def from_env(cls, directory: str) -> MetricsPush:
        interval = otlp.milliseconds_variable("OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_INTERVAL_MS)
        timeout = otlp.milliseconds_variable("OTEL_METRIC_EXPORT_TIMEOUT", DEFAULT_TIMEOUT_MS)
        return cls(directory, otlp.metric_exporter(), otlp.resource(), interval / 1000, timeout)

    def start(self) -> None:
        self._thread.start()

    def in_worker(self) -> None:
        """Nothing to drop in a forked worker: the export thread and its connection are the master's."""

    def export_once(self, timeout_millis: int | None = None) -> None:
        with ARCHIVE_LOCK:
            families = list(EvaluationCollector(self.directory).collect())
        data = metrics_data(families, self.resource, self.start_ns, time.time_ns())
        if not data.resource_metrics[0].scope_metrics[0].metrics:
            return  # nothing evaluated yet
        # A failure is logged by the exporter; the next export sends the (cumulative) totals again.
        self.exporter.export(data, timeout_millis=timeout_millis or self.timeout_millis)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_seconds):
            self._export_logged()

    def _export_logged(self, timeout_millis: int | None = None) -> None:
        try:
            self.export_once(timeout_millis)
        except Exception:  # the thread outlives any failure; the next interval tries again
            log.exception("OTLP metrics export failed")

    def stop(self) -> None:
        """Export the final totals (the workers have exited and been folded in) and close the exporter."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=FINAL_EXPORT_TIMEOUT_MS / 1000)
        self._export_logged(min(self.timeout_millis, FINAL_EXPORT_TIMEOUT_MS))
        try:
            self.exporter.shutdown()
        except Exception:
            log.exception("closing the OTLP metrics exporter failed")
