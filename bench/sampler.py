"""Resource sampling with psutil: every server process (master and workers) and the load generator.

One sampler thread per scenario polls, at a fixed interval, every registered server's process tree
(the server process and its children) and the running wrk process: RSS, USS, PSS (from
/proc/<pid>/smaps_rollup) and cumulative CPU seconds. Times are seconds since the scenario started,
on the same clock as the load points, so every load point has the memory and CPU that went with it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

MIB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the clock's origin
    server: str  # registered name, or "wrk" for the load generator
    role: str  # master, worker, load
    pid: int
    rss: int
    uss: int
    pss: int
    cpu_s: float  # cumulative user + system CPU seconds of the process
    connections: int = -1  # established TCP connections (workers only; -1 when not counted)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def row(self) -> list[Any]:
        """The sample as a compact row in FIELDS order (results.json stores samples this way)."""
        return [round(self.t, 3), self.server, self.role, self.pid, self.rss, self.uss, self.pss,
                round(self.cpu_s, 3), self.connections]


FIELDS = ("t", "server", "role", "pid", "rss", "uss", "pss", "cpu_s", "connections")


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def process_tree(root_pid: int) -> list[psutil.Process]:
    """The server process and all its descendants that are alive."""
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_seconds(root_pid: int) -> float:
    """Cumulative CPU of a server's living processes (exited workers' CPU is lost; none should exit)."""
    total = 0.0
    for process in process_tree(root_pid):
        with contextlib.suppress(psutil.Error):
            total += _cpu_seconds(process)
    return total


def process_cpu_seconds(pid: int) -> float:
    """Cumulative CPU of one process (0 once it is gone)."""
    try:
        return _cpu_seconds(psutil.Process(pid))
    except psutil.Error:
        return 0.0


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idling since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def established_connections(pid: int) -> int:
    try:
        return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED)
    except psutil.Error:
        return 0


def measure(process: psutil.Process, t: float, server: str, role: str, count_connections: bool) -> Sample | None:
    try:
        with process.oneshot():
            info = process.memory_full_info()
            cpu = _cpu_seconds(process)
            connections = -1
            if count_connections:
                connections = sum(1 for c in process.net_connections(kind="tcp")
                                  if c.status == psutil.CONN_ESTABLISHED)
        return Sample(t, server, role, process.pid, info.rss, info.uss, getattr(info, "pss", info.uss), cpu,
                      connections)
    except psutil.Error:
        return None


def snapshot(server: str, root_pid: int, t: float = 0.0, *, connections: bool = False) -> list[Sample]:
    """One sample of every process of a server, now."""
    samples = []
    for process in process_tree(root_pid):
        role = "master" if process.pid == root_pid else "worker"
        sample = measure(process, t, server, role, connections and role == "worker")
        if sample is not None:
            samples.append(sample)
    return samples


def total(samples: Iterable[Sample], field: str = "pss") -> int:
    return sum(getattr(s, field) for s in samples)


class Clock:
    """Seconds since the start of a scenario; shared by the sampler and the load points."""

    def __init__(self) -> None:
        self.origin = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.origin


class Sampler:
    def __init__(self, clock: Clock, interval: float = 0.5, *, max_samples: int = 2_000_000):
        self.clock = clock
        self.interval = interval
        self.max_samples = max_samples
        self.samples: list[Sample] = []
        self._servers: dict[str, int] = {}
        self._load_pid: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.overrun = 0  # ticks that took longer than the interval

    # registration ---------------------------------------------------------------------------------
    def add_server(self, name: str, pid: int) -> None:
        with self._lock:
            self._servers[name] = pid

    def remove_server(self, name: str) -> None:
        with self._lock:
            self._servers.pop(name, None)

    def set_load(self, pid: int | None) -> None:
        with self._lock:
            self._load_pid = pid

    # sampling -------------------------------------------------------------------------------------
    def tick(self) -> list[Sample]:
        t = self.clock.now()
        with self._lock:
            servers = dict(self._servers)
            load_pid = self._load_pid
        batch: list[Sample] = []
        for name, pid in servers.items():
            batch.extend(snapshot(name, pid, t, connections=True))
        if load_pid is not None:
            try:
                sample = measure(psutil.Process(load_pid), t, "wrk", "load", False)
            except psutil.Error:
                sample = None
            if sample is not None:
                batch.append(sample)
        with self._lock:
            if len(self.samples) + len(batch) <= self.max_samples:
                self.samples.extend(batch)
        self.ticks += 1
        return batch

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.tick()
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:
                self.overrun += 1
                next_at = time.monotonic()
                delay = 0
            if self._stop.wait(delay):
                break

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # queries --------------------------------------------------------------------------------------
    def between(self, start: float, end: float, server: str | None = None) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if start <= s.t <= end and (server is None or s.server == server)]

    def totals_over_time(self, server: str, field: str = "pss") -> list[tuple[float, int]]:
        """(t, sum over the server's processes) per tick."""
        by_t: dict[float, int] = {}
        with self._lock:
            for s in self.samples:
                if s.server == server:
                    by_t[s.t] = by_t.get(s.t, 0) + getattr(s, field)
        return sorted(by_t.items())
