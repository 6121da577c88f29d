"""Putting an instance of a pre-initialised module back into the state of a new one.

An evaluation on a pre-initialised module changes only its linear memory and its mutable globals:
its tables cannot change (kwserver/runtime/preinit.py refuses modules with instructions that write
them, or that touch data and element segments). So a new instance is not needed to start the next
evaluation from scratch: copying back the pages the evaluation wrote, from an untouched instance of
the module (its `template`, whose pages are the module's copy-on-write image, never written), and
resetting the globals gives exactly the state a new instance would have, for ~6 µs instead of the
~50 µs that a new store, instance, first call's page faults and teardown add to an evaluation
(bench/mode_costs.py), and with only the pages the guest really uses resident.

The written pages are found with Linux's PAGEMAP_SCAN ioctl (Linux >= 6.7): pages present in the
memory that are neither the image's file pages nor the shared zero page. Without it, or when the
guest grew its memory, a new instance is made as before.

Restoring runs after every evaluation, so its few microseconds are spent carefully: the scan goes
through `fcntl.ioctl` (no ctypes call), pages are copied between memoryviews, and what an instance
needs to be restored (where its memory is, how to reset its globals) is worked out once per instance.
A kept instance's memory never moves: it moves only when it grows, and a grown one is not restored.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any

import wasmtime

from kwserver.runtime import fastcall

PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)
PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_PFNZERO = 1 << 2, 1 << 3, 1 << 5
MAX_RANGES = 256

# struct pm_scan_arg: size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted,
# category_mask, category_anyof_mask, return_mask (all u64); vec: (start, end, categories) per range.
_SCAN_ARG = struct.Struct("<12Q")
_WALK = struct.Struct("<3Q")  # start, end, walk_end
_WALK_OFFSET = 16


class _Scanner:
    """Written pages of a range of this process's memory. One per process: /proc/self is the opener's."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._ranges = (ctypes.c_uint64 * (3 * MAX_RANGES))()
        self._found = memoryview(self._ranges).cast("B").cast("Q")
        self._arg = bytearray(_SCAN_ARG.pack(
            _SCAN_ARG.size, 0, 0, 0, 0, ctypes.addressof(self._ranges), MAX_RANGES, 0,
            PAGE_IS_FILE | PAGE_IS_PFNZERO, PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO, 0, 0))

    def written(self, start: int, end: int) -> list[tuple[int, int]] | None:
        """The written pages in [start, end), as offsets from `start`; None when the scan failed or had
        more ranges than it holds."""
        arg = self._arg
        _WALK.pack_into(arg, _WALK_OFFSET, start, end, 0)
        try:
            count = fcntl.ioctl(self.fd, PAGEMAP_SCAN, arg, True)
        except OSError:
            return None
        if _WALK.unpack_from(arg, _WALK_OFFSET)[2] != end:
            return None
        found = self._found
        return [(found[i] - start, found[i + 1] - start) for i in range(0, 3 * count, 3)]


_scanner: _Scanner | None = None
_unavailable = False


def scanner() -> _Scanner | None:
    """This process's scanner; None when the kernel cannot scan."""
    global _scanner, _unavailable
    if _unavailable:
        return None
    if _scanner is None or _scanner.pid != os.getpid():
        try:
            _scanner = _Scanner()
            probe = ctypes.create_string_buffer(1)
            start = ctypes.addressof(probe) & ~0xFFF
            if _scanner.written(start, start + 4096) is None:
                raise OSError("PAGEMAP_SCAN failed")
        except OSError:
            _unavailable = True
            _scanner = None
    return _scanner


def _view(address: int, size: int) -> memoryview:
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


class Pristine:
    """An untouched instance of a pre-initialised module (in this process), to restore others from."""

    def __init__(self, module: Any, limits: object, scan: _Scanner):
        # module: a kwserver.runtime.wapc.WapcModule (not imported: wapc imports this module)
        self.pid = os.getpid()
        self.scanner = scan
        self.template = module.instantiate(limits, label="template")
        store, memory = self.template.store, self.template.memory
        self.size = memory.size
        self.image = _view(memory.address(self.size), self.size)
        self.globals = [(name, fastcall.global_get(store, _global(store, self.template, name)))
                        for name in module.snapshot_globals]

    def restore(self, instance: Any) -> bool:
        """Put `instance` back into the state of a new instance; False when it cannot be."""
        if instance.broken or instance.memory.size != self.size:
            return False
        target = instance.restore_target
        if target is None:
            target = instance.restore_target = self._target(instance)
        base, memory, reset_globals = target
        written = self.scanner.written(base, base + self.size)
        if written is None:
            return False
        image = self.image
        for start, end in written:
            memory[start:end] = image[start:end]
        for reset in reset_globals:
            reset()
        return True

    def _target(self, instance: Any) -> tuple[int, memoryview, list[Callable[[], None]]]:
        """Where `instance`'s memory is and how to reset its globals: fixed while it is restorable."""
        store = instance.store
        base = instance.memory.address(self.size)
        return base, _view(base, self.size), [
            fastcall.global_setter(store, _global(store, instance, name), value) for name, value in self.globals]


def _global(store: wasmtime.Store, instance: Any, name: bytes) -> wasmtime.Global:
    exported = fastcall.export(store, instance.instance, name)
    if not isinstance(exported, wasmtime.Global):
        raise TypeError(f"{name!r} is not an exported global")
    return exported
