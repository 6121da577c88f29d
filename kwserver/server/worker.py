"""The HTTP worker: an event loop reads whole requests, then the WSGI app evaluates them one at a time.

gunicorn's `gthread` worker reads a request in the thread that then evaluates it, so one client
that sends half a header (or half a body, or no TLS ClientHello) holds that thread, and with one
thread per worker a handful of such clients froze the whole server. Here a uvloop event loop owns
every connection: it reads headers and body (httptools parses them) within per-connection limits
and timeouts, and only a request that has fully arrived reaches the app, which runs synchronously
in the loop's thread (evaluations stay one at a time per worker; timeouts stay epoch interrupts).
A stalled client costs a file descriptor and a timer, never another client's evaluation.

What a client may cost is bounded the way hyper, Go's net/http and nginx bound it:
- back-pressure: while an answer is unsent (the client does not read), the connection's pipelined
  requests wait unread and unanswered; a client that reads nothing for `send_timeout` is cut off;
- a new connection must send its first request's headers within `header_timeout` of connecting;
- at the connection cap, the longest-idle keep-alive connection is closed to make room; only when
  every connection is mid-request is a new one refused (503);
- the cap stays below the file-descriptor limit, and a worker out of descriptors refuses the waiting
  client with a 503 (from a descriptor kept in reserve) and pauses accepting, instead of spinning;
- TLS is layered here over the plain transport (`ssl.SSLObject`), so a refused handshake sends its
  alert (an unknown client CA, say) before the connection closes, and is logged.

Also measured cheaper: the loop replaces gunicorn's pure-Python parser and per-request heartbeat
(see docs/operations.md for the comparison with uvicorn's worker and gthread).

Connections spread over the workers: every worker is woken for a pending connection, and one that
holds more connections than another worker passes it over for up to 10 ms so that one takes it
(ConnectionTable says whom a worker waits for).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import io
import logging
import mmap
import os
import resource
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
# A worker with more connections than another one passes a pending connection over for at most this
# long, then takes it itself. Meanwhile it stops watching the listener and looks again every
# DEFER_POLL_SECONDS: spinning on the readiness event would take the CPU the other worker needs.
DEFER_SECONDS = 0.01
DEFER_POLL_SECONDS = 0.0005
STOP_KEEPALIVE_LINGER_SECONDS = 2.0
# uvloop's timers count in milliseconds: one may fire up to this much before its time.
TIMER_RESOLUTION_SECONDS = 0.001
# Descriptors a worker keeps for everything but client connections (policy callbacks, metrics files,
# the cluster cache), on top of those open when it starts.
SPARE_DESCRIPTORS = 64
# Out of descriptors: accepting pauses this long, doubling up to the maximum while it lasts (as Go's
# net/http backs off on temporary accept errors).
ACCEPT_BACKOFF_SECONDS = (0.005, 1.0)
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TLS_READ_BYTES = 256 * 1024


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
    """Open connections of every worker, since when it is evaluating, and its last heartbeat, in
    memory shared by all of them.

    A keep-alive connection stays with the worker that accepted it, and the worker that wakes first
    for a burst of connections would take nearly all of them (measured 13 of 16 on one of two
    workers). Every worker is woken for a pending connection (they all watch the listening socket);
    with this table one that holds more connections than another lets that one take it. The other
    may be evaluating: it accepts when the evaluation ends (waiting only for idle workers, one of
    two still took 14 of 16 of a burst of 100 ms evaluations), unless it has been evaluating for
    longer than LONG_EVALUATION_MS (a 3 s evaluation must not slow every accept of the others).
    Made in the master (anonymous shared memory, inherited by every fork); a worker writes its own slot.
    """

    SLOTS = 1024
    STALE_SECONDS = 3  # a worker that has not beaten for this long (killed, stuck) is not waited for
    LONG_EVALUATION_MS = 250

    def __init__(self) -> None:
        n = self.SLOTS
        self._memory = mmap.mmap(-1, n * (3 * 4 + 8))
        view = memoryview(self._memory)
        ints = view[:n * 3 * 4].cast("i")
        self.pids, self.counts, self.beats = ints[:n], ints[n:2 * n], ints[2 * n:]
        self.evaluating_since = view[n * 3 * 4:].cast("q")  # CLOCK_MONOTONIC milliseconds, 0: not evaluating

    def join(self, slot: int) -> None:
        self.counts[slot] = self.evaluating_since[slot] = 0
        self.beat(slot)
        self.pids[slot] = os.getpid()

    def leave(self, slot: int) -> None:
        self.pids[slot] = 0

    def serving(self) -> set[int]:
        """The pids of the workers that joined (they serve) and have not left."""
        return {pid for pid in self.pids if pid}

    def beat(self, slot: int) -> None:
        self.beats[slot] = _monotonic_ms() // 1000  # CLOCK_MONOTONIC is one clock for every process

    def evaluation_started(self, slot: int) -> None:
        self.evaluating_since[slot] = _monotonic_ms()

    def evaluation_ended(self, slot: int) -> None:
        self.evaluating_since[slot] = 0

    def should_defer(self, slot: int, mine: int) -> bool:
        """Another live worker, not stuck in a long evaluation, holds fewer connections than `mine` less one."""
        now_ms = _monotonic_ms()
        now = now_ms // 1000
        for i, pid in enumerate(self.pids):
            if (pid and i != slot and self.counts[i] + 1 < mine and now - self.beats[i] <= self.STALE_SECONDS
                    and now_ms - (self.evaluating_since[i] or now_ms) < self.LONG_EVALUATION_MS):
                return True
        return False


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def connection_cap(configured: int, descriptor_limit: int, descriptors_in_use: int) -> int:
    """Connections a worker may hold: the configured cap, lowered to fit under the descriptor limit."""
    return max(1, min(configured, descriptor_limit - descriptors_in_use - SPARE_DESCRIPTORS))


def descriptors() -> tuple[int, int]:
    """This process's soft limit on open files and how many it has open."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = SPARE_DESCRIPTORS
    return (soft if soft != resource.RLIM_INFINITY else 1 << 20), in_use


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client may cost a worker (kwserver's settings: see kwserver/config.py)."""

    header_timeout: float  # from connecting (a new connection) or the first byte of a request to the end of its headers
    body_timeout: float  # from the end of the headers to the end of the body
    idle_timeout: float  # a keep-alive connection with no request in progress
    handshake_timeout: float  # TLS handshake
    max_connections: int  # open connections per worker; beyond, idle ones are closed, else new ones get 503
    send_timeout: float = 30.0  # an answer the client reads none of for this long: the connection is cut
    max_body_bytes: int = MAX_REQUEST_BODY_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ConnectionLimits:
        return cls(header_timeout=settings.header_timeout_seconds, body_timeout=settings.body_timeout_seconds,
                   idle_timeout=settings.keepalive_timeout_seconds,
                   handshake_timeout=settings.tls_handshake_timeout_seconds,
                   max_connections=settings.max_connections_per_worker, send_timeout=settings.send_timeout_seconds)


@dataclass
class _Request:
    """A request that has arrived (or whose 413 is decided), waiting for its answer."""

    environ: dict[str, Any]
    keep_alive: bool
    http_10: bool
    too_large: bool = False


class Connection(asyncio.Protocol):
    """One client connection: TLS, parsing, the limits, complete requests handed to the app in order."""

    __slots__ = (
        "body", "body_size", "deadline", "discarded", "environ_base", "handshaken", "header_bytes", "headers",
        "in_request", "incoming", "outgoing", "parser", "pending", "requests", "server", "timer", "timer_kind",
        "tls", "too_large", "transport", "url", "writing_paused",
    )

    def __init__(self, server: HttpServer, tls: ssl.SSLContext | None = None):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = ""
        self.deadline: float | None = None  # loop time
        self.environ_base: dict[str, Any] = {}
        self.in_request = False
        self.requests = 0  # answered on this connection
        self.pending: list[_Request] = []  # arrived while an earlier answer was unsent
        self.writing_paused = False
        self.tls: ssl.SSLObject | None = None
        self.handshaken = tls is None
        if tls is not None:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = tls.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self._reset_request()

    def _reset_request(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False
        self.discarded = 0

    # --- transport events ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connection_made(self)
        self.environ_base = self.server.environ_for(transport, secure=self.tls is not None)
        if self.tls is not None:
            self._arm(self.server.limits.handshake_timeout, "handshake")
        else:
            self._arm(self.server.limits.header_timeout, "header")  # from connecting: silence is not free

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.pending.clear()
        self.server.connection_lost(self)

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            self._feed(data)
            return
        self.incoming.write(data)
        if not self.handshaken and not self._handshake():
            return
        try:
            buffer = self.server.tls_buffer
            while self.incoming.pending or self.tls.pending():
                count = self.tls.read(_TLS_READ_BYTES, buffer)
                if not count:  # the client's close_notify
                    self._close()
                    return
                self._feed(buffer[:count].tobytes())
                if self.transport is None or self.transport.is_closing():
                    return  # answered and closed (a bad request, say): the rest is not read
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still on its way
        except ssl.SSLError as exc:
            log.info("TLS error from %s: %s", self.environ_base.get("REMOTE_ADDR"), exc)
            self._abort()
        self._flush_tls()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        # The client is not reading what we send: stop reading what it sends, and give it `send_timeout`.
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        self._arm(self.server.limits.send_timeout, "send")

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._disarm()
        self._answer_pending()
        if self.in_request and self.deadline is None and not self.writing_paused:
            # A request begun while the send timeout ran has had no timer of its own: it gets one now.
            self._arm(self.server.limits.body_timeout, "body")

    # --- TLS ---
    def _handshake(self) -> bool:
        """Go on with the handshake; True once it is done. A refused one sends its alert, then closes."""
        if self.transport is None or self.transport.is_closing():
            return False
        try:
            self.tls.do_handshake()  # type: ignore[union-attr]
        except ssl.SSLWantReadError:
            self._flush_tls()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._flush_tls()  # the alert that says why (an unknown client CA, say)
            log.info("TLS handshake with %s refused: %s", self.environ_base.get("REMOTE_ADDR"),
                     getattr(exc, "reason", None) or exc)
            if self.transport is not None:
                self.transport.close()  # after the alert in its buffer is sent
            return False
        self.handshaken = True
        self._flush_tls()
        self._arm(self.server.limits.header_timeout, "header")
        return True

    def _flush_tls(self) -> None:
        transport = self.transport
        if self.tls is not None and self.outgoing.pending and transport is not None and not transport.is_closing():
            transport.write(self.outgoing.read())

    def _send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.tls is None:
            self.transport.write(data)
            return
        try:
            self.tls.write(data)
        except ssl.SSLError as exc:  # a renegotiation attempt, for instance
            log.info("TLS error to %s: %s", self.environ_base.get("REMOTE_ADDR"), exc)
            self._abort()
            return
        self._flush_tls()

    def _close(self) -> None:
        """Close after what was written is sent (with TLS, after our close_notify)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.tls is not None and self.handshaken:
            with contextlib.suppress(ssl.SSLError):
                self.tls.unwrap()  # our close_notify; the client's is not waited for
            self._flush_tls()
        transport.close()

    def _abort(self) -> None:
        """Close now, dropping what is unsent."""
        if self.transport is not None:
            self.transport.abort()

    # --- parser ---
    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_BAD_REQUEST)
        except httptools.HttpParserError:
            self._fail(_BAD_REQUEST)

    def on_message_begin(self) -> None:
        self._reset_request()
        self.in_request = True
        self.server.became_busy(self)
        if self.requests or self.timer_kind != "header":
            # A kept-alive connection's next request: its header time starts with its first byte. A new
            # connection's started when it connected.
            self._arm(self.server.limits.header_timeout, "header")

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
        self._arm(self.server.limits.body_timeout, "body")
        length = self._header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.server.limits.max_body_bytes:
            self._too_large(int(length))
            return
        expect = self._header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and not self.pending:
            self._send(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self.too_large:
            # Read and dropped, so the client sees the 413 rather than a reset; up to a bound.
            self.discarded += len(body)
            if self.discarded > MAX_DISCARDED_BYTES:
                self._abort()
            return
        self.body_size += len(body)
        if self.body_size > self.server.limits.max_body_bytes:
            self._too_large(self.body_size)
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_request = False
        if self.too_large:
            if not self.pending:
                self._close()  # its 413 was sent; else the 413 still waiting closes it once sent
            return
        self._disarm()
        self._submit(self._request())

    # --- requests ---
    def _header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if _LOWERED[key] == name:
                return value
        return None

    def _request(self, content_length: int | None = None) -> _Request:
        parser = self.parser
        return _Request(self.server.environ(self, b"".join(self.body), content_length),
                        keep_alive=parser.should_keep_alive(), http_10=parser.get_http_version() == "1.0",
                        too_large=content_length is not None)

    def _too_large(self, size: int) -> None:
        """Answer now, without keeping a body the app would refuse: the app gets the request with its
        length and no body, and answers 413 in its route's format. The connection closes once the rest
        of the body has been read and dropped (or is too long to drain, or the body timeout passes)."""
        self.too_large = True
        self.body = []
        self._submit(self._request(content_length=size))

    def _submit(self, request: _Request) -> None:
        """Answer now, or after the answers before it have been sent (pipelining, back-pressure)."""
        if self.pending or self.writing_paused:
            self.pending.append(request)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self._answer(request)

    def _answer_pending(self) -> None:
        while self.pending and not self.writing_paused:
            self._answer(self.pending.pop(0))
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self.writing_paused:
            transport.resume_reading()
            self._wait_for_next()

    def _answer(self, request: _Request) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        response, close = self.server.call_app(request.environ)
        close = close or request.too_large or not request.keep_alive or not self.server.accepting
        if close:
            response = response.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        elif request.http_10:
            response = response.replace(b"\r\n\r\n", b"\r\nconnection: keep-alive\r\n\r\n", 1)
        self.requests += 1
        self._send(response)
        self.server.request_done()
        if request.too_large:
            if not self.in_request:  # its body has been read (or dropped) already
                self._close()
            return  # else closed when the body ends, is too long to drain, or its timer fires
        if close:
            self.pending.clear()
            self._close()
        else:
            self._wait_for_next()

    def _wait_for_next(self) -> None:
        """All answers sent: the connection is idle until its next request begins."""
        if not self.in_request and not self.pending and not self.writing_paused:
            self._arm(self.server.limits.idle_timeout, "idle")
            self.server.became_idle(self)

    # --- timers ---
    # A connection has one deadline at a time (None: none) and at most one timer, which fires at or
    # before it. Moving the deadline later, as every request does three times (header, body, idle),
    # leaves the timer as it is: when it fires early it is set again for the deadline. A new timer is
    # made only when the deadline moves earlier, so a kept-alive connection costs a timer per timeout
    # period instead of three per request.
    def _arm(self, seconds: float, kind: str) -> None:
        if self.writing_paused and kind != "send":
            return  # while an answer is unsent, only the send timeout runs
        loop = self.server.loop
        self.timer_kind = kind
        self.deadline = deadline = loop.time() + seconds
        timer = self.timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self.timer = loop.call_at(deadline, self._timed_out)

    def _disarm(self) -> None:
        if not self.writing_paused:
            self.deadline = None

    def _cancel_timer(self) -> None:
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None:
            return
        loop = self.server.loop
        if loop.time() + TIMER_RESOLUTION_SECONDS < deadline:  # moved later since this timer was set
            self.timer = loop.call_at(deadline, self._timed_out)
            return
        self.deadline = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.timer_kind in ("send", "handshake") or transport.get_write_buffer_size():
            self._abort()  # what the client does not read is not kept for it
        elif self.in_request and not self.too_large:
            self._fail(_TIMED_OUT)  # a request that stopped half-way is told why
        else:
            self._close()  # silent since it connected, idle between requests, or a refused body that never ended

    def _fail(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.pending.clear()
            self._send(response)
            self._close()

    @property
    def idle(self) -> bool:
        return not self.in_request and not self.pending and not self.writing_paused


def _wsgi_path(url: bytes) -> tuple[str, str]:
    parsed = httptools.parse_url(url)
    path = unquote_to_bytes(parsed.path).decode("latin-1")
    return path, (parsed.query or b"").decode("latin-1")


class _Memo(dict):
    """A function's results for the few inputs that recur in every request (targets, header names),
    kept up to a bound so that clients sending ever new ones cannot make it grow."""

    def __init__(self, compute: Callable[[Any], Any], bound: int = 256):
        super().__init__()
        self.compute, self.bound = compute, bound

    def __missing__(self, key: Any) -> Any:
        value = self.compute(key)
        if len(self) < self.bound:
            self[key] = value
        return value


def _environ_key(name: bytes) -> str:
    """The WSGI environ key of a header (`HTTP_X_FOO`; CONTENT_TYPE and CONTENT_LENGTH without the prefix)."""
    key = name.decode("latin-1").upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


_PATHS = _Memo(_wsgi_path)
_ENVIRON_KEYS = _Memo(_environ_key)
_METHODS = _Memo(lambda method: method.decode("latin-1"))
_PROTOCOLS = _Memo(lambda version: f"HTTP/{version}")
_LOWERED = _Memo(bytes.lower)


class HttpServer:
    """The listening side of one worker: accepting, the connection count, idle connections, the WSGI calls."""

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
        # Connections with no request in progress, longest idle first: the ones closed to make room.
        self.idle_connections: dict[Connection, None] = {}
        self.pending_connections = 0  # accepted, not yet made into a Connection
        self.listeners: list[socket.socket] = []
        self.accepting = False
        self.drained = asyncio.Event()
        self.deferring_since = 0.0
        self.backoff = 0.0
        self.started: tuple[str, list[tuple[str, str]]] | None = None  # the app's start_response
        # Kept free, so that a worker out of descriptors can still accept a client to tell it 503.
        self.reserve: int | None = self._reserve()
        # Where every connection's decrypted bytes are read (one callback runs at a time): asking
        # SSLObject.read for a new 256 KiB bytes object per record cost ~19 µs each.
        self.tls_buffer = memoryview(bytearray(_TLS_READ_BYTES))

    # --- accepting ---
    def start(self, listeners: Iterable[Any]) -> None:
        for listener in listeners:
            sock = listener.sock if hasattr(listener, "sock") else listener
            sock.setblocking(False)
            self.listeners.append(sock)
        self.accepting = True
        self._watch_listeners()

    def _watch_listeners(self) -> None:
        for sock in self.listeners:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch_listeners(self) -> None:
        for sock in self.listeners:
            self.loop.remove_reader(sock.fileno())

    def stop_accepting(self) -> None:
        if not self.accepting:
            return
        self.accepting = False
        if self.table is not None:
            self.table.leave(self.slot)
        self._unwatch_listeners()
        # Kept-alive connections linger a little: a request a client is already sending on one is
        # answered (with `connection: close`) instead of being dropped.
        for connection in list(self.connections):
            if connection.idle:
                connection._arm(min(STOP_KEEPALIVE_LINGER_SECONDS, self.limits.idle_timeout), "idle")
        self._check_drained()

    @property
    def open_connections(self) -> int:
        return len(self.connections) + self.pending_connections

    def _accept(self, listener: socket.socket) -> None:
        # One connection per readiness event (every worker is woken for it), passed over for a moment
        # when another worker holds fewer.
        if self._defer():
            self._unwatch_listeners()
            self.loop.call_later(DEFER_POLL_SECONDS, self._resume_accepting)
            return
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            self.deferring_since = 0.0  # another worker took it
            return
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                self._out_of_descriptors(listener, exc)
            else:
                log.warning("accept failed: %s", exc)
            return
        self.deferring_since = 0.0
        self.backoff = 0.0
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.open_connections >= self.limits.max_connections and not self._close_longest_idle():
            _refuse(sock)
            return
        self.pending_connections += 1
        self._publish()
        self.loop.create_task(self._connect(sock))

    def _defer(self) -> bool:
        if self.table is None or not self.table.should_defer(self.slot, self.open_connections):
            self.deferring_since = 0.0
            return False
        now = time.monotonic()
        if not self.deferring_since or now - self.deferring_since > 25 * DEFER_SECONDS:
            self.deferring_since = now  # a new pending connection (the last one was taken elsewhere)
        return now - self.deferring_since < DEFER_SECONDS

    def _close_longest_idle(self) -> bool:
        """Make room for a new connection by closing the longest-idle one (as nginx reuses its idle
        keep-alive connections); False when every connection is mid-request."""
        for connection in self.idle_connections:
            self.idle_connections.pop(connection)
            connection._close()
            self.connections.discard(connection)  # counted out now; its connection_lost comes later
            return True
        return False

    def _out_of_descriptors(self, listener: socket.socket, exc: OSError) -> None:
        """Refuse the waiting client with the reserved descriptor, then pause accepting (no spinning)."""
        if self.reserve is not None:
            os.close(self.reserve)
            self.reserve = None
            with contextlib.suppress(OSError):
                sock, _ = listener.accept()
                _refuse(sock)
            self.reserve = self._reserve()
        first = not self.backoff
        low, high = ACCEPT_BACKOFF_SECONDS
        self.backoff = min(high, self.backoff * 2 or low)
        if first or self.backoff == high:
            log.warning("cannot accept connections: %s (%d open here); refusing new ones and pausing "
                        "accepting for up to %.0f ms at a time", exc.strerror or exc, self.open_connections,
                        high * 1000)
        self._unwatch_listeners()
        self.loop.call_later(self.backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.accepting:
            self._watch_listeners()

    @staticmethod
    def _reserve() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def _publish(self) -> None:
        if self.table is not None:
            self.table.counts[self.slot] = self.open_connections

    async def _connect(self, sock: socket.socket) -> None:
        try:
            context = self.ssl_context() if self.ssl_context else None
            await self.loop.connect_accepted_socket(lambda: Connection(self, context), sock)
            return
        except OSError as exc:
            log.debug("connection failed before its first request: %s", exc)
        except Exception:  # a broken certificate file, for instance: this client fails, the worker lives
            log.exception("cannot set up a client connection")
        sock.close()
        self.pending_connections -= 1
        self._publish()
        self._check_drained()

    # --- connection bookkeeping ---
    def connection_made(self, connection: Connection) -> None:
        self.pending_connections -= 1
        self.connections.add(connection)
        self.idle_connections[connection] = None

    def connection_lost(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.idle_connections.pop(connection, None)
        self._publish()
        self._check_drained()

    def became_busy(self, connection: Connection) -> None:
        self.idle_connections.pop(connection, None)

    def became_idle(self, connection: Connection) -> None:
        self.idle_connections.pop(connection, None)
        self.idle_connections[connection] = None  # now the most recently idle

    def _check_drained(self) -> None:
        if not self.accepting and self.open_connections == 0:
            self.drained.set()

    def request_done(self) -> None:
        self.on_request()

    # --- WSGI ---
    def environ_for(self, transport: asyncio.BaseTransport, secure: bool) -> dict[str, Any]:
        sockname = transport.get_extra_info("sockname")
        peername = transport.get_extra_info("peername")
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
        environ = connection.environ_base.copy()
        environ["REQUEST_METHOD"] = _METHODS[parser.get_method()]
        environ["PATH_INFO"], environ["QUERY_STRING"] = _PATHS[connection.url]
        environ["SERVER_PROTOCOL"] = _PROTOCOLS[parser.get_http_version()]
        environ["CONTENT_LENGTH"] = str(len(body) if content_length is None else content_length)
        environ["wsgi.input"] = io.BytesIO(body)
        for name, value in connection.headers:
            key = _ENVIRON_KEYS[name]
            if key == "CONTENT_LENGTH":
                continue
            text = value.decode("latin-1").strip()
            if key in environ and key != "CONTENT_TYPE":
                environ[key] = f"{environ[key]},{text}"
            else:
                environ[key] = text
        return environ

    def call_app(self, environ: dict[str, Any]) -> tuple[bytes, bool]:
        """Run the app on one request: the response bytes, and whether to close the connection after."""
        table = self.table
        if table is not None:
            table.evaluation_started(self.slot)
        self.started = None
        try:
            chunks = self.app(environ, self._start_response)
            try:
                body = b"".join(chunks)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            status, headers = self.started
        except Exception:  # the app renders its own errors; this is the last line of defence
            log.exception("the application failed on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n", True)
        finally:
            if table is not None:
                table.evaluation_ended(self.slot)
        head = [f"HTTP/1.1 {status}\r\n"]
        has_length = close_requested = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                has_length = True
            elif lowered == "connection" and value.lower() == "close":
                close_requested = True
                continue
            head.append(f"{name}: {value}\r\n")
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""
        elif not has_length:
            head.append(f"content-length: {len(body)}\r\n")
        head.append("\r\n")
        return "".join(head).encode("latin-1") + body, close_requested

    def _start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
        # One request at a time: the app of the request being answered calls this.
        self.started = (status, headers)
        return _no_write


def _no_write(data: bytes) -> None:
    """WSGI's `write` callable: kwserver's apps return their bodies instead."""


def _refuse(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.send(_REFUSED)
    sock.close()


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
        limit, in_use = descriptors()
        max_connections = connection_cap(limits.max_connections, limit, in_use)
        if max_connections < limits.max_connections and self.age == 1:  # once, not per fork
            log.warning("at most %d connections per worker (not %d): this process may open %d files "
                        "(ulimit -n) and keeps %d for other uses", max_connections,
                        limits.max_connections, limit, limit - max_connections)
        # Idle keep-alive connections follow gunicorn's `keepalive`, which a gunicorn config file may tune.
        limits = dataclasses.replace(limits, idle_timeout=self.cfg.keepalive, max_connections=max_connections)
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
            self.table.beat(self.slot)
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
