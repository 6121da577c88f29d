"""The waPC host: Kubewarden's default execution mode (`kubewarden-wapc`).

`WapcModule` links a compiled module with the waPC and WASI imports once (an `InstancePre`);
`WapcInstance` is one live instance in its own store, reusable across calls. The host functions are
linked once per module, so they find the instance they serve through `current_guest()`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import wasmtime

from kwserver.runtime import (
    GUEST_FAILURES,
    GuestCallFailure,
    GuestTimeout,
    HostCall,
    InstanceLimits,
    InstantiationFailure,
    ProcExit,
    arm_deadline,
    classify_failure,
    current_guest,
    failure_reason,
    fastcall,
    new_store,
    no_host_callback,
    pristine,
    running,
    set_store_limits,
)
from kwserver.runtime.memory import GuestMemory, GuestMemoryError
from kwserver.runtime.preinit import (
    GLOBAL_EXPORT,
    PREINITIALISED_EXPORT,
    STARTUP_TIMEOUT_SECONDS,
    NotPreinitialisable,
    State,
)
from kwserver.runtime.pristine import Pristine
from kwserver.runtime.wasi import WasiState, define_wasi

log = logging.getLogger(__name__)

WAPC_MODULE = "wapc"

# --- host functions (module "wapc") -----------------------------------------------------------------

def __guest_request(op_ptr: int, ptr: int) -> None:
    guest = current_guest()
    guest.memory.write(op_ptr, guest.op)
    guest.memory.write(ptr, guest.payload)


def __guest_response(ptr: int, length: int) -> None:
    guest = current_guest()
    guest.guest_response = guest.memory.read(ptr, length)


def __guest_error(ptr: int, length: int) -> None:
    guest = current_guest()
    guest.guest_error = guest.memory.read(ptr, length).decode("utf-8")


def __host_call(bd_ptr: int, bd_len: int, ns_ptr: int, ns_len: int, op_ptr: int, op_len: int,
                ptr: int, length: int) -> int:
    guest = current_guest()
    binding, namespace, operation, payload = guest.memory.read_host_call(
        bd_ptr, bd_len, ns_ptr, ns_len, op_ptr, op_len, ptr, length)
    guest.host_response = None
    guest.host_error = None
    try:
        guest.host_response = guest.host_call(binding, namespace, operation, payload)
        return 1
    except GuestTimeout:
        raise  # the deadline passed while the host waited: the evaluation is out of time
    except Exception as exc:  # a failed callback is reported to the guest, never a trap
        guest.host_error = str(exc).encode()
        return 0


def __host_response_len() -> int:
    response = current_guest().host_response
    return len(response) if response else 0


def __host_response(ptr: int) -> None:
    guest = current_guest()
    if guest.host_response:
        guest.memory.write(ptr, guest.host_response)


def __host_error_len() -> int:
    error = current_guest().host_error
    return len(error) if error else 0


def __host_error(ptr: int) -> None:
    guest = current_guest()
    if guest.host_error:
        guest.memory.write(ptr, guest.host_error)


def __console_log(ptr: int, length: int) -> None:
    guest = current_guest()
    log.info("Guest module %s: %s", guest.label, guest.memory.read(ptr, length).decode("utf-8", "replace"))


# name -> (function, number of i32 parameters, number of i32 results)
_HOST_FUNCTIONS: dict[str, tuple[Callable[..., int | None], int, int]] = {
    "__guest_request": (__guest_request, 2, 0),
    "__guest_response": (__guest_response, 2, 0),
    "__guest_error": (__guest_error, 2, 0),
    "__host_call": (__host_call, 8, 1),
    "__host_response_len": (__host_response_len, 0, 1),
    "__host_response": (__host_response, 1, 0),
    "__host_error_len": (__host_error_len, 0, 1),
    "__host_error": (__host_error, 1, 0),
    "__console_log": (__console_log, 2, 0),
}
_I32 = wasmtime.ValType.i32()


def _declares(functype: wasmtime.FuncType, params: int, results: int) -> bool:
    return [t == _I32 for t in functype.params] == [True] * params and \
        [t == _I32 for t in functype.results] == [True] * results



class WapcModule:
    """A compiled waPC module pre-linked with the host ABI; instantiating it skips import resolution."""

    def __init__(self, engine: wasmtime.Engine, module: wasmtime.Module, *, epoch_interruption: bool):
        self.engine = engine
        self.epoch_interruption = epoch_interruption
        linker = wasmtime.Linker(engine)
        # Linked with the signatures the module declares (a FuncType belongs to one engine); a wrong
        # signature or an unknown import fails right here, at boot.
        for item in module.imports:
            host = _HOST_FUNCTIONS.get(item.name) if item.module == WAPC_MODULE else None
            if host is not None and isinstance(item.type, wasmtime.FuncType) and _declares(item.type, *host[1:]):
                fastcall.define(linker, WAPC_MODULE, item.name, item.type, host[0])
        define_wasi(linker, module)
        try:
            self.pre = linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise InstantiationFailure(failure_reason(exc)) from exc
        # What every instance looks up, read once from the module's export types.
        exports = {e.name: e.type for e in module.exports}
        self.has_memory = isinstance(exports.get("memory"), wasmtime.MemoryType)
        guest_call = exports.get("__guest_call")
        self.guest_call_shape = _shape(guest_call) if isinstance(guest_call, wasmtime.FuncType) else None
        # A pre-initialised module (kwserver.runtime.preinit) starts in the state its init left, and its
        # instances can be put back into that state (kwserver.runtime.pristine).
        self.preinitialised = PREINITIALISED_EXPORT in exports
        self.initialisers = () if self.preinitialised else tuple(
            (name, _shape(exports[name])) for name in ("_start", "wapc_init")
            if isinstance(exports.get(name), wasmtime.FuncType))
        self.snapshot_globals = [name.encode() for name in exports if name.startswith(GLOBAL_EXPORT)]
        self._pristine: Pristine | None = None
        self._pristine_lock = threading.Lock()

    def instantiate(self, limits: InstanceLimits, host_call: HostCall | None = None,
                    label: str = "guest") -> WapcInstance:
        return WapcInstance(self, limits, host_call or no_host_callback, label)

    def pristine(self, limits: InstanceLimits) -> Pristine | None:
        """This process's untouched instance of a pre-initialised module (None for any other module)."""
        if not self.preinitialised:
            return None
        with self._pristine_lock:
            if self._pristine is None or self._pristine.pid != os.getpid():  # made after the fork, in each worker
                scan = pristine.scanner()
                if scan is None:
                    return None
                self._pristine = Pristine(self, limits, scan)
            return self._pristine


def _shape(functype: wasmtime.FuncType) -> tuple[int, int] | None:
    """The shape fastcall.I32Call needs, or None for a function it cannot call."""
    try:
        return fastcall.i32_shape(functype)
    except TypeError:
        return None


class WapcInstance:
    """One live waPC guest in its own store. Not thread-safe: one call at a time."""

    __slots__ = (
        "_guest_call", "broken", "guest_error", "guest_response", "host_call", "host_error", "host_response",
        "instance", "label", "limits", "memory", "module", "op", "payload", "restorable", "restore_target", "store",
        "template", "wasi",
    )

    def __init__(self, module: WapcModule, limits: InstanceLimits, host_call: HostCall, label: str):
        self.module = module
        self.limits = limits
        self.host_call = host_call
        self.label = label
        self.broken = False
        self.op = b""
        self.payload = b""
        self.guest_response: bytes | None = None
        self.guest_error: str | None = None
        self.host_response: bytes | None = None
        self.host_error: bytes | None = None
        self.wasi = WasiState(log_prefix=label)
        self.template: Pristine | None = None  # the instance `restore` copies from, found at the first restore
        self.restore_target: object = None  # kwserver.runtime.pristine's, made at the first restore
        # Whether `restore` can work here, asked after every evaluation: a pre-initialised module, on a
        # kernel that can scan pages (instances are made in the process that uses them).
        self.restorable = module.preinitialised and pristine.scanner() is not None
        self.store = new_store(module.engine, limits)
        with running(self):
            self._arm_deadline()
            try:
                self.instance = instance = fastcall.instantiate(module.pre, self.store)
            except (wasmtime.WasmtimeError, wasmtime.Trap, GuestMemoryError, GuestTimeout) as exc:
                raise InstantiationFailure(failure_reason(exc)) from exc
            if not module.has_memory:
                raise InstantiationFailure("Cannot find 'mem' export")
            self.memory = GuestMemory(self.store, fastcall.export(self.store, instance, b"memory"))
            self.wasi.memory = self.memory
            guest_call = fastcall.export(self.store, instance, b"__guest_call")
            if not isinstance(guest_call, wasmtime.Func):
                raise InstantiationFailure("Guest call function (__guest_call) not exported by wasm module.")
            self._guest_call = fastcall.I32Call(self.store, guest_call, module.guest_call_shape)
            for init, shape in module.initialisers:
                self._initialise(init, fastcall.export(self.store, instance, init.encode()), shape)

    def _arm_deadline(self) -> None:
        self.wasi.deadline_at = arm_deadline(self.store, self.limits, self.module.epoch_interruption)

    def _initialise(self, name: str, func: wasmtime.Func, shape: tuple[int, int] | None) -> None:
        self._arm_deadline()
        try:
            if shape == (0, 0):
                fastcall.I32Call(self.store, func, shape)()
            else:
                func(self.store)
        except ProcExit as exit_:
            if exit_.code != 0:  # TinyGo >= 0.35 leaves `main` with proc_exit(0)
                raise InstantiationFailure(f"Initialization failed: {exit_}") from exit_
        except GUEST_FAILURES as exc:
            failure = classify_failure(exc)
            if isinstance(failure, GuestTimeout):
                raise InstantiationFailure(
                    f"Initialization failed: {name} init interrupted, execution deadline exceeded"
                ) from exc
            raise InstantiationFailure(f"Initialization failed: {failure}") from exc

    def call(self, operation: str, payload: bytes) -> bytes:
        """Run one waPC invocation; raise GuestTimeout or GuestCallFailure("<guest error>")."""
        self.op = operation.encode()
        self.payload = payload
        self.guest_response = self.guest_error = None
        self.host_response = self.host_error = None
        self._arm_deadline()
        try:
            with running(self):
                ok = self._guest_call(len(self.op), len(payload))
        except GUEST_FAILURES as exc:
            self.broken = True
            failure = classify_failure(exc)
            if isinstance(failure, GuestTimeout):
                raise failure from exc
            self.guest_error, ok = str(failure), 0
        finally:
            self.payload = b""
        if ok == 1:
            if self.guest_response is not None:
                return self.guest_response
            raise GuestCallFailure(self.guest_error or "No error message OR response set for call success")
        raise GuestCallFailure(self.guest_error or "No error message set for call failure")

    @property
    def memory_size(self) -> int:
        return self.memory.size

    def bind(self, limits: InstanceLimits, host_call: HostCall, label: str) -> None:
        set_store_limits(self.store, self.limits, limits)
        self.limits, self.host_call, self.label = limits, host_call, label
        self.wasi.log_prefix = label

    def restore(self) -> bool:
        """Put the instance back into the state of a new one (a pre-initialised module's only); False
        when it cannot be, and then it must be closed."""
        template = self.template
        if template is None:
            template = self.template = self.module.pristine(self.limits)
            if template is None:
                return False
        return template.restore(self)

    def close(self) -> None:
        self.store.close()


# --- pre-initialisation: the start-up run once at boot (kwserver/runtime/preinit.py) -------------------

class _HostCalled(Exception):
    pass


def startup(engine: wasmtime.Engine, epoch_interruption: bool, memory_bytes: int) -> Callable[[bytes], State]:
    """Runs a waPC module's start-up (`_start`, `wapc_init`) as a new instance would, under the policy
    memory limit and with no host capabilities: a start-up that calls the host depends on the policy
    and is refused."""
    from kwserver.runtime.engine import EpochTicker

    called: list[str] = []

    def host_call(binding: str, namespace: str, operation: str, payload: bytes) -> bytes:
        called.append(f"{binding}/{namespace}/{operation}")
        raise _HostCalled("no host capabilities during pre-initialisation")

    def run(instrumented: bytes) -> State:
        module = wasmtime.Module(engine, instrumented)
        linked = WapcModule(engine, module, epoch_interruption=epoch_interruption)
        ticker = EpochTicker(engine)
        if epoch_interruption:
            ticker.start()
        try:
            instance = linked.instantiate(InstanceLimits(memory_bytes, STARTUP_TIMEOUT_SECONDS), host_call,
                                          label="pre-initialisation")
        except InstantiationFailure as exc:
            raise NotPreinitialisable(f"its start-up failed: {exc}") from exc
        finally:
            ticker.stop()
        try:
            if called:
                raise NotPreinitialisable(f"its start-up calls the host ({', '.join(called)})")
            values = {}
            for export in module.exports:
                if export.name.startswith(GLOBAL_EXPORT):
                    global_ = fastcall.export(instance.store, instance.instance, export.name.encode())
                    values[int(export.name[len(GLOBAL_EXPORT):])] = global_.value(instance.store)
            return State(instance.memory.read(0, instance.memory.size), values)
        finally:
            instance.close()

    return run
