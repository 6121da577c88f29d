"""The master's small plain-HTTP endpoints: readiness, metrics and status (on the readiness port unless
metrics have a port of their own).

They run in threads of the master (workers are busy with admission requests and may be recycled at
any time; the master is always there).
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# A route answers (status, content type, body).
Route = Callable[[], tuple[int, str, bytes]]


class EndpointServer:
    def __init__(self, addr: str, port: int, routes: dict[str, Route], name: str):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                try:
                    status, content_type, body = route() if route else (404, "text/plain", b"")
                except Exception:
                    log.exception("error serving %s", self.path)
                    status, content_type, body = 500, "text/plain", b"internal error"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server_class = type("Server", (http.server.ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in addr else socket.AF_INET, "daemon_threads": True})
        self.server = server_class((addr, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"kwserver-{name}", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def in_worker(self) -> None:
        """In a forked worker: drop the copy of the master's listening socket."""
        self.server.socket.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Readiness:
    """`GET /readiness`: 200 once the server is ready and has a worker, 503 once it starts shutting down.

    gunicorn calls `when_ready` before it forks the first worker; a probe answered 200 in that gap would
    count a server with nobody to serve as ready.
    """

    def __init__(self, has_workers: Callable[[], bool] = lambda: True) -> None:
        self.ready = threading.Event()
        self.has_workers = has_workers

    def route(self) -> tuple[int, str, bytes]:
        return (200 if self.ready.is_set() and self.has_workers() else 503), "text/plain", b""
