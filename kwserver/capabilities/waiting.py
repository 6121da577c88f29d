"""What the registry callbacks share: network waits bounded by the policy's deadline.

A host call cannot be interrupted like wasm code, so a call that waits on a registry runs in a helper
thread and the guest stops waiting when the evaluation's deadline passes; the helper's requests have no
longer timeouts than the time that was left, so it ends soon after. A call that gave up because the
deadline passed (or failed after it) ends the evaluation as a timeout, as the reference's does when its
epoch interrupt stops the guest: the guest never gets to answer with the callback's error instead.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from kwserver.runtime import GuestTimeout

T = TypeVar("T")
# The reference hands a failed callback to the guest with this prefix.
CALLBACK_FAILURE = "Callback evaluation failure: {}"
_MIN_WAIT_SECONDS = 0.05
_HELPER_THREADS = 8


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
