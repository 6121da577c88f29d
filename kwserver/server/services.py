"""The master's services: what runs in the gunicorn master beside the arbiter, in one list.

Each is one object with three methods: `start()` in the master, `stop()` in the master (at exit, or once
the configuration no longer needs it), and `in_worker()` in a worker right after the fork, to drop what
belongs to the master (threads do not survive a fork; sockets and pipes do). Today: the readiness and
metrics endpoints, the worker pool controller, the OTLP metrics push and span export, the cluster cache.
The daemon (kwserver.server.daemon) decides which run; adding one is one object in that list.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)


class MasterService(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def in_worker(self) -> None: ...


S = TypeVar("S", bound=MasterService)


class MasterServices:
    """The services of this master, stopped in the reverse of their start order.

    A service the configuration stops needing after a reload may still be used by the workers forked
    before it (they finish their requests on the old configuration): it is retired, and stopped once
    those workers have exited.
    """

    def __init__(self) -> None:
        self.running: list[MasterService] = []
        self.retiring: list[tuple[MasterService, set[int]]] = []

    def start(self, service: S) -> S:
        service.start()
        self.running.append(service)
        return service

    def retire(self, service: MasterService, workers: Iterable[int]) -> None:
        """Stop `service` once every one of `workers` (pids) has exited."""
        self.running.remove(service)
        self.retiring.append((service, set(workers)))
        self.worker_exited(None)

    def worker_exited(self, pid: int | None) -> None:
        waiting = []
        for service, workers in self.retiring:
            workers.discard(pid)
            if workers:
                waiting.append((service, workers))
            else:
                self._stop(service)
        self.retiring = waiting

    def stop(self) -> None:
        """At exit: every service, retiring ones included, the last started first."""
        for service in reversed([*(s for s, _ in self.retiring), *self.running]):
            self._stop(service)
        self.running, self.retiring = [], []

    def in_worker(self) -> None:
        """In a forked worker: each service drops what is the master's; none is this process's to stop."""
        for service in [*(s for s, _ in self.retiring), *self.running]:
            service.in_worker()
        self.running, self.retiring = [], []

    @staticmethod
    def _stop(service: MasterService) -> None:
        try:
            service.stop()
        except Exception:  # one service failing to stop must not keep the others running
            log.exception("stopping %s failed", type(service).__name__)
