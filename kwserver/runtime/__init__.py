"""WebAssembly runtimes: one module per execution mode, on a shared wasmtime engine.

A runtime turns compiled modules into instances and calls them. It knows nothing of HTTP,
gunicorn or AdmissionReview envelopes: it moves bytes in and out of guests, enforces limits and
reports failures as the exceptions below.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


class RuntimeFailure(Exception):
    """Base class of everything a guest can do wrong."""


class GuestTimeout(RuntimeFailure):
    """The evaluation ran past its deadline and was interrupted."""

    def __init__(self, message: str = "guest code interrupted, execution deadline exceeded"):
        super().__init__(message)


class GuestCallFailure(RuntimeFailure):
    """The guest reported an error, trapped, or broke the calling convention."""


class InstantiationFailure(RuntimeFailure):
    """A new instance could not be created or initialised."""


class ProcExit(Exception):
    """Raised by the WASI `proc_exit` import to unwind the guest."""

    def __init__(self, code: int):
        super().__init__(f"guest exited with code {code}")
        self.code = code


def failure_reason(exc: BaseException) -> str:
    """One line saying why a guest failed: a trap's cause (`wasm trap: ...`), not wasmtime's backtrace."""
    text = str(exc).strip()
    if "Caused by:" in text:
        causes = [line.strip() for line in text.split("Caused by:", 1)[1].splitlines() if line.strip()]
        if causes:
            return causes[-1].split(": ", 1)[1] if causes[-1][:1].isdigit() else causes[-1]
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class InstanceLimits:
    """Per-evaluation limits applied to one instance's store."""

    memory_bytes: int
    timeout_seconds: int | None  # None: the evaluation is never interrupted


# The guest running on this thread. Host functions are linked once per module and shared by all of
# its instances, so they find the instance they serve here; a thread runs one guest at a time.
_current = threading.local()


def current_guest():
    return _current.guest


class running:
    """Mark `guest` as the one running on this thread for the duration of a call into wasm."""

    __slots__ = ("guest", "previous")

    def __init__(self, guest: object):
        self.guest = guest

    def __enter__(self) -> None:
        self.previous = getattr(_current, "guest", None)
        _current.guest = self.guest

    def __exit__(self, *exc: object) -> None:
        _current.guest = self.previous
