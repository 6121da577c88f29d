"""Prometheus metrics in gunicorn's multiprocess world.

Workers count into per-process files; the master serves the merged view. The per-policy evaluation
counters and latency histograms are many series (policies x outcomes x buckets), so a worker keeps their
totals in two dicts and writes them as one JSON file (`evaluations_<pid>.json`); in prometheus-client's
multiprocess files they cost about 40 KiB per policy in every worker (a Python value object and an mmap
entry per bucket). The few other metrics use prometheus-client's multiprocess files. When a worker exits,
its counts are folded into the master's archive files and its files are deleted, so totals never go
backwards and the directory does not grow with every recycled worker. Process memory is read by the master
at scrape time.

Metric names and labels of the reference server (`kubewarden_policy_evaluations_total`,
`kubewarden_policy_evaluation_latency_milliseconds`) are kept. Its attribute sets vary by request
kind; Prometheus treats an empty label as an absent one, so absent attributes are empty strings.

Some labels come from the requests (namespace, kind, operation) and from what policies answer (error
code), so their number of series is bounded as OpenTelemetry's SDK bounds it: past `--metric-series-limit`
series, a worker counts new label sets in one overflow series whose only label is
`otel_metric_overflow="true"`. Label values are always strings.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
import prometheus_client
import prometheus_client.values
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from kwserver.capabilities import DENIALS
from kwserver.evaluation import InstancePool
from kwserver.observability.cache_metrics import CacheMetrics
from kwserver.server.service import EvaluationRecord

LATENCY_BUCKETS_MS = (0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)
OVERFLOW_LABEL = "otel_metric_overflow"
EVALUATION_LABELS = (
    "policy_name", "policy_mode", "resource_kind", "resource_request_operation", "accepted", "mutated",
    "request_origin", "resource_namespace", "error_code", "initialization_error", OVERFLOW_LABEL,
)
OVERFLOW = ("",) * (len(EVALUATION_LABELS) - 1) + ("true",)
DEFAULT_SERIES_LIMIT = 2000  # OpenTelemetry's default cardinality limit
ARCHIVE_ID = "archive"
EVALUATIONS_METRIC = "kubewarden_policy_evaluations"
LATENCY_METRIC = "kubewarden_policy_evaluation_latency_milliseconds"
# Held while a dead worker's counts move into the archive: a reader in between would count them twice.
ARCHIVE_LOCK = threading.Lock()


def prepare_directory(directory: str | None) -> str:
    """Create (or empty) the multiprocess directory and switch prometheus-client to multiprocess mode.

    Must run in the master before any worker exists and before any metric value is created.
    """
    path = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="kwserver-metrics-")
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")) + glob.glob(os.path.join(path, "evaluations_*.json")):
        os.unlink(stale)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    # prometheus-client picks its value class when first imported; make sure it is the multiprocess one.
    prometheus_client.values.ValueClass = prometheus_client.values.get_value_class()
    return path


class WorkerMetrics:
    """What workers count. Created in the master (no values yet), used in the workers.

    Counting goes into plain dicts in the worker; `flush` publishes to the multiprocess files. A
    write to those files costs tens of microseconds (a pid check and an mmap write per value), a dict
    update well under one, so the worker flushes once a second and when it exits. A worker killed
    without exiting loses at most its last second of counts; totals still never go backwards.
    """

    def __init__(self, series_limit: int = DEFAULT_SERIES_LIMIT) -> None:
        self.totals = EvaluationTotals(series_limit)
        self.requests = Counter("kwserver_worker_requests", "Admission requests served", registry=None)
        self.busy = Counter("kwserver_worker_busy_seconds", "Time spent serving admission requests",
                            registry=None)
        self.instance_events = Counter(
            "kwserver_instance_cache_events", "Instance cache hits, misses, evictions and discards", ["event"],
            registry=None)
        # `instance`: the policies using the instances: those sharing a module's (the first two names
        # and how many more), or one with `ownInstance: true`.
        self.instances = Gauge("kwserver_policy_instances", "Idle policy instances kept by the workers",
                               ["instance"], multiprocess_mode="livesum", registry=None)
        self.instance_memory = Gauge(
            "kwserver_policy_instance_memory_bytes", "Linear memory of idle policy instances",
            ["instance"], multiprocess_mode="livesum", registry=None)
        # `capability`: the path refused (`kubernetes/can_i`), `unknown` for one the host does not have.
        self.denials = Counter("kwserver_host_capability_denials", "Host calls refused by a policy's hostCapabilities",
                               ["policy_name", "capability"], registry=None)
        self.caches = CacheMetrics()
        self._pending = PendingCounts()
        self.pool: InstancePool | None = None  # the worker's instance pool, read at each flush
        self._pool_events: tuple[InstancePool | None, dict[str, int]] = (None, {})  # as last published

    def observe(self, record: EvaluationRecord) -> None:
        request = record.request
        labels = (
            _text(record.policy_id), _text(record.policy_mode),
            "" if request.raw else _text(request.kind),
            "" if request.raw else _text(request.operation),
            "true" if record.accepted else "false",
            "true" if record.mutated else "false",
            "" if request.raw else _text(record.origin),
            "" if request.raw else _text(request.namespace),
            _text(record.error_code),
            _text(record.initialization_error),
            "",
        )
        pending = self._pending
        if (labels not in pending.evaluations and labels not in self.totals.evaluations
                and len(pending.evaluations) + len(self.totals.evaluations) >= self.totals.limit - 1):
            labels = OVERFLOW
        pending.evaluations[labels] = pending.evaluations.get(labels, 0) + 1
        if record.seconds is not None:
            milliseconds = int(record.seconds * 1000)
            bucket = bisect.bisect_left(LATENCY_BUCKETS_MS, milliseconds)
            counts = pending.latency.get(labels)
            if counts is None:
                counts = pending.latency[labels] = [0] * (len(LATENCY_BUCKETS_MS) + 2)  # buckets, +Inf, sum
            counts[bucket] += 1
            counts[-1] += milliseconds

    def served(self, seconds: float) -> None:
        pending = self._pending
        pending.requests += 1
        pending.busy_seconds += seconds

    def flush(self) -> None:
        """Publish what was counted since the last flush to this process's multiprocess files."""
        pending, self._pending = self._pending, PendingCounts()
        if pending.evaluations or pending.latency:
            self.totals.add(pending.evaluations, pending.latency)
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            if directory:
                self.totals.write(evaluations_path(directory, os.getpid()))
        if self.pool is not None:
            self._publish_pool(self.pool)
        for key in list(DENIALS):  # counted on this thread by the policies' host calls
            self.denials.labels(*key).inc(DENIALS.pop(key))
        self.caches.publish()
        # The served requests last: a reader that sees them counted sees all they did counted too.
        if pending.requests:
            self.requests.inc(pending.requests)
            self.busy.inc(pending.busy_seconds)

    def _publish_pool(self, pool: InstancePool) -> None:
        report = pool.report()
        seen, published = self._pool_events
        if seen is not pool:  # a pool of a new configuration counts from zero
            published = {}
        for name, total in report.events.items():
            if total > published.get(name, 0):
                self.instance_events.labels(name).inc(total - published.get(name, 0))
        self._pool_events = (pool, report.events)
        for label, (count, memory_bytes) in report.idle.items():
            self.instances.labels(label).set(count)
            self.instance_memory.labels(label).set(memory_bytes)


def _text(value: Any) -> str:
    """A label value: always a string, whatever a request or a policy put there."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


class PendingCounts:
    """What a worker counted since its last flush."""

    __slots__ = ("busy_seconds", "evaluations", "latency", "requests")

    def __init__(self) -> None:
        self.evaluations: dict[tuple[str, ...], int] = {}
        self.latency: dict[tuple[str, ...], list[int]] = {}
        self.requests = 0
        self.busy_seconds = 0.0


class EvaluationTotals:
    """Evaluation counts and latency histograms by label values: {labels: count} and {labels: [per-bucket
    counts (not cumulative), +Inf, sum of milliseconds]}."""

    __slots__ = ("evaluations", "latency", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.evaluations: dict[tuple[str, ...], int] = {}
        self.latency: dict[tuple[str, ...], list[int]] = {}
        self.limit = limit or 1 << 62  # series, the overflow series included

    def _admit(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        if labels in self.evaluations or len(self.evaluations) < self.limit - 1:
            return labels
        return OVERFLOW

    def add(self, evaluations: dict[tuple[str, ...], int], latency: dict[tuple[str, ...], list[int]]) -> None:
        for labels, count in evaluations.items():
            labels = self._admit(labels)
            self.evaluations[labels] = self.evaluations.get(labels, 0) + count
        for labels, counts in latency.items():
            labels = labels if labels in self.evaluations else OVERFLOW
            current = self.latency.get(labels)
            if current is None:
                self.latency[labels] = list(counts)
            else:
                for index, count in enumerate(counts):
                    current[index] += count

    def write(self, path: str) -> None:
        """Replace the file at once, so that a reader sees the old totals or the new ones, never half."""
        data = orjson.dumps({"evaluations": [[*k, v] for k, v in self.evaluations.items()],
                             "latency": [[*k, v] for k, v in self.latency.items()]})
        temporary = f"{path}.tmp"
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)

    @classmethod
    def read(cls, path: str, limit: int | None = None) -> EvaluationTotals:
        totals = cls(limit)
        try:
            with open(path, "rb") as f:
                doc = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            return totals
        totals.add({_labels(row[:-1]): row[-1] for row in doc.get("evaluations", [])},
                   {_labels(row[:-1]): row[-1] for row in doc.get("latency", [])})
        return totals


def _labels(values: list[Any]) -> tuple[str, ...]:
    return tuple(_text(value) for value in values)


def evaluations_path(directory: str, pid: int | str) -> str:
    return os.path.join(directory, f"evaluations_{pid}.json")


def evaluation_totals(directory: str) -> EvaluationTotals:
    """The totals of every process that ever evaluated (live files and the archive)."""
    merged = EvaluationTotals()
    for path in glob.glob(os.path.join(directory, "evaluations_*.json")):
        found = EvaluationTotals.read(path)
        merged.add(found.evaluations, found.latency)
    return merged


class EvaluationCollector:
    """The reference's evaluation counter and latency histogram, from the workers' totals files."""

    def __init__(self, directory: str):
        self.directory = directory

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        totals = evaluation_totals(self.directory)
        evaluations = CounterMetricFamily(EVALUATIONS_METRIC, "Policy evaluations", labels=EVALUATION_LABELS)
        for labels, count in sorted(totals.evaluations.items()):
            evaluations.add_metric(labels, count)
        yield evaluations
        latency = HistogramMetricFamily(LATENCY_METRIC, "Policy evaluation latency in milliseconds",
                                        labels=EVALUATION_LABELS)
        bounds = [*(str(float(b)) for b in LATENCY_BUCKETS_MS), "+Inf"]
        for labels, counts in sorted(totals.latency.items()):
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts[:-1], strict=True):
                running += count
                cumulative.append((bound, running))
            latency.add_metric(labels, cumulative, counts[-1])
        yield latency


def archive_dead_worker(directory: str, pid: int, series_limit: int = DEFAULT_SERIES_LIMIT) -> None:
    """Fold a dead worker's counts into the archive files (within the series limit), then delete its files."""
    with ARCHIVE_LOCK:
        _archive(directory, pid, series_limit)


def _archive(directory: str, pid: int, series_limit: int) -> None:
    path = evaluations_path(directory, pid)
    if os.path.exists(path):
        archive = evaluations_path(directory, ARCHIVE_ID)
        totals = EvaluationTotals.read(archive, series_limit)
        dead = EvaluationTotals.read(path)
        totals.add(dead.evaluations, dead.latency)
        totals.write(archive)
        os.unlink(path)
    for path in glob.glob(os.path.join(directory, f"*_{pid}.db")):
        kind = os.path.basename(path).split("_", 1)[0]
        if kind in ("counter", "histogram"):
            archive = MmapedDict(os.path.join(directory, f"{kind}_{ARCHIVE_ID}.db"))
            try:
                for key, value, *_ in MmapedDict.read_all_values_from_file(path):
                    current, _ = archive.read_value(key)
                    archive.write_value(key, current + value, 0.0)
            finally:
                archive.close()
        os.unlink(path)


def per_process_values(directory: str, metric: str) -> dict[int, dict[tuple[tuple[str, str], ...], float]]:
    """One metric's values read from each live process's own file: {pid: {labels: value}}."""
    result: dict[int, dict[tuple[tuple[str, str], ...], float]] = {}
    for path in glob.glob(os.path.join(directory, "*.db")):
        name = os.path.basename(path)[:-3]
        pid_text = name.rsplit("_", 1)[-1]
        if not pid_text.isdigit():
            continue
        for key, value, *_ in MmapedDict.read_all_values_from_file(path):
            metric_name, sample, labels, _ = _parse_key(key)
            if metric_name == metric and sample in (metric, metric + "_total"):
                result.setdefault(int(pid_text), {})[tuple(sorted(labels.items()))] = value
    return result


def metric_total(directory: str, metric: str) -> float:
    """A counter summed over every process that ever counted it (live files and the archive)."""
    total = 0.0
    for path in glob.glob(os.path.join(directory, "counter_*.db")):
        for key, value, *_ in MmapedDict.read_all_values_from_file(path):
            metric_name, sample, _, _ = _parse_key(key)
            if metric_name == metric and sample == metric + "_total":
                total += value
    return total


def _parse_key(key: str) -> tuple[str, str, dict[str, str], str]:
    metric_name, sample, labels, help_text = json.loads(key)
    return metric_name, sample, labels, help_text


class MasterCollector:
    """Gauges computed by the master at scrape time: process memory, pool size, boot facts."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot()
        memory = GaugeMetricFamily("kwserver_process_memory_bytes", "Memory of kwserver processes (psutil)",
                                   labels=["role", "pid", "kind"])
        for process in snap["processes"]:
            for kind in ("rss", "uss", "pss", "shared", "swap"):
                memory.add_metric([process["role"], str(process["pid"]), kind], process[kind])
        yield memory
        yield _gauge("kwserver_workers", "Worker processes alive", snap["workers"])
        yield _gauge("kwserver_compiled_modules_bytes", "Size of the compiled module artifacts shared by workers",
                     snap["compiled_module_bytes"])
        yield _gauge("kwserver_compiled_modules", "Unique compiled policy modules", snap["modules"])
        yield _gauge("kwserver_policies", "Policies and policy groups loaded", snap["policies"])
        yield _gauge("kwserver_boot_seconds", "Time spent loading policies at the last (re)load",
                     snap["boot_seconds"])
        cache = GaugeMetricFamily("kwserver_compile_cache_lookups", "Compile cache lookups at the last (re)load",
                                  labels=["result"])
        cache.add_metric(["hit"], snap["compile_cache_hits"])
        cache.add_metric(["miss"], snap["compile_cache_misses"])
        yield cache


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def master_registry(directory: str, extra: Iterable[Any] = ()) -> CollectorRegistry:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    registry.register(EvaluationCollector(directory))
    for collector in extra:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    with ARCHIVE_LOCK:
        return prometheus_client.generate_latest(registry)


def remove_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
