"""The master's side of the cluster cache process: start it, start it again when it dies, stop it.

The socket lives in a private directory (0700) the master makes; the workers learn its path by inheriting
it through the fork. gunicorn's master reaps every child, this one too, so death is seen by polling.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from kwserver.cluster.limits import CacheLimits

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
READY_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0
_RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0)
_STABLE_SECONDS = 30.0  # a cache that ran this long before dying restarts without delay


def _forget_metrics(pid: int) -> None:
    """A dead cache process's gauges must not count any more (its counters still do)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid)


class CacheSupervisor:
    def __init__(self, limits: CacheLimits, log_level: str = "info", log_fmt: str = "text"):
        self.limits, self.log_level, self.log_fmt = limits, log_level, log_fmt
        self.directory = tempfile.mkdtemp(prefix="kwserver-cluster-")  # 0700
        self.path = os.path.join(self.directory, "cache.sock")
        self.process: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="cluster cache supervisor", daemon=True)
        self.owner = os.getpid()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start the cache and wait (bounded) until it listens; then keep it running."""
        self._spawn()
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not os.path.exists(self.path) and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.02)
        if not os.path.exists(self.path):
            log.warning("the cluster cache is not listening yet; Kubernetes callbacks wait for it")
        self.thread.start()

    def in_worker(self) -> None:
        """Nothing to drop in a forked worker: it asks the cache through the socket path it inherited."""

    def stop(self) -> None:
        if os.getpid() != self.owner:
            return  # a worker's copy: the master owns the process
        self.stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _spawn(self) -> None:
        command = [sys.executable, "-m", "kwserver.cluster.cache_server", "--socket", self.path,
                   "--max-reflectors", str(self.limits.max_reflectors),
                   "--max-objects", str(self.limits.max_objects),
                   "--max-answers", str(self.limits.max_answers),
                   "--max-answer-bytes", str(self.limits.max_answer_bytes),
                   "--log-level", self.log_level, "--log-fmt", self.log_fmt]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, close_fds=True)
        self.started = time.monotonic()
        log.info("cluster cache started (pid %d)", self.process.pid)

    def _watch(self) -> None:
        failures = 0
        while not self.stopping.wait(POLL_SECONDS):
            code = self.process.poll()  # 0 also when gunicorn reaped it first
            if code is None:
                continue
            failures = 0 if time.monotonic() - self.started > _STABLE_SECONDS else failures + 1
            delay = _RESTART_BACKOFF[min(failures, len(_RESTART_BACKOFF) - 1)]
            log.error("the cluster cache (pid %d) exited with %s; starting it again in %.1fs",
                      self.process.pid, code, delay)
            _forget_metrics(self.process.pid)
            if self.stopping.wait(delay):
                return
            self._spawn()
