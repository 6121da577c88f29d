"""Stalled clients for the `hostile` scenario: connections that never finish what they started.

Three kinds, a third each: half a request header, a request whose body never arrives, and a TCP
connection to the TLS port that never sends its ClientHello. The server closes such connections
when its timeouts pass (408 or a plain close); a holder thread opens a new one for each, as a
persistent attacker would, so the count stays at N for the whole load point.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
from dataclasses import dataclass

HALF_HEADER = b"POST /validate/pod-privileged HTTP/1.1\r\nHost: x\r\n"
PARTIAL_BODY = (b"POST /validate/pod-privileged HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"req")
KINDS = ("half header", "partial body", "no ClientHello")


@dataclass
class StalledCounts:
    opened: int = 0
    reopened: int = 0  # closed by the server (its timeouts) and opened again
    failed: int = 0  # could not be opened (refused, reset)


class StalledClients:
    """Holds `count` stalled connections to 127.0.0.1:`port` until `stop`."""

    def __init__(self, port: int, count: int, tls: bool):
        self.port, self.count, self.tls = port, count, tls
        self.counts = StalledCounts()
        self._context = ssl.create_default_context()
        self._context.check_hostname = False
        self._context.verify_mode = ssl.CERT_NONE
        self._selector = selectors.DefaultSelector()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._hold, name="stalled-clients", daemon=True)

    def __enter__(self) -> StalledClients:
        for index in range(self.count):
            self._open(KINDS[index % len(KINDS)])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()

    def _open(self, kind: str) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            if kind != "no ClientHello":
                if self.tls:
                    sock = self._context.wrap_socket(sock)
                sock.sendall(HALF_HEADER if kind == "half header" else PARTIAL_BODY)
            sock.setblocking(False)
        except OSError:
            self.counts.failed += 1
            return
        self.counts.opened += 1
        self._selector.register(sock, selectors.EVENT_READ, kind)

    def _hold(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                try:
                    if sock.recv(65536):
                        continue  # an answer (408) before the close: wait for the close
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except OSError:
                    pass  # reset: closed as well
                self._selector.unregister(sock)
                sock.close()
                self.counts.reopened += 1
                if not self._stopping.is_set():
                    self._open(key.data)
