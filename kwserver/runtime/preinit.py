"""Pre-initialised modules: a guest's start-up run once, at boot, and kept as its initial state.

A waPC guest runs `_start` (TinyGo) and `wapc_init` in every new instance before it can answer; that
state (its heap, its registered functions, its globals) does not depend on the policy, the request or
the settings. So, as Wizer does, the master runs the start-up once in an instrumented copy of the
module (every mutable global exported), reads the globals and the linear memory it left, and writes a
new module whose data segments and global initialisers are that state, with no start function. Its
instances begin where the start-up ended; wasmtime maps that memory copy-on-write from one image.
The new module exports `kwserver:preinitialised`, which tells the runtime not to run the start-up.

Only what is safe to snapshot is: a module is left as it is (plain instantiation) when it imports
its memory, globals or tables, has more than one memory or a shared/64-bit one, keeps passive data
segments, uses instructions that change tables or data segments (a snapshot holds memory and globals
only), holds a mutable global that is not a number, or when its start-up calls the host
(`__host_call`: per-policy capabilities) or fails. What the start-up read from the clocks and the
random source is frozen into the snapshot: every instance of the module starts with the same seed (a
reused instance does too).
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import wasmtime

from kwserver.metadata import uleb128

if TYPE_CHECKING:
    from kwserver.runtime.engine import CompileCache

log = logging.getLogger(__name__)

PREINITIALISED_EXPORT = "kwserver:preinitialised"
GLOBAL_EXPORT = "kwserver:global:"
# Part of the cache key of snapshots: bump when the snapshot changes for the same input.
FORMAT_VERSION = 2

I32, I64, F32, F64 = 0x7F, 0x7E, 0x7D, 0x7C
_CONST_OPCODE = {I32: 0x41, I64: 0x42, F32: 0x43, F64: 0x44}
SECTION_TYPE, SECTION_IMPORT, SECTION_FUNCTION, SECTION_TABLE, SECTION_MEMORY = 1, 2, 3, 4, 5
SECTION_GLOBAL, SECTION_EXPORT, SECTION_START, SECTION_ELEMENT, SECTION_CODE = 6, 7, 8, 9, 10
SECTION_DATA, SECTION_DATA_COUNT, SECTION_TAG = 11, 12, 13
# Where each known section goes (custom sections, id 0, stay where they are).
_ORDER = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 13: 6, 6: 7, 7: 8, 8: 9, 9: 10, 12: 11, 10: 12, 11: 13}
EXPORT_FUNC, EXPORT_TABLE, EXPORT_MEMORY, EXPORT_GLOBAL = 0, 1, 2, 3
WASM_PAGE = 65536
# Zero runs shorter than this stay inside a data segment (fewer, larger segments).
_SEGMENT = re.compile(rb"[^\x00]+(?:\x00{1,64}[^\x00]+)*")


class NotPreinitialisable(Exception):
    """Why a module is left to plain instantiation."""


# --- reading the binary format ---------------------------------------------------------------------

class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def leb(self) -> int:
        """An unsigned LEB128 number."""
        result = shift = 0
        while True:
            value = self.data[self.pos]
            self.pos += 1
            result |= (value & 0x7F) << shift
            if value < 0x80:
                return result
            shift += 7

    def skip_leb(self) -> None:
        while self.data[self.pos] & 0x80:
            self.pos += 1
        self.pos += 1

    def take(self, count: int) -> bytes:
        value = self.data[self.pos:self.pos + count]
        if len(value) != count:
            raise NotPreinitialisable("truncated module")
        self.pos += count
        return value

    def name(self) -> bytes:
        return self.take(self.leb())

    def valtype(self) -> int:
        kind = self.byte()
        if kind in (0x63, 0x64):  # (ref null? heaptype)
            self.skip_leb()
        return kind

    def limits(self) -> tuple[int, int, int | None]:
        """(flags, minimum, maximum)."""
        flags = self.byte()
        minimum = self.leb()
        maximum = self.leb() if flags & 1 else None
        if flags & 8:  # custom page size
            self.skip_leb()
        return flags, minimum, maximum

    def const_expr(self) -> bytes:
        start = self.pos
        _scan(self, stop_at_end=True)
        return self.data[start:self.pos]


def _sleb(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if (value == 0 and not low & 0x40) or (value == -1 and low & 0x40):
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _vec(items: list[bytes]) -> bytes:
    return uleb128(len(items)) + b"".join(items)


def _section(section_id: int, payload: bytes) -> bytes:
    return bytes([section_id]) + uleb128(len(payload)) + payload


# Instructions by immediate: what the code scan needs to step over them. Anything not listed is
# refused (exceptions, GC, atomics, future proposals): a module using it is not pre-initialised.
_PLAIN = {0x00, 0x01, 0x05, 0x0B, 0x0F, 0x1A, 0x1B, 0xD1, 0xD3, 0xD5, *range(0x45, 0xC5)}
_ONE_INDEX = {0x0C, 0x0D, 0x10, 0x12, 0x14, 0x15, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x3F, 0x40,
              0x41, 0x42, 0xD0, 0xD2, 0xD4, 0xD6}
_TWO_INDICES = {0x11, 0x13}
_MEMARG = set(range(0x28, 0x3F))
_BLOCKS = {0x02, 0x03, 0x04}
_TABLE_WRITES = {0x26}
# 0xFC prefix: sub-opcode -> (indices, what it changes: None, "table" or "data")
_MISC = {**{n: (0, None) for n in range(8)}, 8: (2, "data"), 9: (1, "data"), 10: (2, None), 11: (1, None),
         12: (2, "table"), 13: (1, "table"), 14: (2, "table"), 15: (1, "table"), 16: (1, None), 17: (1, "table")}
_SIMD_MEMARG = set(range(0, 12)) | {92, 93}
_SIMD_MEMARG_LANE = set(range(84, 92))
_SIMD_LANE = set(range(21, 35))
_SIMD_BYTES16 = {12, 13}
_SIMD_LAST = 0x113


def _memarg(reader: _Reader) -> None:
    if reader.leb() & 0x40:  # multi-memory: a memory index follows the alignment
        reader.skip_leb()
    reader.skip_leb()


def _scan(reader: _Reader, end: int | None = None, stop_at_end: bool = False) -> None:
    """Step over instructions (to `end`, or the `end` of a constant expression), refusing what a
    snapshot cannot hold."""
    data = reader.data
    while end is None or reader.pos < end:
        op = data[reader.pos]
        reader.pos += 1
        if op in _PLAIN:
            if stop_at_end and op == 0x0B:
                return
        elif op in _ONE_INDEX:
            if op in _TABLE_WRITES:
                raise NotPreinitialisable("it writes to tables (table.set)")
            reader.skip_leb()
        elif op in _MEMARG:
            _memarg(reader)
        elif op in _BLOCKS:
            kind = data[reader.pos]
            if kind in (0x63, 0x64):
                reader.pos += 1
            reader.skip_leb()  # empty, a value type or a type index: one (signed) LEB either way
        elif op in _TWO_INDICES:
            reader.skip_leb()
            reader.skip_leb()
        elif op == 0x0E:  # br_table
            for _ in range(reader.leb() + 1):
                reader.skip_leb()
        elif op == 0x1C:  # select t*
            for _ in range(reader.leb()):
                reader.valtype()
        elif op == 0x43:
            reader.pos += 4
        elif op == 0x44:
            reader.pos += 8
        elif op == 0xFC:
            indices, writes = _MISC.get(reader.leb(), (-1, None))
            if indices < 0:
                raise NotPreinitialisable("it uses an instruction this snapshot does not know")
            if writes:
                raise NotPreinitialisable(f"it changes {writes} segments or tables at run time")
            for _ in range(indices):
                reader.skip_leb()
        elif op == 0xFD:
            sub = reader.leb()
            if sub in _SIMD_MEMARG:
                _memarg(reader)
            elif sub in _SIMD_MEMARG_LANE:
                _memarg(reader)
                reader.pos += 1
            elif sub in _SIMD_LANE:
                reader.pos += 1
            elif sub in _SIMD_BYTES16:
                reader.pos += 16
            elif sub > _SIMD_LAST:
                raise NotPreinitialisable("it uses an instruction this snapshot does not know")
        else:
            raise NotPreinitialisable(f"it uses an instruction this snapshot does not know (0x{op:02x})")


@dataclass
class _Global:
    valtype: int
    mutable: bool
    init: bytes  # the constant expression, `end` included


@dataclass
class ModuleLayout:
    """What a snapshot needs to know about a module; anything it cannot snapshot is refused."""

    sections: list[tuple[int, bytes]]
    memory_limits: bytes  # the memory's limits, as declared
    globals: list[_Global]
    exports: list[tuple[bytes, int, int]]


def _sections(wasm: bytes) -> Iterator[tuple[int, bytes]]:
    if wasm[:8] != b"\0asm\x01\0\0\0":
        raise NotPreinitialisable("not a core WebAssembly module")
    reader = _Reader(wasm, 8)
    while reader.pos < len(wasm):
        section_id = reader.byte()
        yield section_id, reader.take(reader.leb())


def parse(wasm: bytes) -> ModuleLayout:
    """Read the module; raises NotPreinitialisable for anything a snapshot cannot hold."""
    sections = list(_sections(wasm))
    memory_limits = b""
    memories = 0
    globals_: list[_Global] = []
    exports: list[tuple[bytes, int, int]] = []
    for section_id, payload in sections:
        reader = _Reader(payload)
        if section_id == SECTION_IMPORT:
            for _ in range(reader.leb()):
                reader.name(), reader.name()
                kind = reader.byte()
                if kind == 0:
                    reader.skip_leb()
                elif kind == 2:
                    raise NotPreinitialisable("it imports its memory")
                elif kind == 3:
                    raise NotPreinitialisable("it imports globals")
                else:
                    raise NotPreinitialisable("it imports tables or tags")
        elif section_id == SECTION_MEMORY:
            for _ in range(reader.leb()):
                start = reader.pos
                _check_memory(reader.limits())
                memory_limits = payload[start:reader.pos]
                memories += 1
        elif section_id == SECTION_GLOBAL:
            for _ in range(reader.leb()):
                valtype, mutable = reader.valtype(), reader.byte() == 1
                if mutable and valtype not in _CONST_OPCODE:
                    raise NotPreinitialisable("it has a mutable global that is not a number")
                globals_.append(_Global(valtype, mutable, reader.const_expr()))
        elif section_id == SECTION_EXPORT:
            for _ in range(reader.leb()):
                exports.append((reader.name(), reader.byte(), reader.leb()))
        elif section_id == SECTION_DATA:
            for _ in range(reader.leb()):
                flags = reader.leb()
                if flags == 1:
                    raise NotPreinitialisable("it has passive data segments")
                if flags == 2:
                    reader.skip_leb()
                reader.const_expr()
                reader.take(reader.leb())
        elif section_id == SECTION_CODE:
            for _ in range(reader.leb()):
                size = reader.leb()
                end = reader.pos + size
                for _ in range(reader.leb()):  # local declarations
                    reader.skip_leb()
                    reader.valtype()
                _scan(reader, end)
        elif section_id == SECTION_TAG:
            raise NotPreinitialisable("it uses exceptions")
    if memories != 1:
        raise NotPreinitialisable(f"it has {memories} memories (one is needed)")
    return ModuleLayout(sections, memory_limits, globals_, exports)


def _check_memory(limits: tuple[int, int, int | None]) -> None:
    if limits[0] & ~1:
        raise NotPreinitialisable("its memory is shared, 64-bit or has custom pages")


# --- writing ---------------------------------------------------------------------------------------

def _export(name: bytes, kind: int, index: int) -> bytes:
    return uleb128(len(name)) + name + bytes([kind]) + uleb128(index)


def _rewrite(layout: ModuleLayout, replace: dict[int, bytes | None]) -> bytes:
    """The module with some known sections replaced (None: dropped), inserted where absent."""
    pending = dict(replace)
    out = [b"\0asm\x01\0\0\0"]

    def flush(before: int | None) -> None:
        for section_id in sorted(pending, key=_ORDER.__getitem__):
            if before is None or _ORDER[section_id] < before:
                payload = pending.pop(section_id)
                if payload is not None:
                    out.append(_section(section_id, payload))

    for section_id, payload in layout.sections:
        if section_id in _ORDER:
            flush(_ORDER[section_id])
            if section_id in pending:
                payload = pending.pop(section_id)
                if payload is None:
                    continue
        out.append(_section(section_id, payload))
    flush(None)
    return b"".join(out)


def _exports(layout: ModuleLayout, extra: list[bytes]) -> bytes:
    return _vec([_export(*e) for e in layout.exports] + extra)


def _global_exports(layout: ModuleLayout) -> list[bytes]:
    return [_export(f"{GLOBAL_EXPORT}{i}".encode(), EXPORT_GLOBAL, i)
            for i, global_ in enumerate(layout.globals) if global_.mutable]


def instrument(layout: ModuleLayout) -> bytes:
    """The module with every mutable global exported, for the start-up run."""
    return _rewrite(layout, {SECTION_EXPORT: _exports(layout, _global_exports(layout))})


@dataclass(frozen=True)
class State:
    """What a start-up left: the linear memory and the values of the mutable globals (by index)."""

    memory: bytes
    globals: dict[int, int | float]


def _const(valtype: int, value: int | float) -> bytes:
    if valtype == I32:
        immediate = _sleb(((int(value) + (1 << 31)) % (1 << 32)) - (1 << 31))
    elif valtype == I64:
        immediate = _sleb(((int(value) + (1 << 63)) % (1 << 64)) - (1 << 63))
    else:
        if math.isnan(value):
            raise NotPreinitialisable("a global holds NaN")
        immediate = struct.pack("<f" if valtype == F32 else "<d", value)
    return bytes([_CONST_OPCODE[valtype]]) + immediate + b"\x0b"


def _segments(memory: bytes) -> list[bytes]:
    segments = []
    for match in _SEGMENT.finditer(memory):
        offset = match.start()
        signed = offset - (1 << 32) if offset >= 1 << 31 else offset
        segments.append(b"\x00\x41" + _sleb(signed) + b"\x0b" + uleb128(len(match.group())) + match.group())
    return segments


def snapshot(layout: ModuleLayout, state: State) -> bytes:
    """The module whose initial state is `state`: same code, same exports (plus the marker and its
    mutable globals, which kwserver/runtime/pristine.py resets), its memory defined with `state`'s
    contents as data, globals initialised to their values, and no start function (it ran)."""
    pages = (len(state.memory) + WASM_PAGE - 1) // WASM_PAGE
    flags, _, maximum = _Reader(layout.memory_limits).limits()
    limits = bytes([flags]) + uleb128(pages) + (uleb128(maximum) if maximum is not None else b"")
    globals_ = [
        bytes([g.valtype, int(g.mutable)]) + (_const(g.valtype, state.globals[i]) if g.mutable else g.init)
        for i, g in enumerate(layout.globals)
    ]
    extra = [_export(PREINITIALISED_EXPORT.encode(), EXPORT_MEMORY, 0), *_global_exports(layout)]
    replace: dict[int, bytes | None] = {
        SECTION_MEMORY: _vec([limits]),
        SECTION_EXPORT: _exports(layout, extra),
        SECTION_START: None,
        SECTION_DATA_COUNT: None,
        SECTION_DATA: _vec(_segments(state.memory)),
    }
    if layout.globals:
        replace[SECTION_GLOBAL] = _vec(globals_)
    return _rewrite(layout, replace)


def preinitialise(wasm: bytes, run: Callable[[bytes], State]) -> bytes:
    """The pre-initialised module of `wasm`, given `run`, which instantiates an instrumented module,
    runs its start-up and returns the state it left. Raises NotPreinitialisable."""
    layout = parse(wasm)
    state = run(instrument(layout))
    return snapshot(layout, state)


# --- running a start-up ----------------------------------------------------------------------------

# A start-up that takes longer is not pre-initialised (the policy's own timeout applies at first use).
STARTUP_TIMEOUT_SECONDS = 10


Startup = Callable[[wasmtime.Engine, bool, int], Callable[[bytes], State]]
"""(scratch engine, epoch interruption, memory limit) -> a runner: instrumented module -> the state its
start-up left. Each runtime with a start-up to skip has one (kwserver.runtime.wapc.startup)."""


def load(engine: wasmtime.Engine, cache: CompileCache, wasm: bytes, digest: str, startup: Startup,
         memory_bytes: int, scratch: wasmtime.Engine) -> tuple[wasmtime.Module, int] | None:
    """The pre-initialised module of `wasm` compiled for `engine` (from the compile cache, or made and
    cached; the start-up runs on `scratch`), or None when the module cannot be pre-initialised safely."""

    def build() -> bytes | None:
        try:
            return preinitialise(wasm, startup(scratch, cache.options.epoch_interruption, memory_bytes))
        except NotPreinitialisable as exc:
            log.info("module %s is instantiated without pre-initialisation: %s", digest[:12], exc)
            return None

    return cache.load_derived(engine, f"{digest}-preinit{FORMAT_VERSION}-{memory_bytes >> 20}m", build)
