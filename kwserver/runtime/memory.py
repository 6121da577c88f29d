"""Bounds-checked access to a guest's linear memory.

wasmtime-py's `Memory.read`/`write` build intermediate ctypes arrays on every call; host functions
run on the hot path of every evaluation, so this goes straight to the data pointer. The pointer is
fetched on every access because the memory may move when the guest grows it.
"""

from __future__ import annotations

import ctypes
import struct

import wasmtime

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """The guest passed a pointer/length outside its memory."""


class GuestMemory:
    __slots__ = ("memory", "store")

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory):
        self.store = store
        self.memory = memory

    def _base(self, ptr: int, length: int) -> int:
        size = self.memory.data_len(self.store)
        if ptr < 0 or length < 0 or ptr + length > size:
            raise GuestMemoryError(f"out of bounds memory access: {ptr}+{length} > {size}")
        return ctypes.cast(self.memory.data_ptr(self.store), ctypes.c_void_p).value + ptr

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
        size = self.memory.data_len(self.store)
        if ptr < 0 or ptr >= size:
            raise GuestMemoryError(f"out of bounds memory access at {ptr}")
        base = ctypes.cast(self.memory.data_ptr(self.store), ctypes.c_void_p).value
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

    @property
    def size(self) -> int:
        return self.memory.data_len(self.store)
