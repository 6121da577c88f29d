"""The frames between the workers and the cluster cache process, over a Unix socket.

A frame is a 4-byte big-endian length and that many bytes. A request is one orjson object
(`{"op": ..., "args": [...], "timeout": seconds}`); an answer is one status byte and its body: the
callback's JSON bytes exactly as the guest gets them (so a 5 MB list is copied, never parsed again), or the
UTF-8 text of a ClusterError.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import orjson

HEADER = struct.Struct(">I")
OK, ERROR = b"\x00", b"\x01"
MAX_REQUEST_BYTES = 1 << 20  # requests are a few hundred bytes; anything larger is not a worker talking


class ConnectionLost(Exception):
    """The peer closed the connection (or it broke) before a whole frame came."""


class Timeout(Exception):
    """The deadline passed before a whole frame came."""


def request_frame(op: str, args: list[Any], timeout: float) -> bytes:
    body = orjson.dumps({"op": op, "args": args, "timeout": timeout})
    return HEADER.pack(len(body)) + body


def answer_frame(ok: bool, body: bytes) -> bytes:
    return HEADER.pack(len(body) + 1) + (OK if ok else ERROR) + body


def send(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.sendall(frame)
    except TimeoutError as exc:
        raise Timeout() from exc
    except OSError as exc:
        raise ConnectionLost(str(exc)) from exc


def receive(sock: socket.socket, deadline: float | None = None, limit: int | None = None) -> bytes:
    """One frame's bytes; `deadline` (monotonic) bounds the whole read."""
    (length,) = HEADER.unpack(_exactly(sock, HEADER.size, deadline))
    if limit is not None and length > limit:
        raise ConnectionLost(f"a frame of {length} bytes is larger than {limit}")
    return _exactly(sock, length, deadline)


def _exactly(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout()
            sock.settimeout(left)
        try:
            count = sock.recv_into(view[got:])
        except TimeoutError as exc:
            raise Timeout() from exc
        except OSError as exc:
            raise ConnectionLost(str(exc)) from exc
        if count == 0:
            raise ConnectionLost("the connection was closed")
        got += count
    return bytes(buffer)


# A versioned answer: UNCHANGED when the asker already holds this version, else the version, a newline
# and the body (a version never contains a newline).
UNCHANGED = b"="


def versioned(version: str, body: bytes | None) -> bytes:
    return UNCHANGED if body is None else version.encode() + b"\n" + body


def read_versioned(payload: bytes) -> tuple[str, bytes] | None:
    """(version, body), or None for UNCHANGED."""
    if payload == UNCHANGED:
        return None
    version, _, body = payload.partition(b"\n")
    return version.decode(), body
