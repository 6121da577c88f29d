"""Putting an instance of a pre-initialised module back into the state of a new one.

An evaluation on a pre-initialised module changes only its linear memory and its mutable globals:
its tables cannot change (kwserver/runtime/preinit.py refuses modules with instructions that write
them, or that touch data and element segments). So a new instance is not needed to start the next
evaluation from scratch: copying back the pages the evaluation wrote, from an untouched instance of
the module (its `template`, whose pages are the module's copy-on-write image, never written), and
resetting the globals gives exactly the state a new instance would have, for ~12 µs instead of the
~50 µs that a new store, instance, first call's page faults and teardown add to an evaluation
(bench/mode_costs.py), and with only the pages the guest really uses resident.

The written pages are found with Linux's PAGEMAP_SCAN ioctl (Linux >= 6.7): pages present in the
memory that are neither the image's file pages nor the shared zero page. Without it, or when the
guest grew its memory, a new instance is made as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

import wasmtime

from kwserver.runtime import fastcall

PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)
PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_PFNZERO = 1 << 2, 1 << 3, 1 << 5
MAX_RANGES = 256


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages", "category_inverted",
        "category_mask", "category_anyof_mask", "return_mask")]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class _Scanner:
    """Written pages of a range of this process's memory. One per process: /proc/self is the opener's."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.ranges = (_Range * MAX_RANGES)()
        self.arg = _ScanArg(size=ctypes.sizeof(_ScanArg), vec=ctypes.addressof(self.ranges), vec_len=MAX_RANGES,
                            category_inverted=PAGE_IS_FILE | PAGE_IS_PFNZERO,
                            category_mask=PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO)
        self.ioctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).ioctl
        self.ref = ctypes.byref(self.arg)

    def written(self, start: int, end: int) -> list[tuple[int, int]] | None:
        """Address ranges of the written pages in [start, end); None when the scan failed or had more
        ranges than it holds."""
        arg = self.arg
        arg.start, arg.end, arg.walk_end = start, end, 0
        count = self.ioctl(self.fd, PAGEMAP_SCAN, self.ref)
        if count < 0 or arg.walk_end != end:
            return None
        ranges = self.ranges
        return [(ranges[i].start, ranges[i].end) for i in range(count)]


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
        except (OSError, AttributeError):
            _unavailable = True
            _scanner = None
    return _scanner


class Pristine:
    """An untouched instance of a pre-initialised module (in this process), to restore others from."""

    def __init__(self, module: Any, limits: object):
        # module: a kwserver.runtime.wapc.WapcModule (not imported: wapc imports this module)
        self.pid = os.getpid()
        self.template = module.instantiate(limits, label="template")
        store, memory = self.template.store, self.template.memory
        self.size = memory.size
        self.address = memory.address(self.size)
        self.globals = [(name, fastcall.global_get(store, _global(store, self.template, name)))
                        for name in module.snapshot_globals]

    def restore(self, instance: Any) -> bool:
        """Put `instance` back into the state of a new instance; False when it cannot be."""
        scan = scanner()
        memory = instance.memory
        if scan is None or instance.broken or memory.size != self.size:
            return False
        base = memory.address(self.size)
        written = scan.written(base, base + self.size)
        if written is None:
            return False
        source = self.address - base
        for start, end in written:
            ctypes.memmove(start, start + source, end - start)
        store = instance.store
        if instance.snapshot_globals is None:
            instance.snapshot_globals = [_global(store, instance, name) for name, _ in self.globals]
        for global_, (_, value) in zip(instance.snapshot_globals, self.globals, strict=True):
            fastcall.global_set(store, global_, value)
        return True


def _global(store: wasmtime.Store, instance: Any, name: bytes) -> wasmtime.Global:
    exported = fastcall.export(store, instance.instance, name)
    if not isinstance(exported, wasmtime.Global):
        raise TypeError(f"{name!r} is not an exported global")
    return exported
