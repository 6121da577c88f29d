"""Rego policies compiled to Wasm by OPA: the `opa` and `gatekeeper` execution modes.

OPA modules *import* their linear memory (`env.memory`), so an `InstancePre` cannot be built once
per module: the memory has to be created in each instance's store. `OpaModule` therefore keeps one
`Linker` with the host functions and, under a lock, redefines `env.memory` with the new store's
memory just before instantiating (the cheapest public-API way measured: ~60 µs against ~85 µs for
a new Linker or an import list per instance; see bench/mode_costs.py).

An `OpaInstance` is reused across evaluations, as OPA's own SDKs do: the initial heap pointer is
recorded once, the data document is pushed once and kept while it does not change, and every
evaluation starts by resetting the heap pointer to just after the data. `opa_heap_ptr_set` also
clears the allocator's free lists and the builtin cache (compiled regexes...), so no evaluation sees
another's values and the memory stays flat. Modules with ABI >= 1.2 are evaluated with the one-shot
`opa_eval` export (one call into wasm); older ones with the eval-context exports. Those calls and
the host imports go through `kwserver.runtime.fastcall` (all-i32 ABI): ~26-45 µs per evaluation of
the conformance policies instead of ~65-170 µs through wasmtime-py's public call path.

Host imports: `opa_abort` really aborts (the reference only logs it), `opa_println` logs, and
`opa_builtin0..4` dispatch to `kwserver.runtime.opa_builtins` by the id→name map of `builtins()`.
Any failure (abort, builtin error, trap, deadline) marks the instance broken so it is discarded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import orjson
import wasmtime

from kwserver.runtime import (
    GUEST_FAILURES,
    GuestCallFailure,
    GuestTimeout,
    InstanceLimits,
    InstantiationFailure,
    arm_deadline,
    classify_failure,
    current_guest,
    failure_reason,
    fastcall,
    new_store,
    opa_builtins,
    running,
    set_store_limits,
)
from kwserver.runtime.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

ENV = "env"
PAGE = 65536
MIN_PAGES = 5
SUPPORTED_ABI_MAJOR = 1

_MEMORY_EXPORTS = ("opa_malloc", "opa_json_parse", "opa_json_dump", "opa_heap_ptr_get", "opa_heap_ptr_set")
_FAST_PATH_EXPORTS = (*_MEMORY_EXPORTS, "opa_eval")  # ABI >= 1.2: one call per evaluation
_CONTEXT_EXPORTS = (*_MEMORY_EXPORTS, "opa_eval_ctx_new", "opa_eval_ctx_set_input", "opa_eval_ctx_set_data",
                    "opa_eval_ctx_set_entrypoint", "opa_eval_ctx_get_result", "eval")
_REQUIRED_EXPORTS = (
    "opa_malloc", "opa_json_parse", "opa_json_dump", "opa_heap_ptr_get", "opa_heap_ptr_set",
    "opa_eval_ctx_new", "opa_eval_ctx_set_input", "opa_eval_ctx_set_data", "opa_eval_ctx_set_entrypoint",
    "opa_eval_ctx_get_result", "eval", "builtins", "entrypoints",
)


class RegoEvaluationError(GuestCallFailure):
    """The evaluation failed: opa_abort, a builtin error, a trap or an unusable result."""


class _Abort(Exception):
    """Raised by the `opa_abort` import to unwind the guest."""



# --- host functions (module "env") -----------------------------------------------------------------

def _guest_message(addr: int, what: str) -> str:
    try:
        return current_guest().memory.read_cstring(addr).decode("utf-8", "replace")
    except GuestMemoryError as exc:
        return f"cannot decode {what} message: {exc}"


def _opa_abort(addr: int) -> None:
    message = _guest_message(addr, "opa_abort")
    log.error("policy %s: opa_abort: %s", current_guest().label, message)
    raise _Abort(message)


def _opa_println(addr: int) -> None:
    log.info("policy %s: %s", current_guest().label, _guest_message(addr, "opa_println"))


def _dispatch(builtin_id: int, _ctx: int, *args: int) -> int:
    guest: OpaInstance = current_guest()
    try:
        name, implementation = guest.module.builtin_table[builtin_id]
    except KeyError:
        raise opa_builtins.BuiltinError(f"opa_builtin{len(args)}: cannot find builtin {builtin_id}") from None
    values = [orjson.loads(guest.dump(addr)) for addr in args]
    try:
        result = implementation(*values)
    except opa_builtins.BuiltinError:
        raise
    except Exception as exc:  # a bug or an unexpected operand: the evaluation fails, the worker lives
        raise opa_builtins.BuiltinError(f"{name}: {exc}") from exc
    return guest.push(_to_json(result))


def _to_json(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # integers past 64 bits
        import json

        return json.dumps(value).encode()


def _builtin_n(count: int) -> Any:
    def builtin(builtin_id: int, ctx: int, *args: int) -> int:
        return _dispatch(builtin_id, ctx, *args)

    builtin.__name__ = f"opa_builtin{count}"
    return builtin


_HOST_FUNCTIONS = {
    "opa_abort": _opa_abort,
    "opa_println": _opa_println,
    **{f"opa_builtin{n}": _builtin_n(n) for n in range(5)},
}


@dataclass(frozen=True)
class RegoModuleInfo:
    """What a module says about itself (read once per module)."""

    abi_version: tuple[int, int]
    builtins: dict[str, int]
    entrypoints: dict[str, int]

    def entrypoint_name(self, entrypoint_id: int) -> str | None:
        return next((name for name, i in self.entrypoints.items() if i == entrypoint_id), None)


class OpaModule:
    """A compiled OPA module linked with the host imports; makes reusable `OpaInstance`s."""

    def __init__(self, engine: wasmtime.Engine, module: wasmtime.Module, *, epoch_interruption: bool):
        self.engine = engine
        self.module = module
        self.epoch_interruption = epoch_interruption
        self.memory_type = self._memory_type(module)
        self.linker = wasmtime.Linker(engine)
        self.linker.allow_shadowing = True
        for item in module.imports:
            if isinstance(item.type, wasmtime.FuncType):
                # The import's own type (a FuncType belongs to the first engine it is used with).
                fastcall.define(self.linker, ENV, item.name, item.type, _HOST_FUNCTIONS[item.name])
        self._link_lock = threading.Lock()
        exports = {e.name for e in module.exports}
        absent = [name for name in _REQUIRED_EXPORTS if name not in exports]
        if absent:
            raise InstantiationFailure(f"not an OPA Wasm module: missing export(s) {', '.join(absent)}")
        self.info = self._inspect()
        if self.info.abi_version[0] != SUPPORTED_ABI_MAJOR:
            raise InstantiationFailure(
                f"unsupported OPA Wasm ABI version {self.info.abi_version[0]}.{self.info.abi_version[1]}"
            )
        missing = opa_builtins.missing(sorted(self.info.builtins))
        if missing:
            raise InstantiationFailure(f"Missing Rego builtins: {', '.join(missing)}")
        self.builtin_table = {
            builtin_id: (name, opa_builtins.lookup(name)) for name, builtin_id in self.info.builtins.items()
        }
        self.fast_path = self.info.abi_version >= (1, 2) and "opa_eval" in exports

    @staticmethod
    def _memory_type(module: wasmtime.Module) -> wasmtime.MemoryType:
        memory = None
        for item in module.imports:
            if isinstance(item.type, wasmtime.MemoryType) and (item.module, item.name) == (ENV, "memory"):
                memory = item.type
            elif isinstance(item.type, wasmtime.FuncType) and item.module == ENV and item.name in _HOST_FUNCTIONS:
                continue
            else:
                raise InstantiationFailure(f"not an OPA Wasm module: unsupported import {item.module}.{item.name}")
        if memory is None:
            raise InstantiationFailure("not an OPA Wasm module: it does not import env.memory")
        limits = memory.limits
        minimum = max(MIN_PAGES, limits.min)
        if limits.max is not None and limits.max < minimum:
            minimum = limits.min
        return wasmtime.MemoryType(wasmtime.Limits(minimum, limits.max))

    def _inspect(self) -> RegoModuleInfo:
        probe = OpaInstance(self, InstanceLimits(memory_bytes=1 << 30, timeout_seconds=None), "inspect")
        try:
            return RegoModuleInfo(probe.abi_version(), probe.read_map("builtins"), probe.read_map("entrypoints"))
        finally:
            probe.close()

    def entrypoint_id(self, name: str | None) -> int:
        """The id of an entrypoint given by name (None: the default, 0)."""
        if name is None:
            return 0
        if name in self.info.entrypoints:
            return self.info.entrypoints[name]
        available = ", ".join(sorted(self.info.entrypoints)) or "none"
        raise InstantiationFailure(f"entrypoint `{name}` not found in the module (available: {available})")

    def instantiate(self, limits: InstanceLimits, host_call: Any = None, label: str = "guest") -> OpaInstance:
        return OpaInstance(self, limits, label)

    def new_instance(self, store: wasmtime.Store) -> tuple[wasmtime.Instance, wasmtime.Memory]:
        memory = wasmtime.Memory(store, self.memory_type)
        with self._link_lock:  # the linker is shared: define this store's memory, instantiate
            self.linker.define(store, ENV, "memory", memory)
            instance = self.linker.instantiate(store, self.module)
        return instance, memory


class OpaInstance:
    """One live OPA module in its own store, reused across evaluations. One call at a time."""

    __slots__ = (
        "_base_heap",
        "_ctx_new",
        "_data",
        "_data_addr",
        "_data_heap",
        "_dump",
        "_eval",
        "_get_result",
        "_heap_get",
        "_heap_set",
        "_json_parse",
        "_malloc",
        "_opa_eval",
        "_set_data",
        "_set_entrypoint",
        "_set_input",
        "broken",
        "exports",
        "label",
        "limits",
        "memory",
        "module",
        "store",
    )

    def __init__(self, module: OpaModule, limits: InstanceLimits, label: str):
        self.module = module
        self.limits = limits
        self.label = label
        self.broken = False
        self.store = new_store(module.engine, limits)
        self._arm_deadline()
        try:
            instance, memory = module.new_instance(self.store)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            self.store.close()
            raise InstantiationFailure(failure_reason(exc)) from exc
        self.memory = GuestMemory(self.store, memory)
        self.exports = exports = instance.exports(self.store)
        fast_path = getattr(module, "fast_path", False)
        hot = _FAST_PATH_EXPORTS if fast_path else _CONTEXT_EXPORTS
        try:  # the calls made on every evaluation go through the ctypes fast path (all-i32 ABI)
            call = {name: fastcall.I32Call(self.store, exports[name]) for name in hot}
        except TypeError as exc:
            self.store.close()
            raise InstantiationFailure(f"not an OPA Wasm module: {exc}") from exc
        self._malloc = call["opa_malloc"]
        self._json_parse = call["opa_json_parse"]
        self._dump = call["opa_json_dump"]
        self._heap_get = call["opa_heap_ptr_get"]
        self._heap_set = call["opa_heap_ptr_set"]
        self._ctx_new = call.get("opa_eval_ctx_new")
        self._set_input = call.get("opa_eval_ctx_set_input")
        self._set_data = call.get("opa_eval_ctx_set_data")
        self._set_entrypoint = call.get("opa_eval_ctx_set_entrypoint")
        self._get_result = call.get("opa_eval_ctx_get_result")
        self._eval = call.get("eval")
        self._opa_eval = call.get("opa_eval")
        self._data: bytes | None = None
        self._data_addr = self._data_heap = 0
        try:
            with running(self):
                self._base_heap = self._heap_get()
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            self.store.close()
            raise InstantiationFailure(failure_reason(exc)) from exc

    def _arm_deadline(self) -> None:
        arm_deadline(self.store, self.limits, self.module.epoch_interruption)

    # --- memory helpers (also used by the builtin dispatcher, inside an evaluation) ---

    def push(self, data: bytes) -> int:
        """Copy JSON text into the guest and parse it; the address of the parsed value."""
        addr = self._malloc(len(data))
        self.memory.write(addr, data)
        value = self._json_parse(addr, len(data))
        if value == 0:
            raise RegoEvaluationError("Failed to load json in memory")
        return value

    def dump(self, value_addr: int) -> bytes:
        return self.memory.read_cstring(self._dump(value_addr))

    def _ensure_memory(self, end: int) -> None:
        size = self.memory.size
        if end > size:
            pages = (end - size + PAGE - 1) // PAGE
            try:
                self.memory.memory.grow(self.store, pages)
            except wasmtime.WasmtimeError as exc:
                raise RegoEvaluationError(f"the input does not fit in the policy's memory: {exc}") from exc

    def abi_version(self) -> tuple[int, int]:
        major = self.exports.get("opa_wasm_abi_version")
        minor = self.exports.get("opa_wasm_abi_minor_version")
        if not isinstance(major, wasmtime.Global):
            return (1, 0)  # modules built before OPA 0.27 carry no version: ABI 1.0
        return major.value(self.store), minor.value(self.store) if isinstance(minor, wasmtime.Global) else 0

    def read_map(self, export: str) -> dict[str, int]:
        with running(self):
            raw = self.dump(self.exports[export](self.store))
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InstantiationFailure(f"OPA {export} is not JSON: {exc}") from exc
        if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
            raise InstantiationFailure(f"OPA {export} didn't return a dictionary")
        return value

    # --- evaluation ---

    def evaluate(self, entrypoint: int, input_json: bytes, data_json: bytes = b"{}") -> bytes:
        """Evaluate an entrypoint; the JSON result set (`[{"result": ...}]`) as bytes.

        Raises GuestTimeout when the deadline passes and RegoEvaluationError for anything else.
        """
        if self.broken:
            raise RegoEvaluationError("the policy instance is unusable after a previous failure")
        self._arm_deadline()
        try:
            with running(self):
                if data_json is not self._data and data_json != self._data:
                    self._heap_set(self._base_heap)
                    self._data = None
                    self._data_addr = self.push(data_json)
                    self._data_heap = self._heap_get()
                    self._data = data_json
                if self._opa_eval is not None:
                    addr = self._data_heap
                    end = addr + len(input_json)
                    self._ensure_memory(end)
                    self.memory.write(addr, input_json)
                    result = self._opa_eval(0, entrypoint, self._data_addr, addr, len(input_json), end, 0)
                    return self.memory.read_cstring(result)
                self._heap_set(self._data_heap)
                input_addr = self.push(input_json)
                ctx = self._ctx_new()
                self._set_input(ctx, input_addr)
                self._set_data(ctx, self._data_addr)
                self._set_entrypoint(ctx, entrypoint)
                self._eval(ctx)
                return self.dump(self._get_result(ctx))
        except _Abort as exc:
            self.broken = True
            raise RegoEvaluationError(f"opa_abort: {exc}") from exc
        except opa_builtins.BuiltinError as exc:
            self.broken = True
            raise RegoEvaluationError(f"builtin error: {exc}") from exc
        except RegoEvaluationError:
            self.broken = True
            raise
        except (*GUEST_FAILURES, ValueError) as exc:  # ValueError: a result that is not JSON
            self.broken = True
            failure = classify_failure(exc)
            if isinstance(failure, GuestTimeout):
                raise failure from exc
            raise RegoEvaluationError(str(failure)) from exc

    def evaluate_value(self, entrypoint: int, input_value: Any, data_value: Any = None) -> Any:
        """`evaluate` on Python values (a convenience for tools and tests)."""
        data = b"{}" if data_value is None else orjson.dumps(data_value)
        return orjson.loads(self.evaluate(entrypoint, orjson.dumps(input_value), data))

    def call(self, operation: str, payload: bytes) -> bytes:
        """The Kubewarden protocol view: settings of Rego policies are always valid, as in the reference."""
        if operation == "validate_settings":
            return b'{"valid":true}'
        raise GuestCallFailure(f"operation `{operation}` is not supported by OPA policies; use evaluate()")

    @property
    def memory_size(self) -> int:
        return self.memory.size

    def bind(self, limits: InstanceLimits, host_call: Any, label: str) -> None:
        # The policy's data (its settings) is passed with every evaluation: nothing else to switch.
        set_store_limits(self.store, self.limits, limits)
        self.limits, self.label = limits, label

    def close(self) -> None:
        self.store.close()


def load(engine: wasmtime.Engine, wasm: bytes, *, epoch_interruption: bool = False) -> OpaModule:
    """Compile and link OPA Wasm bytes (for tools and tests; the server compiles at boot)."""
    return OpaModule(engine, wasmtime.Module(engine, wasm), epoch_interruption=epoch_interruption)
