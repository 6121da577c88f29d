"""Plain WASI policies (`executionMode: wasi`): one command-line run per evaluation.

Each `validate` / `validate_settings` runs the module's `_start` in a brand-new store, instantiated
from an `InstancePre` linked once per module, with argv `["policy.wasm", "validate"]` (or
`"validate-settings"`), the request JSON as stdin, and stdout/stderr captured in memory (nothing
touches the disk). A normal return or `proc_exit(0)` is success and stdout is the answer; a non-zero
exit, a trap or the deadline is a failure, reported with what the program wrote to stderr.

Host capabilities come through `host.call` and `kubewarden:javy/host.call` (JavaScript/Javy):
same arguments as waPC's `__host_call`, but the return value is reversed (0 = success, 1 = failure)
and the answer (or the error text) is appended to stdin, where the guest reads it to EOF.
"""

from __future__ import annotations

import logging

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
    running,
)
from kwserver.runtime.memory import GuestMemory
from kwserver.runtime.wasi import WasiState, define_wasi

log = logging.getLogger(__name__)

PROGRAM_NAME = "policy.wasm"
HOST_CALL_MODULES = ("host", "kubewarden:javy/host")
OPERATION_ARGS = {"validate": "validate", "validate_settings": "validate-settings"}


class WasiCommandFailure(GuestCallFailure):
    """The program failed (non-zero exit, trap, unusable output). `stderr` is what it wrote there."""

    def __init__(self, reason: str, stderr: str = "", exit_code: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.stderr = stderr
        self.exit_code = exit_code

    @property
    def message(self) -> str:
        """The reference reports the trimmed stderr alone; when there is none, say what happened."""
        return self.stderr.strip() or self.reason


class WasiCommandTimeout(GuestTimeout):
    """The program ran past its deadline; `stderr` holds what it wrote before being stopped."""

    def __init__(self, stderr: str = ""):
        super().__init__()
        self.stderr = stderr


def _host_call(bd_ptr: int, bd_len: int, ns_ptr: int, ns_len: int, op_ptr: int, op_len: int,
               ptr: int, length: int) -> int:
    run: _Run = current_guest()
    binding, namespace, operation, payload = run.wasi.memory.read_host_call(
        bd_ptr, bd_len, ns_ptr, ns_len, op_ptr, op_len, ptr, length)
    try:
        answer, status = run.host_call(binding, namespace, operation, payload), 0
    except GuestTimeout:
        raise  # the deadline passed while the host waited: the evaluation is out of time
    except Exception as exc:  # a failed callback is reported to the guest, never a trap
        answer, status = str(exc).encode(), 1
    run.wasi.stdin += answer
    return status




class _Run:
    """What the host functions of one run see through `current_guest()`."""

    __slots__ = ("host_call", "label", "wasi")

    def __init__(self, wasi: WasiState, host_call: HostCall, label: str):
        self.wasi = wasi
        self.host_call = host_call
        self.label = label


class WasiCommandModule:
    """A compiled WASI command pre-linked with WASI and the host-call imports."""

    def __init__(self, engine: wasmtime.Engine, module: wasmtime.Module, *, epoch_interruption: bool):
        self.engine = engine
        self.epoch_interruption = epoch_interruption
        exports = {e.name: e.type for e in module.exports}
        if not isinstance(exports.get("_start"), wasmtime.FuncType):
            raise InstantiationFailure("cannot find `_start` function inside of module")
        if not isinstance(exports.get("memory"), wasmtime.MemoryType):
            raise InstantiationFailure("cannot find `memory` export inside of module")
        linker = wasmtime.Linker(engine)
        define_wasi(linker, module)
        for item in module.imports:
            if item.module in HOST_CALL_MODULES and item.name == "call":
                # The import's own type: a FuncType is bound to the first engine it is used with.
                functype = item.type
                if not (isinstance(functype, wasmtime.FuncType) and len(functype.params) == 8
                        and len(functype.results) == 1):
                    raise InstantiationFailure(f"import {item.module}.call has the wrong signature")
                fastcall.define(linker, item.module, "call", functype, _host_call)
        try:
            self.pre = linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise InstantiationFailure(failure_reason(exc)) from exc

    def instantiate(self, limits: InstanceLimits, host_call: HostCall | None = None,
                    label: str = "guest") -> WasiCommandPolicy:
        return WasiCommandPolicy(self, limits, host_call or no_host_callback, label)


class WasiCommandPolicy:
    """A WASI policy bound to its limits and host capabilities; every `call` is a fresh run.

    Nothing survives a run, so there is nothing to reuse, reset or leak: `memory_size` is 0 and the
    object is never broken.
    """

    __slots__ = ("broken", "host_call", "label", "limits", "module")

    def __init__(self, module: WasiCommandModule, limits: InstanceLimits, host_call: HostCall, label: str):
        self.module = module
        self.limits = limits
        self.host_call = host_call
        self.label = label
        self.broken = False

    def run(self, args: list[str], stdin: bytes) -> bytes:
        """Run the program once; its stdout. Raises WasiCommandTimeout or WasiCommandFailure."""
        wasi = WasiState([PROGRAM_NAME, *args], log_prefix=self.label)
        wasi.reset_streams(stdin, capture=True)
        store = new_store(self.module.engine, self.limits)
        try:
            wasi.deadline_at = arm_deadline(store, self.limits, self.module.epoch_interruption)
            run = _Run(wasi, self.host_call, self.label)
            exit_code, reason = 0, ""
            with running(run):
                try:
                    instance = fastcall.instantiate(self.module.pre, store)
                    wasi.memory = GuestMemory(store, fastcall.export(store, instance, b"memory"))
                    fastcall.export(store, instance, b"_start")(store)
                except ProcExit as exit_:
                    exit_code = exit_.code
                    reason = f"the policy exited with code {exit_code}"
                except GUEST_FAILURES as exc:
                    failure = classify_failure(exc)
                    if isinstance(failure, GuestTimeout):
                        raise WasiCommandTimeout(_text(wasi.stderr)) from exc
                    how = "trapped" if isinstance(exc, wasmtime.Trap) else "failed"
                    exit_code, reason = None, f"the policy {how}: {failure}"
        finally:
            store.close()
        stderr = _text(wasi.stderr)
        if stderr.strip():
            log.warning("policy %s wrote to stderr: %s", self.label, stderr.strip())
        if exit_code != 0:
            raise WasiCommandFailure(reason, stderr, exit_code)
        try:
            bytes(wasi.stdout).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WasiCommandFailure(f"stdout pipe conversion error: {exc}", "", 0) from exc
        return bytes(wasi.stdout)

    def call(self, operation: str, payload: bytes) -> bytes:
        return self.run([OPERATION_ARGS.get(operation, operation)], payload)

    @property
    def memory_size(self) -> int:
        return 0

    def bind(self, limits: InstanceLimits, host_call: HostCall, label: str) -> None:
        self.limits, self.host_call, self.label = limits, host_call, label

    def close(self) -> None:
        pass


def _text(data: bytearray | None) -> str:
    return bytes(data or b"").decode("utf-8", "replace")
