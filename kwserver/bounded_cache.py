"""The one cache type for what policies make the server remember: answers of host calls.

A policy decides what is asked (a name per request, an image per pod), so every such cache is bounded three
ways: entries, bytes and age. Entries leave oldest first: when a bound is reached, and once their time to
live has passed. A cache that renews on use counts age from the last use instead, and its oldest entry is
the least recently used one. Either way the oldest entry is the first to expire, so expired entries are
swept from the front, a few at a time on every store and all at once by `sweep()` (the metrics call it
every second); a lookup never returns an expired answer. Thread-safe.

Every cache is listed in `CACHES` (weakly) so that the metrics can report sizes and evictions per name.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

V = TypeVar("V")
# What an entry costs beyond its value's bytes and its key's characters: objects, the dict slot, the expiry
# (tracemalloc: ~370 bytes per get_resource answer, keyed by a 6-tuple).
ENTRY_OVERHEAD_BYTES = 360
EXPIRED, FULL, TOO_LARGE = "expired", "full", "too_large"

CACHES: weakref.WeakSet[BoundedCache] = weakref.WeakSet()


def key_size(key: Hashable) -> int:
    """The bytes a key's strings take (tuples of strings and bytes, as the callers' keys are)."""
    if isinstance(key, str | bytes):
        return len(key)
    if isinstance(key, tuple):
        return sum(key_size(part) for part in key)
    return 8


@dataclass
class CacheStats:
    name: str
    entries: int = 0
    bytes: int = 0
    evictions: dict[str, int] = field(default_factory=lambda: {EXPIRED: 0, FULL: 0, TOO_LARGE: 0})


class BoundedCache(Generic[V]):
    """At most `max_entries` values of at most `max_bytes` together (as `size` counts them), each for `ttl`
    seconds after it was stored, or (`renew_on_use`) after it was last looked up."""

    def __init__(self, name: str, *, max_entries: int, max_bytes: int, ttl: float,
                 size: Callable[[V], int] = len, renew_on_use: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self.max_entries, self.max_bytes, self.ttl = name, max_entries, max_bytes, ttl
        self.size, self.renew_on_use, self.clock = size, renew_on_use, clock
        self._entries: OrderedDict[Hashable, tuple[float, int, V]] = OrderedDict()  # key -> (expiry, cost, value)
        self._bytes = 0
        self._evictions = {EXPIRED: 0, FULL: 0, TOO_LARGE: 0}
        self._lock = threading.Lock()
        CACHES.add(self)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            now = self.clock()
            if entry[0] <= now:
                self._drop(key, EXPIRED)
                return None
            if self.renew_on_use:
                self._entries[key] = (now + self.ttl, entry[1], entry[2])
                self._entries.move_to_end(key)
            return entry[2]

    def put(self, key: Hashable, value: V) -> None:
        cost = self.size(value) + key_size(key) + ENTRY_OVERHEAD_BYTES
        with self._lock:
            if key in self._entries:
                self._drop(key, None)
            self._sweep(limit=2)  # a few at a time keeps stores cheap and the cache free of the dead
            if cost > self.max_bytes or self.max_entries == 0:
                self._evictions[TOO_LARGE] += 1
                return
            while self._entries and (len(self._entries) >= self.max_entries or self._bytes + cost > self.max_bytes):
                self._drop(next(iter(self._entries)), FULL)
            self._entries[key] = (self.clock() + self.ttl, cost, value)
            self._bytes += cost

    def cached(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The cached value for `key`, else `compute()`'s, kept when it did not raise."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def sweep(self) -> int:
        """Drop every expired entry; how many went."""
        with self._lock:
            return self._sweep(limit=None)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.name, len(self._entries), self._bytes, dict(self._evictions))

    def _sweep(self, limit: int | None) -> int:
        now, dropped = self.clock(), 0
        while self._entries and (limit is None or dropped < limit):
            key, (expiry, _, _) = next(iter(self._entries.items()))
            if expiry > now:
                break
            self._drop(key, EXPIRED)
            dropped += 1
        return dropped

    def _drop(self, key: Hashable, reason: str | None) -> None:
        _, cost, _ = self._entries.pop(key)
        self._bytes -= cost
        if reason is not None:
            self._evictions[reason] += 1
