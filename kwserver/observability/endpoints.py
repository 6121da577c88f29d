"""The master's small plain-HTTP endpoints: readiness, metrics and status (on the readiness port unless
metrics have a port of their own).

They run in the master (workers are busy with admission requests and may be recycled at any time;
the master is always there), on one event loop in one thread for all of them, so what a client can
cost is bounded the way the API listener bounds it: a request must arrive whole within
`REQUEST_TIMEOUT_SECONDS` of connecting and fit in `MAX_REQUEST_BYTES`; each listener holds at most
`MAX_CONNECTIONS` connections (more are answered 503); the listen backlog is the system's maximum.
A probe is answered in microseconds, so one request per connection is enough (`Connection: close`).

A route may be local-only (`/status`: process ids, titles, memory and policy names): it answers only
clients on this host (loopback, or the listener's own address: `kubectl exec ... kwserver top`), and
403 to everybody else, whatever listener it is served on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import selectors
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus

log = logging.getLogger(__name__)

# A route answers (status, content type, body).
Route = Callable[[], tuple[int, str, bytes]]

REQUEST_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_BYTES = 8 * 1024
MAX_CONNECTIONS = 64


class LocalOnly:
    """A route answered only to clients on this host."""

    def __init__(self, route: Route):
        self.route = route

    def __call__(self) -> tuple[int, str, bytes]:
        return self.route()


def is_local_peer(peer: str, local: str) -> bool:
    """The client is on this host: a loopback address, or the address it reached us on (same network namespace)."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback or peer == local


class EndpointServer:
    """One listener of the master, bound when made (so a busy port fails at once), served once started."""

    def __init__(self, addr: str, port: int, routes: dict[str, Route], name: str):
        self.routes = routes
        self.name = name
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((addr.strip("[]"), port))
            self.socket.listen(socket.SOMAXCONN)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.open = 0
        self.connections: set[int] = set()  # descriptors of the open client connections
        # A selector of our own, so a forked worker can close every descriptor of this loop.
        self.selector = selectors.DefaultSelector()
        self.loop = asyncio.SelectorEventLoop(self.selector)
        self.thread = threading.Thread(target=self._run, name=f"kwserver-{name}", daemon=True)

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._serve, sock=self.socket, limit=MAX_REQUEST_BYTES))
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = writer.get_extra_info("socket").fileno()
        if self.open >= MAX_CONNECTIONS:
            writer.write(_response(503, "text/plain", b"too many connections\n"))
            writer.close()
            return
        self.open += 1
        self.connections.add(connection)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_SECONDS)
            writer.write(self._answer(head, writer))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_SECONDS)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that sent too little, too much or too late is dropped without a word
        finally:
            self.open -= 1
            self.connections.discard(connection)
            writer.close()

    def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, "text/plain", b"")
        method, target = parts[0], parts[1].decode("latin-1")
        route = self.routes.get(target.split("?", 1)[0])
        if route is None:
            return _response(404, "text/plain", b"")
        if method not in (b"GET", b"HEAD"):
            return _response(405, "text/plain", b"")
        if isinstance(route, LocalOnly):
            peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
            if not (isinstance(peer, tuple) and isinstance(local, tuple) and is_local_peer(peer[0], local[0])):
                return _response(403, "text/plain", b"only served to clients on this host\n")
        try:
            status, content_type, body = route()
        except Exception:
            log.exception("error serving %s on the %s listener", target, self.name)
            status, content_type, body = 500, "text/plain", b"internal error"
        return _response(status, content_type, b"" if method == b"HEAD" else body, len(body))

    def in_worker(self) -> None:
        """In a forked worker: drop the copies of the master's listening socket, connections and selector."""
        self.socket.close()
        for fd in self.connections:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError, ValueError):
            self.selector.close()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        self.socket.close()


def _response(status: int, content_type: str, body: bytes, length: int | None = None) -> bytes:
    reason = HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: "
            f"{len(body) if length is None else length}\r\nConnection: close\r\n\r\n").encode() + body


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
