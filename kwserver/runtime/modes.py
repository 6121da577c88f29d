"""Which runtime serves which execution mode."""

from __future__ import annotations

from typing import Protocol

import wasmtime

from kwserver.runtime import InstanceLimits, InstantiationFailure
from kwserver.runtime.engine import CompiledModule
from kwserver.runtime.opa import OpaModule
from kwserver.runtime.wapc import HostCall, WapcModule
from kwserver.runtime.wasi_command import WasiCommandModule


class PolicyInstance(Protocol):
    """A live policy: `WapcInstance` (reused), `WasiCommandPolicy` (a fresh run per call) or
    `OpaInstance` (reused; evaluated with `evaluate()`, settings always valid)."""

    broken: bool

    def call(self, operation: str, payload: bytes) -> bytes: ...

    @property
    def memory_size(self) -> int: ...

    def close(self) -> None: ...


class LinkedModule(Protocol):
    def instantiate(self, limits: InstanceLimits, host_call: HostCall | None = None,
                    label: str = "guest") -> PolicyInstance: ...


SUPPORTED_MODES = ("kubewarden-wapc", "wasi", "opa", "gatekeeper")
REGO_MODES = ("opa", "gatekeeper")


def link(engine: wasmtime.Engine, compiled: CompiledModule, *, epoch_interruption: bool) -> LinkedModule:
    """Link a compiled module for its execution mode (done lazily, once per module per process)."""
    mode = compiled.execution_mode
    if mode == "kubewarden-wapc":
        return WapcModule(engine, compiled.module, epoch_interruption=epoch_interruption)
    if mode == "wasi":
        return WasiCommandModule(engine, compiled.module, epoch_interruption=epoch_interruption)
    if mode in REGO_MODES:
        return OpaModule(engine, compiled.module, epoch_interruption=epoch_interruption)
    raise InstantiationFailure(
        f"execution mode `{compiled.execution_mode}` is not supported by this build "
        f"(supported: {', '.join(SUPPORTED_MODES)})"
    )
