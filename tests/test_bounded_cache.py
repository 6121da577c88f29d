"""The bounded cache of host-call answers: its three bounds, its sweeping, and a flood of distinct lookups
through the Kubernetes client that keeps memory flat."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import orjson

from kwserver.bounded_cache import ENTRY_OVERHEAD_BYTES, BoundedCache
from kwserver.cluster.client import ClusterClient
from kwserver.cluster.limits import CacheLimits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache(clock: Clock, **limits: Any) -> BoundedCache:
    return BoundedCache("test", **{"max_entries": 100, "max_bytes": 1 << 20, "ttl": 5.0, "clock": clock, **limits})


def test_entries_leave_oldest_first_when_a_bound_is_reached():
    answers = cache(Clock(), max_entries=2)
    for key in "abc":
        answers.put(key, key.encode())
    assert (answers.get("a"), answers.get("b"), answers.get("c")) == (None, b"b", b"c")
    stats = answers.stats()
    assert stats.entries == 2 and stats.evictions["full"] == 1

    small = cache(Clock(), max_bytes=2 * (ENTRY_OVERHEAD_BYTES + 1 + 10))
    for key in "abc":
        small.put(key, b"x" * 10)
    assert small.get("a") is None and small.stats().bytes <= small.max_bytes


def test_a_value_larger_than_the_cache_is_not_kept_and_replaces_nothing():
    answers = cache(Clock(), max_bytes=1000)
    answers.put("a", b"a")
    answers.put("huge", b"x" * 1000)
    assert answers.get("huge") is None and answers.get("a") == b"a"
    assert answers.stats().evictions["too_large"] == 1


def test_answers_expire_and_are_swept():
    clock = Clock()
    answers = cache(clock)
    answers.put("a", b"1")
    clock.now = 4.9
    answers.put("b", b"2")
    assert answers.get("a") == b"1"  # a lookup does not renew it
    clock.now = 5.0
    assert answers.get("a") is None
    clock.now = 9.8
    answers.put("c", b"3")  # stores sweep the expired front: b went
    assert len(answers) == 2 and answers.stats().evictions["expired"] == 1
    clock.now = 20.0
    assert answers.sweep() == 2 and len(answers) == 0 and answers.stats().bytes == 0


def test_a_cache_that_renews_on_use_drops_the_least_recently_used():
    clock = Clock()
    kept = cache(clock, max_entries=2, renew_on_use=True)
    kept.put("a", b"1")
    kept.put("b", b"2")
    clock.now = 4.0
    assert kept.get("a") == b"1"  # used: expires 5 s from now, and is now the most recent
    kept.put("c", b"3")
    assert kept.get("b") is None
    clock.now = 8.5
    assert kept.get("a") == b"1" and kept.sweep() == 0
    clock.now = 13.6
    assert kept.sweep() == 2


def test_storing_again_replaces_and_counts_once():
    answers = cache(Clock())
    answers.put("a", b"1234")
    answers.put("a", b"12")
    assert answers.get("a") == b"12" and answers.stats().bytes == ENTRY_OVERHEAD_BYTES + 1 + 2


class ConfigMaps:
    """Enough of an HTTP client for ClusterClient.get: discovery, and any ConfigMap asked for exists."""

    class Response:
        def __init__(self, content: bytes):
            self.status_code, self.content = 200, content

    def request(self, method: str, path: str, **_: Any) -> Response:
        if path == "/api/v1":
            return self.Response(b'{"resources":[{"name":"configmaps","kind":"ConfigMap","namespaced":true}]}')
        name = path.rsplit("/", 1)[1]
        return self.Response(orjson.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": name, "namespace": "default", "labels": {"app": "flood"}}, "data": {"value": name * 20}}))


def _flood(client: ClusterClient, start: int, count: int) -> None:
    for i in range(start, start + count):
        client.get("v1", "ConfigMap", f"name-{i:06d}", "default", False, 5.0)


def test_a_policy_looking_up_100000_distinct_names_keeps_memory_flat():
    client = ClusterClient(ConfigMaps(), CacheLimits(max_answers=2_000, max_answer_bytes=1 << 20))
    tracemalloc.start()
    try:
        _flood(client, 0, 10_000)
        gc.collect()
        after_10k = tracemalloc.get_traced_memory()[0]
        _flood(client, 10_000, 90_000)
        gc.collect()
        after_100k = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    stats = client.answers.stats()
    assert stats.entries <= 2_000 and stats.bytes <= 1 << 20
    assert stats.evictions["full"] >= 98_000
    # Unbounded, 90,000 more answers would hold about 40 MB; bounded, the cache holds the same either way.
    assert after_100k - after_10k < 512 * 1024, (after_10k, after_100k)
