"""wasmtime's pooling instance allocator, configured through its C API.

With the pooling allocator an engine reserves, once, the address space of a fixed number of instance
slots (each with its linear memory, table and vmctx); instantiating takes a free slot instead of
mapping new memory, and a slot keeps the copy-on-write image of the module it last served, so a
fresh instance of a warm module costs microseconds (bench/mode_costs.py). wasmtime-py's `Config`
has no setters for it, so they are called through its ctypes bindings (wasmtime is pinned exactly in
pyproject.toml). When the bindings lack them, or the address space cannot be reserved (`ulimit -v`,
strict overcommit), the engine falls back to wasmtime's default on-demand allocator.

Slots are reserved address space, not memory: each slot spans wasmtime's default 4 GiB memory
reservation (guard included), so 64 slots show as ~260 GiB of VMS and no RSS. The engine is created
in the master before the fork; every worker inherits the reservation and its free list as it was at
fork time (no instance is alive then), so each worker has a pool of its own.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass

import wasmtime

log = logging.getLogger(__name__)

# Instances a process may have alive besides the ones kept idle: the evaluation in progress, the
# boot checks, a few for concurrent callers (tests, tools).
LIVE_INSTANCES = 8
MIN_SLOTS = 16
MAX_SLOTS = 4096
# The largest table a module may declare (Go programs have tables of tens of thousands of functions);
# reserved address space only: 8 bytes per element per slot.
TABLE_ELEMENTS = 1 << 17
TABLES_PER_MODULE = 4
# wasmtime's default memory reservation on 64-bit hosts, guard included, and what else a slot reserves
# (vmctx, tables): the address space a pool needs is about slots x this.
SLOT_RESERVATION = (4 << 30) + (32 << 20) + (1 << 20) + TABLES_PER_MODULE * TABLE_ELEMENTS * 8
# A 32-bit linear memory never exceeds 4 GiB, and wasmtime refuses a pool whose memories may grow
# past their reservation (by aborting the process, through the C API).
MAX_MEMORY_BYTES = 4 << 30


@dataclass(frozen=True)
class PoolSize:
    """How many instances a process can have at once and how large a linear memory may grow."""

    slots: int
    max_memory_bytes: int

    @classmethod
    def for_policies(cls, policies: int, max_memory_bytes: int) -> PoolSize:
        """Slots for what a worker keeps per policy at most (it evaluates one request at a time): an idle
        instance, and the untouched template that fresh instances are restored from
        (kwserver/runtime/pristine.py); plus the live ones. A slot's memory is the policy memory limit."""
        slots = 2 * policies + LIVE_INSTANCES
        return cls(max(MIN_SLOTS, min(MAX_SLOTS, slots)), min(max_memory_bytes, MAX_MEMORY_BYTES))


def reservable(size: PoolSize) -> bool:
    """Whether this process may reserve the pool's address space (`ulimit -v`). wasmtime's C API aborts
    the process when it cannot, so it is tried here first, with a margin, as a mapping nobody can touch."""
    try:
        probe = mmap.mmap(-1, size.slots * SLOT_RESERVATION * 5 // 4, prot=0,
                          flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    except (OSError, OverflowError, ValueError):
        return False
    probe.close()
    return True


def _bindings() -> object | None:
    try:
        from wasmtime import _bindings as bindings

        bindings.wasmtime_pooling_allocation_config_new  # noqa: B018 - present in wasmtime >= 21
        bindings.wasmtime_pooling_allocation_strategy_set  # noqa: B018
        return bindings
    except (ImportError, AttributeError):
        return None


def configure(config: wasmtime.Config, size: PoolSize) -> bool:
    """Switch `config` to the pooling allocator; False (and `config` unchanged) when this wasmtime-py
    cannot or the address space of the slots cannot be reserved."""
    bindings = _bindings()
    if bindings is None:
        log.warning("wasmtime-py exposes no pooling allocator; instances use the on-demand allocator")
        return False
    if size.max_memory_bytes > MAX_MEMORY_BYTES or not reservable(size):
        log.warning("cannot reserve the address space of %d instance slots (ulimit -v?); instances use the "
                    "on-demand allocator", size.slots)
        return False
    pooling = bindings.wasmtime_pooling_allocation_config_new()
    try:
        for setter, value in (
            ("total_core_instances", size.slots),
            ("total_memories", size.slots),
            ("total_tables", size.slots),
            ("total_stacks", size.slots),
            ("max_memory_size", size.max_memory_bytes),
            ("max_tables_per_module", TABLES_PER_MODULE),
            ("table_elements", TABLE_ELEMENTS),
        ):
            getattr(bindings, f"wasmtime_pooling_allocation_config_{setter}_set")(pooling, value)
        bindings.wasmtime_pooling_allocation_strategy_set(config.ptr(), pooling)
    finally:
        bindings.wasmtime_pooling_allocation_config_delete(pooling)
    return True


def is_exhausted(exc: BaseException) -> bool:
    """The instantiation failed because every slot of the pool is taken."""
    return "concurrent" in str(exc) and "limit" in str(exc)
