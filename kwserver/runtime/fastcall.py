"""A thin ctypes path into wasmtime for the calls made on every evaluation, and for making instances.

wasmtime-py's public `Func.__call__` re-reads the function's type and wraps every value on each
call, and its host-function trampoline builds `Caller` and `Val` objects for every call the guest
makes. For all-i32 signatures (the waPC ABI and most of WASI) none of that is needed; going straight
to wasmtime's C API halves the cost of an evaluation (measured ~100 µs → ~50 µs for a 5 KB pod).
Likewise `Instance.exports` wraps every export of an instance in Python objects (~18 µs for a Rust
policy) where a fresh instance needs two or three of them by name.

This uses wasmtime-py's internal `_ffi` bindings and its pending-exception slot, which is why
wasmtime is pinned to one exact version in pyproject.toml. Everything that is not all-i32 goes
through the public API.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import NoReturn

import wasmtime
from wasmtime import _bindings
from wasmtime import _ffi as ffi
from wasmtime import _func as wasmtime_func

_I32_KIND = ffi.WASMTIME_I32.value
_FUNC_KIND = ffi.WASMTIME_EXTERN_FUNC.value
_MEMORY_KIND = ffi.WASMTIME_EXTERN_MEMORY.value
_GLOBAL_KIND = ffi.WASMTIME_EXTERN_GLOBAL.value
_U32 = 0xFFFFFFFF
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(0)
# ctypes callbacks must outlive every linker that refers to them: one per host function, kept forever.
_CALLBACKS: dict[tuple[Callable[..., int | None], int, int], object] = {}


def _all_i32(functype: wasmtime.FuncType) -> bool:
    i32 = wasmtime.ValType.i32()
    return all(t == i32 for t in functype.params) and all(t == i32 for t in functype.results)


def _raise_pending() -> None:
    """Re-raise the exception a host function raised inside the call, as wasmtime-py does."""
    pending = wasmtime_func.LAST_EXCEPTION
    if pending is not None:
        wasmtime_func.LAST_EXCEPTION = None
        raise pending


def _raise_failure(error: object, trap: object) -> NoReturn:
    """Raise what a call into wasm failed with: the host function's exception that caused it, if any,
    else the wasmtime error or the trap."""
    failure = wasmtime.WasmtimeError._from_ptr(error) if error else wasmtime.Trap._from_ptr(trap)
    _raise_pending()
    raise failure


def i32_shape(functype: wasmtime.FuncType) -> tuple[int, int]:
    """(parameters, results) of a function I32Call can call; raises TypeError for any other."""
    if not _all_i32(functype) or len(functype.results) > 1:
        raise TypeError("I32Call needs a function of i32 parameters and at most one i32 result")
    return len(functype.params), len(functype.results)


def instantiate(pre: wasmtime.InstancePre, store: wasmtime.Store) -> ffi.wasmtime_instance_t:
    """`InstancePre.instantiate`, without building an `Instance` object; raises as it does."""
    instance = ffi.wasmtime_instance_t()
    trap = ctypes.POINTER(ffi.wasm_trap_t)()
    error = ffi.wasmtime_instance_pre_instantiate(pre.ptr(), store._context(), ctypes.byref(instance),
                                                  ctypes.byref(trap))
    if error or trap:
        _raise_failure(error, trap)
    return instance


def export(store: wasmtime.Store, instance: ffi.wasmtime_instance_t, name: bytes) -> wasmtime.Func | \
        wasmtime.Memory | wasmtime.Global | None:
    """One function, memory or global export of an instance by name (None: absent or of another kind)."""
    item = ffi.wasmtime_extern_t()
    if not ffi.wasmtime_instance_export_get(store._context(), ctypes.byref(instance), name, len(name),
                                            ctypes.byref(item)):
        return None
    if item.kind == _FUNC_KIND:
        return wasmtime.Func._from_raw(item.of.func)
    if item.kind == _MEMORY_KIND:
        return wasmtime.Memory._from_raw(item.of.memory)
    if item.kind == _GLOBAL_KIND:
        return wasmtime.Global._from_raw(item.of.global_)
    return None


def global_get(store: wasmtime.Store, global_: wasmtime.Global) -> ffi.wasmtime_val_t:
    """A global's value as wasmtime holds it (numbers only: nothing to unroot)."""
    value = ffi.wasmtime_val_t()
    ffi.wasmtime_global_get(store._context(), ctypes.byref(global_._global), ctypes.byref(value))
    return value


def global_setter(store: wasmtime.Store, global_: wasmtime.Global, value: ffi.wasmtime_val_t) -> Callable[[], None]:
    """A call that sets a global to a value read with `global_get` (same type), its arguments made once."""
    context, global_ref, value_ref = store._context(), ctypes.byref(global_._global), ctypes.byref(value)
    global_set = _bindings._wasmtime_global_set

    def set_global() -> None:
        error = global_set(context, global_ref, value_ref)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)

    return set_global


# Values cross the C API as `wasmtime_val_t` (32 bytes: a kind byte, the value at offset 8). They are read
# and written here as bytes with `struct`, not through ctypes structures, which build several Python
# objects for every value.
_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_val_t)
_VAL_OFFSET = ffi.wasmtime_val_t.of.offset
assert _I32_KIND == 0, "i32 values are written with a zero kind byte"


def _i32_values(count: int) -> struct.Struct:
    """`count` i32 values as wasmtime_val_t: packed unsigned, read unsigned (pointers and lengths)."""
    tail = _VAL_SIZE - _VAL_OFFSET - 4
    return struct.Struct("<" + f"{_VAL_OFFSET}xI{tail}x" * count)


_call = _bindings._wasmtime_func_call  # the ctypes function itself, without wasmtime-py's wrapper


class I32Call:
    """Calls one exported function whose parameters and results are all i32."""

    __slots__ = ("_context", "_func", "_func_ref", "_nparams", "_nresults", "_pack", "_params", "_params_view",
                 "_result", "_results", "_results_view", "_store", "_trap", "_trap_ref")

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, shape: tuple[int, int] | None = None):
        """`shape`: the function's (parameters, results) when known already (see `i32_shape`)."""
        self._store = store
        self._func = func
        self._nparams, self._nresults = shape or i32_shape(func.type(store))
        # Held for the life of the store, which outlives every call made through this object.
        self._context = store._context()
        self._func_ref = ctypes.byref(func._func)
        self._params = (ffi.wasmtime_val_t * max(1, self._nparams))()
        self._params_view = memoryview(self._params).cast("B")
        self._pack = _i32_values(self._nparams).pack_into
        self._results = (ffi.wasmtime_val_t * max(1, self._nresults))()
        self._results_view = memoryview(self._results).cast("B")
        self._result = _i32_values(1).unpack_from
        self._new_trap()

    def _new_trap(self) -> None:
        self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
        self._trap_ref = ctypes.byref(self._trap)

    def __call__(self, *args: int) -> int | None:
        self._pack(self._params_view, 0, *[value & _U32 for value in args])
        error = _call(self._context, self._func_ref, self._params, self._nparams, self._results, self._nresults,
                      self._trap_ref)
        if error or self._trap:
            trap = self._trap
            self._new_trap()  # the failure takes this one over
            _raise_failure(error, trap)
        if not self._nresults:
            return None
        value = self._result(self._results_view)[0]
        return value - (1 << 32) if value & 0x80000000 else value  # an i32, as the guest returned it


def _callback(func: Callable[..., int | None], nparams: int, nresults: int) -> object:
    read = _i32_values(nparams).unpack
    size = nparams * _VAL_SIZE
    result = struct.Struct(f"<B{_VAL_OFFSET - 1}xI")

    def callback(env: int, caller: int, params: int, nargs: int, results: int, nres: int) -> int:
        try:
            value = func(*read(ctypes.string_at(params, size))) if nparams else func()
            if nresults:
                ctypes.memmove(results, result.pack(_I32_KIND, value & _U32), result.size)
            return 0
        except BaseException as exc:  # handed back to the caller of the guest, like wasmtime-py does
            wasmtime_func.LAST_EXCEPTION = exc
            trap = wasmtime.Trap("python exception")._consume()
            return ctypes.cast(trap, ctypes.c_void_p).value

    # Pointers arrive as plain integers: ctypes builds no pointer objects for each call.
    raw = _RAW_CALLBACK(callback)
    return raw, ctypes.cast(raw, ffi.wasmtime_func_callback_t)


_RAW_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                 ctypes.c_void_p, ctypes.c_size_t)


def define(linker: wasmtime.Linker, module: str, name: str, functype: wasmtime.FuncType,
           func: Callable[..., int | None]) -> None:
    """`Linker.define_func`, on the fast path when the signature is all-i32.

    Fast-path host functions receive their i32 arguments as unsigned integers (pointers, lengths,
    descriptors, flags: what the waPC and WASI ABIs pass).
    """
    if not _all_i32(functype) or len(functype.results) > 1:
        linker.define_func(module, name, functype, func)
        return
    key = (func, len(functype.params), len(functype.results))
    callback = _CALLBACKS.get(key)
    if callback is None:
        callback = _CALLBACKS[key] = _callback(*key)
    _, callback = callback
    module_bytes, name_bytes = module.encode(), name.encode()
    error = ffi.wasmtime_linker_define_func(
        linker.ptr(), ctypes.create_string_buffer(module_bytes), len(module_bytes),
        ctypes.create_string_buffer(name_bytes), len(name_bytes), functype.ptr(), callback, None, _NO_FINALIZER)
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)
