"""The worker class: gunicorn's `gthread`, but connections spread over the workers.

Every gthread worker polls the shared listening socket and accepts whatever is waiting, and a
keep-alive connection stays with the worker that accepted it for its whole life. When clients
connect in a burst (the API server after a restart, a load test), one worker often takes nearly all
of them while the others idle (measured: 15 of 16 connections on one of two workers). Here a worker
whose threads are all busy stops accepting until one is free, so new connections go to a worker
that can serve them now.
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.gthread import ThreadWorker


class BalancedThreadWorker(ThreadWorker):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.in_flight = 0  # requests handed to the thread pool and not finished yet

    def _busy(self) -> bool:
        return self.in_flight >= self.cfg.threads

    def enqueue_req(self, conn: Any) -> None:
        self.in_flight += 1
        super().enqueue_req(conn)
        if self._busy():
            super().set_accept_enabled(False)

    def finish_request(self, conn: Any, fs: Any) -> None:
        # The event loop turns accepting back on after this (it sees fewer connections than allowed).
        self.in_flight -= 1
        super().finish_request(conn, fs)

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled and not self._busy())
