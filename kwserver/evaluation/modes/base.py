"""What every execution mode is: the interface the evaluator, the instance pool and the boot use."""

from __future__ import annotations

from typing import Any

import wasmtime

from kwserver import admission
from kwserver.admission import EvaluationRequest
from kwserver.evaluation.registry import LoadedPolicy
from kwserver.metadata import PolicyMetadata
from kwserver.runtime import GuestCallFailure, GuestTimeout, LinkedModule
from kwserver.runtime.preinit import Startup


class ExecutionMode:
    """One execution mode; a subclass per mode fills in what differs."""

    name: str  # as the metadata's `executionMode` names it
    runtime: type  # the runtime class in kwserver.runtime that links a compiled module
    aliases: tuple[str, ...] = ()  # other names kwctl accepts for it (`kwctl run --execution-mode`)
    rego: bool = False  # Rego compiled by OPA: kwctl checks a mode given on its command line against this
    protocol_version: str | None = None  # what a module without metadata is assumed to speak
    lists_inventory: bool = False  # the host lists a policy's `contextAwareResources` into its documents
    # Its runtime's start-up, run once at boot to pre-initialise modules (kwserver/runtime/preinit.py);
    # None: instances have no start-up worth skipping.
    startup: Startup | None = None

    # --- modules: metadata and linking ---
    def recognises(self, exports: set[str], imports: set[str]) -> bool:
        """Whether a module without metadata is taken for this mode, from its export and import names."""
        return False

    def check_metadata(self, metadata: PolicyMetadata) -> None:
        """What this mode requires of a module's metadata; raises MetadataError with the reference's text."""

    def link(self, engine: wasmtime.Engine, module: wasmtime.Module, *, epoch_interruption: bool) -> LinkedModule:
        return self.runtime(engine, module, epoch_interruption=epoch_interruption)

    def preload(self) -> None:
        """At boot, in the master, when some policy runs in this mode: load what workers would load lazily."""

    # --- policies at boot ---
    def boot_warning(self, linked: LinkedModule, policy: LoadedPolicy) -> str | None:
        """Checked once per policy at boot; raises InstantiationFailure for what makes it unusable."""
        return None

    def settings_error(self, instance: Any, settings_json: bytes) -> str | None:
        """Run the policy's settings validation: None when the settings are valid, else why not."""
        raise NotImplementedError

    # --- requests ---
    def refusal(self, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any] | None:
        """A response given without evaluating, for requests this mode cannot evaluate."""
        return None

    def evaluate(self, instance: Any, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any]:
        """The vanilla response; runtime failures propagate as GuestTimeout / GuestCallFailure."""
        raise NotImplementedError

    def timed_out(self, request: EvaluationRequest, exc: GuestTimeout) -> dict[str, Any]:
        return admission.interrupted(request.uid)

    def failed(self, request: EvaluationRequest, exc: GuestCallFailure) -> dict[str, Any]:
        return admission.internal_error(request.uid, f"Guest call failure: {exc}")
