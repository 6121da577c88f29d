"""Bounds-checked access to a guest's linear memory.

wasmtime-py's `Memory.read`/`write` build intermediate ctypes arrays on every call; host functions
run on the hot path of every evaluation, so this goes straight to the data pointer. A memory moves
only when the guest grows it, and it never shrinks: the pointer is fetched again whenever the size
has changed since it was last fetched.
"""

from __future__ import annotations

import ctypes
import struct

import wasmtime
from wasmtime import _bindings

_memory_data_size = _bindings._wasmtime_memory_data_size  # the ctypes function itself, without its wrapper
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """The guest passed a pointer/length outside its memory."""


class GuestMemory:
    __slots__ = ("_address", "_address_size", "_context", "_memory_ref", "memory", "store")

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory):
        self.store = store
        self.memory = memory
        self._address_size = -1  # the size at which `_address` was fetched
        self._address = 0
        # wasmtime-py rebuilds both on every size query; they live as long as the store (wasmtime is
        # pinned to one version, see pyproject.toml).
        self._context = store._context()
        self._memory_ref = ctypes.byref(memory._memory)

    @property
    def size(self) -> int:
        return _memory_data_size(self._context, self._memory_ref)

    def address(self, size: int) -> int:
        """Where the memory starts in this process, given its current size (it moves only when it grows)."""
        return self._address_of(size)

    def _address_of(self, size: int) -> int:
        if size != self._address_size:
            self._address = ctypes.cast(self.memory.data_ptr(self.store), ctypes.c_void_p).value
            self._address_size = size
        return self._address

    def _base(self, ptr: int, length: int) -> int:
        size = _memory_data_size(self._context, self._memory_ref)
        if ptr < 0 or length < 0 or ptr + length > size:
            raise GuestMemoryError(f"out of bounds memory access: {ptr}+{length} > {size}")
        return self._address_of(size) + ptr

    def read(self, ptr: int, length: int) -> bytes:
        if length == 0:
            return b""
        return ctypes.string_at(self._base(ptr, length), length)

    def write(self, ptr: int, data: bytes) -> None:
        if data:
            ctypes.memmove(self._base(ptr, len(data)), data, len(data))

    def read_host_call(self, bd_ptr: int, bd_len: int, ns_ptr: int, ns_len: int, op_ptr: int, op_len: int,
                       ptr: int, length: int) -> tuple[str, str, str, bytes]:
        """The arguments of a host call (waPC `__host_call`, WASI `host.call`): binding, namespace,
        operation and payload."""
        return (self.read(bd_ptr, bd_len).decode("utf-8"), self.read(ns_ptr, ns_len).decode("utf-8"),
                self.read(op_ptr, op_len).decode("utf-8"), self.read(ptr, length))

    def read_cstring(self, ptr: int) -> bytes:
        """A NUL-terminated string (OPA's ABI)."""
        size = self.size
        if ptr < 0 or ptr >= size:
            raise GuestMemoryError(f"out of bounds memory access at {ptr}")
        base = self._address_of(size)
        chunks, pos = [], ptr
        while pos < size:
            chunk = ctypes.string_at(base + pos, min(65536, size - pos))
            end = chunk.find(b"\0")
            if end >= 0:
                chunks.append(chunk[:end])
                return b"".join(chunks)
            chunks.append(chunk)
            pos += len(chunk)
        raise GuestMemoryError("unterminated string in guest memory")

    def write_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, _U32.pack(value & 0xFFFFFFFF))

    def write_u64(self, ptr: int, value: int) -> None:
        self.write(ptr, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))
