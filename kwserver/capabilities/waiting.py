"""What the registry callbacks share: their 60 s answer caches, and network waits bounded by the policy's
deadline.

A host call cannot be interrupted like wasm code, so a call that waits on a registry runs in a helper
thread and the guest stops waiting when the evaluation's deadline passes; the helper's requests have no
longer timeouts than the time that was left, so it ends soon after. A call that gave up because the
deadline passed (or failed after it) ends the evaluation as a timeout, as the reference's does when its
epoch interrupt stops the guest: the guest never gets to answer with the callback's error instead. The
caches live per process: they hold only successful answers, for `TTL_SECONDS`, as the reference's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from kwserver.runtime import GuestTimeout

T = TypeVar("T")
TTL_SECONDS = 60.0
MAX_ENTRIES = 4096  # per cache; the oldest entries go first when it is full
# The reference hands a failed callback to the guest with this prefix.
CALLBACK_FAILURE = "Callback evaluation failure: {}"
_MIN_WAIT_SECONDS = 0.05
_HELPER_THREADS = 8


class TtlCache:
    """Answers kept for `ttl` seconds (monotonic clock), at most `max_entries` of them. Thread-safe."""

    def __init__(self, ttl: float = TTL_SECONDS, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_entries, self.clock = ttl, max_entries, clock
        self._entries: dict[Hashable, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self.clock():
                del self._entries[key]
                return None
            return entry[1]

    def put(self, key: Hashable, value: bytes) -> None:
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = (self.clock() + self.ttl, value)

    def cached(self, key: Hashable, compute: Callable[[], bytes]) -> bytes:
        """The cached answer for `key`, else `compute()`'s, kept when it did not raise."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value


class _ProcessPool:
    """The helper threads of the current process (threads do not survive gunicorn's fork)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None or self.pid != os.getpid():
                self.pid = os.getpid()
                self.pool = ThreadPoolExecutor(_HELPER_THREADS, "kwserver-host-call")
            return self.pool


_pool = _ProcessPool()


def time_left(deadline: float | None, longest: float) -> float:
    """How long a network request may take: at most `longest`, and no longer than the deadline allows."""
    if deadline is None:
        return longest
    return max(_MIN_WAIT_SECONDS, min(longest, deadline - time.monotonic()))


def until_deadline(deadline: float | None, work: Callable[[], T], what: str) -> T:
    """`work()`'s result; GuestTimeout (the evaluation is out of time) once the deadline has passed."""
    if deadline is None:
        return work()
    future = _pool.get().submit(work)
    try:
        return future.result(timeout=max(_MIN_WAIT_SECONDS, deadline - time.monotonic()))
    except FutureTimeout:
        future.cancel()
        raise GuestTimeout(f"{what}: no answer before the policy's evaluation deadline") from None
    except Exception as exc:
        if time.monotonic() >= deadline:  # its own timeout, cut to the time that was left
            raise GuestTimeout(f"{what}: {exc}") from exc
        raise
