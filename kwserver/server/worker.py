"""The HTTP worker: an event loop reads whole requests, then the WSGI app evaluates them one at a time.

gunicorn's `gthread` worker reads a request in the thread that then evaluates it, so one client
that sends half a header (or half a body, or no TLS ClientHello) holds that thread, and with one
thread per worker a handful of such clients froze the whole server. Here a uvloop event loop owns
every connection: it reads headers and body (httptools parses them) within per-connection limits
and timeouts, and only a request that has fully arrived reaches the app, which runs synchronously
in the loop's thread (evaluations stay one at a time per worker; timeouts stay epoch interrupts).
A stalled client costs a file descriptor and a timer, never another client's evaluation.

Also measured cheaper: the loop replaces gunicorn's pure-Python parser and per-request heartbeat
(see docs/operations.md for the comparison with uvicorn's worker and gthread).

Connections spread over the workers: each worker accepts one connection per loop iteration, so a
burst of keep-alive connections is shared by the workers that are woken for it instead of piling
onto the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import mmap
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import unquote_to_bytes

import httptools
import uvloop
from gunicorn.arbiter import Arbiter
from gunicorn.sock import ssl_context as gunicorn_ssl_context
from gunicorn.workers.base import Worker

from kwserver.config import MAX_REQUEST_BODY_BYTES, ServerSettings

log = logging.getLogger(__name__)

# A refused body (beyond config.MAX_REQUEST_BODY_BYTES: the app answers 413) up to this size is read
# and dropped, so the client can read the 413 and keep its connection; beyond, the connection is closed.
MAX_DISCARDED_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
HEARTBEAT_SECONDS = 1.0
# How long a worker with more connections than the others lets a pending connection wait for them.
BALANCE_WAIT_SECONDS = 0.02
STOP_KEEPALIVE_LINGER_SECONDS = 2.0
# A TLS close waits for the client's close_notify; a client that never sends it must not hold a
# stopping worker for asyncio's default 30 s.
TLS_SHUTDOWN_TIMEOUT_SECONDS = 2.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _closing_response(status: str, text: str = "") -> bytes:
    """A response the worker writes itself (the app never saw the request), after which it closes."""
    body = text.encode()
    content_type = b"content-type: text/plain; charset=utf-8\r\n" if body else b""
    return (b"HTTP/1.1 %s\r\n%scontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status.encode(), content_type, len(body), body))


_REFUSED = _closing_response("503 Service Unavailable", "Too many connections, try again.")
_BAD_REQUEST = _closing_response("400 Bad Request", "Invalid HTTP request.")
_TIMED_OUT = _closing_response("408 Request Timeout", "The request did not arrive in time.")
_HEADERS_TOO_LARGE = _closing_response("431 Request Header Fields Too Large")


class ConnectionTable:
    """Open connections of every worker, in memory shared by all of them.

    A keep-alive connection stays with the worker that accepted it, and the worker that wakes first
    for a burst of connections would take nearly all of them (measured 13 of 16 on one of two
    workers). With this table a worker that holds more connections than the least loaded one lets
    the listener wait a moment before accepting, so the others get theirs first. Made in the master
    (anonymous shared memory, inherited by every fork); a worker writes its own slot.
    """

    SLOTS = 1024

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, self.SLOTS * 8)
        view = memoryview(self._memory).cast("i")
        self.pids, self.counts = view[:self.SLOTS], view[self.SLOTS:]

    def join(self, slot: int) -> None:
        self.counts[slot] = 0
        self.pids[slot] = os.getpid()

    def leave(self, slot: int) -> None:
        self.pids[slot] = 0

    def serving(self) -> set[int]:
        """The pids of the workers that joined (they serve) and have not left."""
        return {pid for pid in self.pids if pid}

    def should_wait(self, slot: int, mine: int) -> bool:
        """More connections here than in the least loaded other live worker, plus one."""
        fewest = None
        for i, pid in enumerate(self.pids):
            if pid and i != slot and _alive(pid):
                count = self.counts[i]
                fewest = count if fewest is None else min(fewest, count)
        return fewest is not None and mine > fewest + 1


def _alive(pid: int) -> bool:
    # A killed worker never cleared its slot; it must not make the others wait.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client may cost a worker (kwserver's settings: see kwserver/config.py)."""

    header_timeout: float  # from the first byte of a request to the end of its headers
    body_timeout: float  # from the end of the headers to the end of the body
    idle_timeout: float  # a keep-alive connection with no request in progress
    handshake_timeout: float  # TLS handshake
    max_connections: int  # open connections per worker; beyond, new ones are refused with 503
    max_body_bytes: int = MAX_REQUEST_BODY_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ConnectionLimits:
        return cls(header_timeout=settings.header_timeout_seconds, body_timeout=settings.body_timeout_seconds,
                   idle_timeout=settings.keepalive_timeout_seconds,
                   handshake_timeout=settings.tls_handshake_timeout_seconds,
                   max_connections=settings.max_connections_per_worker)


class Connection(asyncio.Protocol):
    """One client connection: parses requests, enforces the limits, hands complete requests to the app."""

    __slots__ = (
        "body", "body_size", "discarded", "environ_base", "header_bytes", "headers", "in_request",
        "keep_alive", "parser", "server", "timer", "too_large", "transport", "url",
    )

    def __init__(self, server: HttpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.timer: asyncio.TimerHandle | None = None
        self.environ_base: dict[str, Any] = {}
        self.in_request = False
        self._reset_request()

    def _reset_request(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False
        self.discarded = 0
        self.keep_alive = True

    # --- transport events ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.environ_base = self.server.environ_for(transport)
        self._arm(self.server.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._disarm()
        self.server.connection_closed()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_BAD_REQUEST)
        except httptools.HttpParserError:
            self._fail(_BAD_REQUEST)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # --- parser callbacks ---
    def on_message_begin(self) -> None:
        self._reset_request()
        self.in_request = True
        self._arm(self.server.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self._count_header_bytes(len(name) + len(value))

    def _count_header_bytes(self, count: int) -> None:
        self.header_bytes += count
        if self.header_bytes > self.server.limits.max_header_bytes:
            self._fail(_HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self._arm(self.server.limits.body_timeout)
        length = self._header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.server.limits.max_body_bytes:
            self._too_large(int(length))
            return
        expect = self._header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self.too_large:
            # Read and dropped, so the client sees the 413 rather than a reset; up to a bound.
            self.discarded += len(body)
            if self.discarded > MAX_DISCARDED_BYTES and self.transport is not None:
                self.transport.close()
            return
        self.body_size += len(body)
        if self.body_size > self.server.limits.max_body_bytes:
            self._too_large(self.body_size)
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.too_large:
            if self.transport is not None:
                self.transport.close()
            return
        self._disarm()
        self._respond()

    # --- requests ---
    def _header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def _too_large(self, size: int) -> None:
        """Answer now, without keeping a body the app would refuse: the app gets the request with its
        length and no body, and answers 413 in its route's format. The connection closes once the rest
        of the body has been read and dropped (or is too long to drain, or the body timeout passes)."""
        self.too_large = True
        self.body = []
        self._respond(content_length=size)

    def _respond(self, content_length: int | None = None) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = b"".join(self.body)
        environ = self.server.environ(self, body, content_length)
        response, close = self.server.call_app(environ)
        close = close or self.too_large or not self.keep_alive or not self.server.accepting
        if close:
            response = response.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        transport.write(response)
        self.in_request = False
        if self.too_large:
            pass  # closed when the body ends, is too long to drain, or its timer fires
        elif close:
            transport.close()
        else:
            self._arm(self.server.limits.idle_timeout)
        self.server.request_done()

    # --- timers ---
    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.server.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.in_request and not self.too_large:
            self._fail(_TIMED_OUT)  # a request that stopped half-way is told why
        elif self.transport is not None:
            self.transport.close()  # an idle keep-alive connection, or a refused body that never ended

    def _fail(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    @property
    def idle(self) -> bool:
        return not self.in_request


def _wsgi_path(url: bytes) -> tuple[str, str]:
    parsed = httptools.parse_url(url)
    path = unquote_to_bytes(parsed.path).decode("latin-1")
    return path, (parsed.query or b"").decode("latin-1")


class HttpServer:
    """The listening side of one worker: accepting, TLS, the WSGI calls, the connection count."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app: Callable, limits: ConnectionLimits,
                 ssl_context: Callable[[], ssl.SSLContext] | None, on_request: Callable[[], None],
                 table: ConnectionTable | None = None, slot: int = 0):
        self.loop = loop
        self.table = table
        self.slot = slot
        self.app = app
        self.limits = limits
        self.ssl_context = ssl_context
        self.on_request = on_request
        self.connections: set[Connection] = set()
        self.pending_handshakes = 0
        self.listeners: list[socket.socket] = []
        self.accepting = False
        self.drained = asyncio.Event()

    # --- accepting ---
    def start(self, listeners: Iterable[Any]) -> None:
        for listener in listeners:
            sock = listener.sock if hasattr(listener, "sock") else listener
            sock.setblocking(False)
            self.listeners.append(sock)
        self.accepting = True
        for sock in self.listeners:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def stop_accepting(self) -> None:
        if not self.accepting:
            return
        self.accepting = False
        for sock in self.listeners:
            self.loop.remove_reader(sock.fileno())
        # Kept-alive connections linger a little: a request a client is already sending on one is
        # answered (with `connection: close`) instead of being dropped.
        for connection in list(self.connections):
            if connection.idle:
                connection._arm(min(STOP_KEEPALIVE_LINGER_SECONDS, self.limits.idle_timeout))
        self.connection_closed()

    @property
    def open_connections(self) -> int:
        return len(self.connections) + self.pending_handshakes

    def _accept(self, listener: socket.socket, waited: bool = False) -> None:
        # One connection per readiness event, and a short wait when the other workers hold fewer.
        if not waited and self.table is not None and self.table.should_wait(self.slot, self.open_connections):
            self.loop.remove_reader(listener.fileno())
            self.loop.call_later(BALANCE_WAIT_SECONDS, self._resume_accepting, listener)
            return
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # EMFILE and friends: keep serving the connections we have
            log.warning("accept failed: %s", exc)
            return
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.open_connections >= self.limits.max_connections:
            with contextlib.suppress(OSError):
                sock.send(_REFUSED)
            sock.close()
            return
        self.pending_handshakes += 1
        self._publish()
        self.loop.create_task(self._connect(sock))

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self.accepting:
            self.loop.add_reader(listener.fileno(), self._accept, listener)
            self._accept(listener, waited=True)

    def _publish(self) -> None:
        if self.table is not None:
            self.table.counts[self.slot] = self.open_connections

    async def _connect(self, sock: socket.socket) -> None:
        try:
            context = self.ssl_context() if self.ssl_context else None
            kwargs: dict[str, Any] = {}
            if context is not None:
                kwargs = {"ssl": context, "ssl_handshake_timeout": self.limits.handshake_timeout,
                          "ssl_shutdown_timeout": TLS_SHUTDOWN_TIMEOUT_SECONDS}
            await self.loop.connect_accepted_socket(lambda: Connection(self), sock, **kwargs)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.debug("connection failed before its first request: %s", exc)
            sock.close()
        except Exception:  # a broken certificate file, for instance: this client fails, the worker lives
            log.exception("cannot set up a client connection")
            sock.close()
        finally:
            self.pending_handshakes -= 1
            self.connection_closed()

    def connection_closed(self) -> None:
        self._publish()
        if not self.accepting and self.open_connections == 0:
            self.drained.set()

    def request_done(self) -> None:
        self.on_request()

    # --- WSGI ---
    def environ_for(self, transport: asyncio.BaseTransport) -> dict[str, Any]:
        sockname = transport.get_extra_info("sockname")
        peername = transport.get_extra_info("peername")
        secure = transport.get_extra_info("sslcontext") is not None
        server = sockname if isinstance(sockname, tuple) else ("localhost", 0)
        return {
            "SCRIPT_NAME": "",
            "SERVER_NAME": str(server[0]),
            "SERVER_PORT": str(server[1]),
            "REMOTE_ADDR": str(peername[0]) if isinstance(peername, tuple) else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if secure else "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }

    def environ(self, connection: Connection, body: bytes, content_length: int | None) -> dict[str, Any]:
        parser = connection.parser
        path, query = _wsgi_path(connection.url)
        environ = dict(connection.environ_base)
        environ.update({
            "REQUEST_METHOD": parser.get_method().decode("latin-1"),
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_PROTOCOL": f"HTTP/{parser.get_http_version()}",
            "CONTENT_LENGTH": str(len(body) if content_length is None else content_length),
            "wsgi.input": io.BytesIO(body),
        })
        for name, value in connection.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1").strip()
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = text
            elif key != "CONTENT_LENGTH":
                key = "HTTP_" + key
                environ[key] = f"{environ[key]},{text}" if key in environ else text
        return environ

    def call_app(self, environ: dict[str, Any]) -> tuple[bytes, bool]:
        """Run the app on one request: the response bytes, and whether to close the connection after."""
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
            started[:] = [status, headers]
            return lambda data: None

        try:
            chunks = self.app(environ, start_response)
            try:
                body = b"".join(chunks)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            status, headers = started
        except Exception:  # the app renders its own errors; this is the last line of defence
            log.exception("the application failed on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n", True)
        lines = [f"HTTP/1.1 {status}\r\n".encode("latin-1")]
        has_length = close_requested = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                has_length = True
            elif lowered == "connection" and value.lower() == "close":
                close_requested = True
                continue
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""
        elif not has_length:
            lines.append(b"content-length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        lines.append(body)
        return b"".join(lines), close_requested


class EventLoopWorker(Worker):
    """gunicorn worker running `HttpServer` on uvloop (graceful stop, heartbeat, max-requests).

    The server hands its workers their limits and their once-a-second work through the class it gives
    gunicorn (`serving`, see kwserver.server.daemon); this class alone, as the bench's baselines run it,
    has the settings' defaults and nothing to do once a second.
    """

    table: ClassVar[ConnectionTable | None] = None
    limits: ClassVar[ConnectionLimits | None] = None
    every_second: ClassVar[Callable[[], None] | None] = None

    @classmethod
    def serving(cls, limits: ConnectionLimits, every_second: Callable[[], None] | None = None) -> type[EventLoopWorker]:
        """This worker class with `limits`, calling `every_second` from the loop once a second."""
        return type(cls.__name__, (cls,), {"limits": limits, "every_second": staticmethod(every_second)
                                           if every_second is not None else None})

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Workers are constructed in the master, then forked: the first one makes the shared table.
        if EventLoopWorker.table is None:
            EventLoopWorker.table = ConnectionTable()
        self.slot = self.age % ConnectionTable.SLOTS

    def init_signals(self) -> None:
        # Installed on the loop in run(); until then the defaults apply (as uvicorn's worker does).
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def run(self) -> None:
        self._check_tls()
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(loop))
        finally:
            loop.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        limits = self.limits or ConnectionLimits.from_settings(ServerSettings())
        # Idle keep-alive connections follow gunicorn's `keepalive`, which a gunicorn config file may tune.
        limits = dataclasses.replace(limits, idle_timeout=self.cfg.keepalive)
        ssl_context = self._ssl_context if self.cfg.is_ssl else None
        self.requests = 0
        self.table.join(self.slot)
        self.server = HttpServer(loop, self.wsgi, limits, ssl_context, self._counted, self.table, self.slot)
        self.stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self._graceful_stop)
        loop.add_signal_handler(signal.SIGQUIT, self._quick_stop)
        loop.add_signal_handler(signal.SIGINT, self._quick_stop)
        loop.add_signal_handler(signal.SIGUSR1, self.log.reopen_files)
        loop.add_signal_handler(signal.SIGABRT, self._abort)
        self.server.start(self.sockets)
        heartbeat = loop.create_task(self._heartbeat())
        await self.stopping.wait()
        self.server.stop_accepting()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.drained.wait(), self.cfg.graceful_timeout)
        heartbeat.cancel()
        self.table.leave(self.slot)
        for connection in list(self.server.connections):
            if connection.transport is not None:
                connection.transport.close()

    def _check_tls(self) -> None:
        """A worker that cannot make its TLS context would reset every connection it accepts: it says why
        and exits as a worker that failed to boot, which stops the server (gunicorn halts on it)."""
        if not self.cfg.is_ssl:
            return
        try:
            self._ssl_context()
        except Exception as exc:
            self.log.error("worker %s cannot serve TLS: %s", self.pid, exc)
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def _ssl_context(self) -> ssl.SSLContext:
        # gunicorn's `ssl_context` hook with gunicorn's own default (certfile, keyfile, ca_certs, ...), as
        # its workers get it for every connection; kwserver's hook returns its rotating cache.
        return gunicorn_ssl_context(self.cfg)

    def _counted(self) -> None:
        self.requests += 1
        if self.max_requests and self.requests >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self._graceful_stop()

    async def _heartbeat(self) -> None:
        # The arbiter kills a worker whose heartbeat stops; beating from the loop means a worker stuck in
        # an evaluation longer than gunicorn's `timeout` is replaced.
        while True:
            self.notify()
            if self.every_second is not None:
                self.every_second()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                self._graceful_stop()
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def _graceful_stop(self) -> None:
        self.alive = False
        self.stopping.set()

    def _quick_stop(self) -> None:
        self.alive = False
        self.cfg.worker_int(self)
        time.sleep(0.1)
        sys.exit(0)

    def _abort(self) -> None:
        self.alive = False
        self.cfg.worker_abort(self)
        sys.exit(1)
