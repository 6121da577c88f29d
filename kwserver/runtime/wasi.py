"""WASI preview1 for policies, implemented on the host in Python.

Policies get no filesystem, no environment, no sockets; only the argv, stdin, stdout and stderr the
runtime gives them, all held in memory (per-request I/O never touches the disk), plus clocks,
randomness and `poll_oneoff` sleeps that respect the evaluation's deadline.

Every preview1 function a module imports is linked: the ones below are implemented, any other one
answers ENOSYS (or EBADF for descriptors that don't exist), which is what a sandbox without those
capabilities should say.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import time
from collections.abc import Callable

import wasmtime

from kwserver.runtime import GuestTimeout, ProcExit, current_guest, fastcall
from kwserver.runtime.memory import GuestMemory

log = logging.getLogger(__name__)

WASI_MODULE = "wasi_snapshot_preview1"

ESUCCESS, EBADF, EINVAL, ENOSYS, ENOTCAPABLE = 0, 8, 28, 52, 76
ESPIPE = 70

STDIN, STDOUT, STDERR = 0, 1, 2
FILETYPE_CHARACTER_DEVICE = 2
EVENTTYPE_CLOCK, EVENTTYPE_FD_READ, EVENTTYPE_FD_WRITE = 0, 1, 2
SUBCLOCKFLAG_ABSTIME = 1

_FDSTAT = struct.Struct("<BxHxxxxQQ")  # filetype, flags, rights_base, rights_inheriting
_SUBSCRIPTION = struct.Struct("<QB7xIxxxxQQH6x")  # userdata, tag, clock id, timeout, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, error, type, nbytes, flags
_ALL_RIGHTS = (1 << 29) - 1


class WasiState:
    """The WASI view of one instance: its arguments and in-memory standard streams."""

    __slots__ = ("args", "deadline_at", "log_prefix", "memory", "stderr", "stdin", "stdin_pos", "stdout")

    def __init__(self, args: list[str] | None = None, log_prefix: str = "guest"):
        self.args = [a.encode() for a in (args or [])]
        self.stdin = bytearray()
        self.stdin_pos = 0
        # None: forward writes to the server log (waPC guests print debugging output there).
        self.stdout: bytearray | None = None
        self.stderr: bytearray | None = None
        self.memory: GuestMemory | None = None
        self.deadline_at: float | None = None
        self.log_prefix = log_prefix

    def reset_streams(self, stdin: bytes, capture: bool) -> None:
        self.stdin = bytearray(stdin)
        self.stdin_pos = 0
        self.stdout = bytearray() if capture else None
        self.stderr = bytearray() if capture else None

    def write(self, fd: int, data: bytes) -> None:
        target = self.stdout if fd == STDOUT else self.stderr
        if target is not None:
            target += data
        elif data.strip():
            log.info("Guest module %s %s: %s", self.log_prefix, "stdout" if fd == STDOUT else "stderr",
                     data.decode("utf-8", "replace").rstrip())


def _state() -> WasiState:
    return current_guest().wasi


def _mem() -> GuestMemory:
    return current_guest().wasi.memory


# --- implemented functions ------------------------------------------------------------------------

def args_sizes_get(argc_ptr: int, buf_size_ptr: int) -> int:
    args = _state().args
    mem = _mem()
    mem.write_u32(argc_ptr, len(args))
    mem.write_u32(buf_size_ptr, sum(len(a) + 1 for a in args))
    return ESUCCESS


def args_get(argv_ptr: int, buf_ptr: int) -> int:
    mem = _mem()
    for i, arg in enumerate(_state().args):
        mem.write_u32(argv_ptr + 4 * i, buf_ptr)
        mem.write(buf_ptr, arg + b"\0")
        buf_ptr += len(arg) + 1
    return ESUCCESS


def environ_sizes_get(count_ptr: int, buf_size_ptr: int) -> int:
    mem = _mem()
    mem.write_u32(count_ptr, 0)
    mem.write_u32(buf_size_ptr, 0)
    return ESUCCESS


def environ_get(environ_ptr: int, buf_ptr: int) -> int:
    return ESUCCESS


_CLOCKS: dict[int, Callable[[], int]] = {
    0: time.time_ns,
    1: time.monotonic_ns,
    2: time.process_time_ns,
    3: time.thread_time_ns,
}


def clock_res_get(clock_id: int, res_ptr: int) -> int:
    if clock_id not in _CLOCKS:
        return EINVAL
    _mem().write_u64(res_ptr, 1000)
    return ESUCCESS


def clock_time_get(clock_id: int, precision: int, time_ptr: int) -> int:
    clock = _CLOCKS.get(clock_id)
    if clock is None:
        return EINVAL
    _mem().write_u64(time_ptr, clock())
    return ESUCCESS


def random_get(buf_ptr: int, length: int) -> int:
    _mem().write(buf_ptr, os.urandom(length))
    return ESUCCESS


def sched_yield() -> int:
    return ESUCCESS


def proc_exit(code: int) -> None:
    raise ProcExit(code)


def _iovecs(mem: GuestMemory, iovs_ptr: int, iovs_len: int) -> list[tuple[int, int]]:
    raw = mem.read(iovs_ptr, 8 * iovs_len)
    return [struct.unpack_from("<II", raw, 8 * i) for i in range(iovs_len)]


def fd_write(fd: int, iovs_ptr: int, iovs_len: int, nwritten_ptr: int) -> int:
    if fd not in (STDOUT, STDERR):
        return EBADF
    mem = _mem()
    data = b"".join(mem.read(ptr, length) for ptr, length in _iovecs(mem, iovs_ptr, iovs_len))
    _state().write(fd, data)
    mem.write_u32(nwritten_ptr, len(data))
    return ESUCCESS


def fd_read(fd: int, iovs_ptr: int, iovs_len: int, nread_ptr: int) -> int:
    if fd != STDIN:
        return EBADF
    state, mem = _state(), _mem()
    total = 0
    for ptr, length in _iovecs(mem, iovs_ptr, iovs_len):
        chunk = bytes(state.stdin[state.stdin_pos:state.stdin_pos + length])
        mem.write(ptr, chunk)
        state.stdin_pos += len(chunk)
        total += len(chunk)
        if len(chunk) < length:
            break
    mem.write_u32(nread_ptr, total)
    return ESUCCESS


def fd_fdstat_get(fd: int, stat_ptr: int) -> int:
    if fd not in (STDIN, STDOUT, STDERR):
        return EBADF
    _mem().write(stat_ptr, _FDSTAT.pack(FILETYPE_CHARACTER_DEVICE, 0, _ALL_RIGHTS, 0))
    return ESUCCESS


def fd_fdstat_set_flags(fd: int, flags: int) -> int:
    return ESUCCESS if fd in (STDIN, STDOUT, STDERR) else EBADF


def fd_close(fd: int) -> int:
    return ESUCCESS if fd in (STDIN, STDOUT, STDERR) else EBADF


def fd_seek(fd: int, offset: int, whence: int, newoffset_ptr: int) -> int:
    return ESPIPE if fd in (STDIN, STDOUT, STDERR) else EBADF


def fd_tell(fd: int, offset_ptr: int) -> int:
    return ESPIPE if fd in (STDIN, STDOUT, STDERR) else EBADF


def fd_sync(fd: int) -> int:
    return ESUCCESS if fd in (STDIN, STDOUT, STDERR) else EBADF


def fd_prestat_get(fd: int, prestat_ptr: int) -> int:
    return EBADF  # no preopened directories: libc stops scanning at the first EBADF


def fd_prestat_dir_name(fd: int, path_ptr: int, path_len: int) -> int:
    return EBADF


def path_open(*_args: int) -> int:
    return ENOTCAPABLE


def poll_oneoff(in_ptr: int, out_ptr: int, nsubscriptions: int, nevents_ptr: int) -> int:
    """Clock subscriptions sleep (never past the evaluation deadline); stdio is always ready."""
    if nsubscriptions == 0:
        return EINVAL
    mem = _mem()
    raw = mem.read(in_ptr, _SUBSCRIPTION.size * nsubscriptions)
    subscriptions = [_SUBSCRIPTION.unpack_from(raw, i * _SUBSCRIPTION.size) for i in range(nsubscriptions)]
    ready = [s for s in subscriptions if s[1] in (EVENTTYPE_FD_READ, EVENTTYPE_FD_WRITE)]
    if not ready:
        waits = []
        for _, _, clock_id, timeout, _, flags in subscriptions:
            if flags & SUBCLOCKFLAG_ABSTIME:
                timeout = max(0, timeout - _CLOCKS.get(clock_id, time.monotonic_ns)())
            waits.append(timeout)
        wait = min(waits) / 1e9
        deadline_at = _state().deadline_at
        if deadline_at is not None and time.monotonic() + wait > deadline_at:
            time.sleep(max(0.0, deadline_at - time.monotonic()))
            raise GuestTimeout()
        time.sleep(wait)
        shortest = min(waits)
        ready = [s for s, w in zip(subscriptions, waits, strict=True) if w == shortest]
    events = b"".join(_EVENT.pack(s[0], ESUCCESS, s[1], 0, 0) for s in ready)
    mem.write(out_ptr, events)
    mem.write_u32(nevents_ptr, len(ready))
    return ESUCCESS


_IMPLEMENTED: dict[str, Callable[..., int | None]] = {
    f.__name__: f
    for f in (
        args_get, args_sizes_get, environ_get, environ_sizes_get, clock_res_get, clock_time_get,
        random_get, sched_yield, proc_exit, fd_write, fd_read, fd_fdstat_get, fd_fdstat_set_flags,
        fd_close, fd_seek, fd_tell, fd_sync, fd_prestat_get, fd_prestat_dir_name, path_open, poll_oneoff,
    )
}


@functools.cache
def _unsupported(name: str, result_count: int) -> Callable[..., int | None]:
    def unsupported(*_args: int) -> int:
        log.debug("guest called unsupported WASI function %s", name)
        return ENOSYS

    if result_count != 1:
        def trap(*_args: int) -> None:
            raise wasmtime.WasmtimeError(f"WASI function {name} is not supported")
        return trap
    return unsupported


def define_wasi(linker: wasmtime.Linker, module: wasmtime.Module) -> None:
    """Link every WASI preview1 function the module imports, with the signature it declares."""
    for item in module.imports:
        if item.module != WASI_MODULE or not isinstance(item.type, wasmtime.FuncType):
            continue
        func = _IMPLEMENTED.get(item.name) or _unsupported(item.name, len(item.type.results))
        fastcall.define(linker, WASI_MODULE, item.name, item.type, func)
