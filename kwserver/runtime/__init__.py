"""WebAssembly runtimes: one module per execution mode, on a shared wasmtime engine.

A runtime turns compiled modules into instances and calls them. It knows nothing of HTTP,
gunicorn or AdmissionReview envelopes: it moves bytes in and out of guests, enforces limits and
reports failures as the exceptions below.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import wasmtime
from wasmtime import _bindings

from kwserver.runtime.engine import deadline_ticks
from kwserver.runtime.memory import GuestMemoryError

# (binding, namespace, operation, payload) -> response bytes; raising means a failed host call, and
# the exception text is what the guest reads as the host error.
HostCall = Callable[[str, str, str, bytes], bytes]

INTERRUPTED = "guest code interrupted, execution deadline exceeded"
NO_HOST_CALLBACK = "Cannot process Wasm guest request: callback channel not provided"


class RuntimeFailure(Exception):
    """Base class of everything a guest can do wrong."""


class GuestTimeout(RuntimeFailure):
    """The evaluation ran past its deadline and was interrupted."""

    def __init__(self, message: str = INTERRUPTED):
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


def is_interrupt(exc: BaseException) -> bool:
    """The guest stopped because its deadline passed (an epoch trap or our own GuestTimeout)."""
    if isinstance(exc, GuestTimeout):
        return True
    return isinstance(exc, wasmtime.Trap) and exc.trap_code == wasmtime.TrapCode.INTERRUPT


# What a call into a guest can raise when the guest fails: traps (the deadline's too), wasmtime errors,
# WASI's proc_exit, and what host functions raise on the guest's bad pointers and bytes.
GUEST_FAILURES = (wasmtime.Trap, wasmtime.WasmtimeError, GuestTimeout, ProcExit, GuestMemoryError, UnicodeDecodeError)


def classify_failure(exc: BaseException) -> GuestTimeout | GuestCallFailure:
    """What a guest call that raised `exc` (one of GUEST_FAILURES) amounts to: GuestTimeout when its
    deadline passed, otherwise a GuestCallFailure saying why in one line. Every runtime maps its
    failures through here; what a mode answers for each is the mode's (kwserver.evaluation.modes)."""
    if is_interrupt(exc):
        return GuestTimeout()
    return GuestCallFailure(failure_reason(exc))


def no_host_callback(binding: str, namespace: str, operation: str, payload: bytes) -> bytes:
    """The host call of a guest that was given no capabilities."""
    raise RuntimeError(NO_HOST_CALLBACK)


@dataclass(frozen=True)
class InstanceLimits:
    """Per-evaluation limits applied to one instance's store."""

    memory_bytes: int
    timeout_seconds: int | None  # None: the evaluation is never interrupted


def set_store_limits(store: wasmtime.Store, old: InstanceLimits, new: InstanceLimits) -> None:
    if new.memory_bytes != old.memory_bytes:
        store.set_limits(memory_size=new.memory_bytes)


def new_store(engine: wasmtime.Engine, limits: InstanceLimits) -> wasmtime.Store:
    """A store for one instance, its linear memory capped (memory.grow fails past the limit)."""
    store = wasmtime.Store(engine)
    store.set_limits(memory_size=limits.memory_bytes)
    return store


# The C function itself: armed before every call into a guest, it skips wasmtime-py's two wrappers.
_set_epoch_deadline = _bindings._wasmtime_context_set_epoch_deadline


def arm_deadline(store: wasmtime.Store, limits: InstanceLimits, epoch_interruption: bool) -> float | None:
    """Start the clock of one call: the epoch deadline for wasm code, and the monotonic time by which
    host-side waits (WASI clocks, network) must give up; None when the call has no timeout."""
    timeout = limits.timeout_seconds
    if epoch_interruption:
        _set_epoch_deadline(store._context(), deadline_ticks(timeout))
    return None if timeout is None else time.monotonic() + timeout


class PolicyInstance(Protocol):
    """A live policy instance of some execution mode; one call at a time."""

    broken: bool  # it failed in a way that may have left it inconsistent: never reuse it

    @property
    def memory_size(self) -> int: ...

    def bind(self, limits: InstanceLimits, host_call: HostCall, label: str) -> None:
        """Serve the next calls for another policy of the same module: its limits, host
        capabilities and name (logs). Policies sharing a module share an instance this way."""
        ...

    def close(self) -> None: ...


class LinkedModule(Protocol):
    """A compiled module linked with its host functions; makes instances."""

    def instantiate(self, limits: InstanceLimits, host_call: HostCall | None = None,
                    label: str = "guest") -> PolicyInstance: ...


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
