"""What the bounded caches of a process hold and drop (kwserver/bounded_cache.py), as Prometheus metrics.

Workers publish theirs (registry answers, kept lists) with their other metrics every second; the cluster
cache process publishes its own (get_resource / can_i answers, lists and objects) to the same multiprocess
directory. Gauges count live processes only (a dead process's files are removed), evictions never go back.
Kept apart from kwserver.observability.metrics so that the cluster cache process imports nothing else.
"""

from __future__ import annotations

import weakref

from prometheus_client import Counter, Gauge

from kwserver.bounded_cache import CACHES, BoundedCache


class CacheMetrics:
    def __init__(self) -> None:
        self.entries = Gauge("kwserver_host_cache_entries", "Answers kept by the host-call caches", ["cache"],
                             multiprocess_mode="livesum", registry=None)
        self.bytes = Gauge("kwserver_host_cache_bytes", "Memory of the answers kept by the host-call caches",
                           ["cache"], multiprocess_mode="livesum", registry=None)
        self.evictions = Counter("kwserver_host_cache_evictions", "Answers dropped by the host-call caches, by reason "
                                 "(expired, full: a bound was reached, too_large: never kept)", ["cache", "reason"],
                                 registry=None)
        self._reflectors: tuple[Gauge, Gauge] | None = None  # made in the cluster cache process only
        self._published: weakref.WeakKeyDictionary[BoundedCache, dict[str, int]] = weakref.WeakKeyDictionary()
        self._names: set[str] = set()

    def publish(self) -> None:
        """Sweep every cache of this process, then publish sizes (per name) and new evictions."""
        sizes: dict[str, list[int]] = {name: [0, 0] for name in self._names}
        for cache in list(CACHES):
            cache.sweep()
            stats = cache.stats()
            size = sizes.setdefault(stats.name, [0, 0])
            size[0] += stats.entries
            size[1] += stats.bytes
            seen = self._published.setdefault(cache, {})
            for reason, count in stats.evictions.items():
                if count > seen.get(reason, 0):
                    self.evictions.labels(stats.name, reason).inc(count - seen.get(reason, 0))
                    seen[reason] = count
        for name, (entries, size_bytes) in sizes.items():
            self.entries.labels(name).set(entries)
            self.bytes.labels(name).set(size_bytes)
        self._names = set(sizes)

    def reflectors(self, lists: int, objects: int) -> None:
        """The cluster cache process's lists and objects (bounded by --cluster-max-reflectors / -objects)."""
        if self._reflectors is None:
            self._reflectors = (
                Gauge("kwserver_cluster_cache_lists", "Kubernetes lists (reflectors) the cluster cache keeps",
                      multiprocess_mode="livesum", registry=None),
                Gauge("kwserver_cluster_cache_objects", "Kubernetes objects the cluster cache keeps",
                      multiprocess_mode="livesum", registry=None))
        self._reflectors[0].set(lists)
        self._reflectors[1].set(objects)
