"""The worker pool follows the load, and workers that grew too big are recycled.

A thread in the master samples, once a second, how busy the workers were (the busy seconds they
count into the shared metrics) and their own memory (USS). It changes the pool only through
gunicorn's own mechanisms: the arbiter's worker count (what SIGTTIN / SIGTTOU change; gunicorn
retires the oldest workers gracefully), SIGTERM to a worker retires it gracefully and gunicorn
replaces it.

Growing goes one worker per cool-down, as load that lasts asks for it. Shrinking goes straight to
the workers the load needs (busy time / target utilisation), so an idle server returns to
`--min-workers` one `--scale-down-after-seconds` after the load stops, not one worker per period.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kwserver.config import GROW_ABOVE, SHRINK_BELOW

log = logging.getLogger(__name__)

TARGET_UTILISATION = 0.5  # what shrinking aims at, between the two thresholds
COOLDOWN_SECONDS = 5.0
SAMPLE_SECONDS = 1.0
BLOCKED_LOG_SECONDS = 60.0  # a scale-up the memory limit keeps refusing is logged at most this often


@dataclass
class ScalingPolicy:
    """Pure decision logic, with hysteresis (sustained load) and a cool-down after every change."""

    min_workers: int
    max_workers: int
    grow_after: float
    shrink_after: float
    busy_since: float | None = None
    idle_since: float | None = None
    last_change: float = float("-inf")

    def decide(self, now: float, utilisation: float, workers: int) -> int:
        """Workers to add (+1), to remove (negative: down to what the load needs), or 0."""
        self.busy_since = _since(self.busy_since, now) if utilisation > GROW_ABOVE else None
        self.idle_since = _since(self.idle_since, now) if utilisation < SHRINK_BELOW else None
        if now - self.last_change < COOLDOWN_SECONDS:
            return 0
        if workers < self.min_workers:
            return 1
        if workers > self.max_workers:
            return -1
        if self.busy_since is not None and now - self.busy_since >= self.grow_after and workers < self.max_workers:
            self._changed(now)
            return 1
        if self.idle_since is not None and now - self.idle_since >= self.shrink_after and workers > self.min_workers:
            needed = max(self.min_workers, math.ceil(utilisation * workers / TARGET_UTILISATION))
            if needed < workers:
                self._changed(now)
                return needed - workers
        return 0

    def _changed(self, now: float) -> None:
        self.last_change = now
        self.busy_since = self.idle_since = None


def _since(start: float | None, now: float) -> float:
    return now if start is None else start


class PoolController:
    def __init__(self, *, policy: ScalingPolicy | None, max_uss_bytes: int, busy_seconds: Callable[[], float],
                 workers: Callable[[], dict[int, int]], uss: Callable[[int], int | None],
                 resize: Callable[[int], None], no_room: Callable[[], str | None] = lambda: None):
        """`workers()` maps live worker pids to their age; `busy_seconds()` is the pool's running total;
        `resize(n)` sets the pool's size; `no_room()` says why one more worker would not fit in memory
        (None: it fits)."""
        self.policy = policy
        self.resize = resize
        self.no_room = no_room
        self._blocked_logged = float("-inf")
        self.max_uss_bytes = max_uss_bytes
        self.busy_seconds = busy_seconds
        self.workers = workers
        self.uss = uss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kwserver-pool", daemon=True)
        self._retiring: set[int] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def in_worker(self) -> None:
        """Nothing to drop in a forked worker: the sampling thread is the master's alone."""

    def _run(self) -> None:
        last_busy, last_time = self.busy_seconds(), time.monotonic()
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                busy, now = self.busy_seconds(), time.monotonic()
                workers = self.workers()
                if self.policy is not None and workers:
                    utilisation = (busy - last_busy) / ((now - last_time) * len(workers))
                    self._apply(self.policy.decide(now, utilisation, len(workers)), utilisation, len(workers))
                last_busy, last_time = busy, now
                if self.max_uss_bytes:
                    self._recycle_big_workers(workers)
            except Exception:  # the controller must never take the master down
                log.exception("worker pool controller error")

    def _apply(self, step: int, utilisation: float, workers: int) -> None:
        if step > 0 and (reason := self.no_room()):
            # Growing past the pod's memory limit would get a process OOM-killed: the pool stays.
            now = time.monotonic()
            if now - self._blocked_logged >= BLOCKED_LOG_SECONDS:
                log.warning("worker utilisation %.0f%%: not adding a worker to the %d running: %s",
                            utilisation * 100, workers, reason)
                self._blocked_logged = now
            return
        if step:
            log.info("worker utilisation %.0f%%: %s the pool from %d to %d workers", utilisation * 100,
                     "growing" if step > 0 else "shrinking", workers, workers + step)
            self.resize(workers + step)

    def _recycle_big_workers(self, workers: dict[int, int]) -> None:
        self._retiring &= set(workers)
        for pid in workers:
            if pid in self._retiring:
                continue
            uss = self.uss(pid)
            if uss is not None and uss > self.max_uss_bytes:
                log.warning("worker %d uses %.1f MiB (USS), above the %.1f MiB ceiling: recycling it", pid,
                            uss / 2**20, self.max_uss_bytes / 2**20)
                self._retiring.add(pid)
                os.kill(pid, signal.SIGTERM)
