"""The execution modes, one object each, registered in `MODES` by their metadata name.

A mode knows how to link a compiled module for its runtime, validate a policy's settings, evaluate
one request on an instance and turn what the guest answered (or how it failed) into the vanilla
AdmissionResponse, and what to check about a policy at boot. Adding a mode is one class here and
one runtime module.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
import wasmtime

from kwserver import admission, metadata
from kwserver.admission import EvaluationRequest
from kwserver.evaluation import inventory
from kwserver.runtime import GuestCallFailure, GuestTimeout, InstantiationFailure, LinkedModule
from kwserver.runtime.opa import OpaInstance, OpaModule, rego_entrypoint_warning
from kwserver.runtime.wapc import WapcInstance, WapcModule
from kwserver.runtime.wasi_command import (
    WasiCommandFailure,
    WasiCommandModule,
    WasiCommandPolicy,
    WasiCommandTimeout,
)

if TYPE_CHECKING:  # the registry imports this module
    from kwserver.evaluation.registry import LoadedPolicy

log = logging.getLogger(__name__)


def rust_debug_string(text: str) -> str:
    """`format!("{:?}", s)` of a Rust string: the reference embeds guest errors this way."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


class ExecutionMode:
    """What every mode does; subclasses fill in the runtime-specific parts."""

    name: str
    runtime: type
    # The host lists a context-aware policy's `contextAwareResources` into its documents (Rego inventory).
    lists_inventory = False

    def link(self, engine: wasmtime.Engine, module: wasmtime.Module, *, epoch_interruption: bool) -> LinkedModule:
        return self.runtime(engine, module, epoch_interruption=epoch_interruption)

    def boot_warning(self, linked: LinkedModule, policy: LoadedPolicy) -> str | None:
        """Checked once per policy at boot; raises InstantiationFailure for what makes it unusable."""
        return None

    def settings_error(self, instance: Any, settings_json: bytes) -> str | None:
        """Run the policy's settings validation: None when the settings are valid, else why not."""
        raise NotImplementedError

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


class WapcMode(ExecutionMode):
    """Kubewarden's waPC protocol: `validate` and `validate_settings` calls on a reused instance."""

    name = metadata.WAPC
    runtime = WapcModule

    def settings_error(self, instance: WapcInstance, settings_json: bytes) -> str | None:
        try:
            raw = instance.call("validate_settings", settings_json)
        except (GuestTimeout, GuestCallFailure) as exc:
            return f"Error invoking settings validation callback: GuestCallFailure({rust_debug_string(str(exc))})"
        try:
            answer = orjson.loads(raw)
            valid = answer["valid"]
            if not isinstance(valid, bool):
                raise TypeError("invalid type for `valid`, expected a boolean")
        except (ValueError, KeyError, TypeError) as exc:
            return f"error: {exc!r}"
        return None if valid else (answer.get("message") or "no message")

    def evaluate(self, instance: WapcInstance, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any]:
        raw = instance.call("validate", admission.validation_payload(request, policy.settings_json))
        return admission.response_from_validation(request, raw)


class WasiMode(ExecutionMode):
    """Plain WASI commands: each call is a program run; stdout is the answer."""

    name = metadata.WASI
    runtime = WasiCommandModule

    def settings_error(self, instance: WasiCommandPolicy, settings_json: bytes) -> str | None:
        """A failed `validate-settings` run means invalid settings, with what the program said."""
        try:
            stdout = instance.call("validate_settings", settings_json)
        except WasiCommandTimeout as exc:
            return admission.wasi_interrupted_message(exc.stderr)
        except WasiCommandFailure as exc:
            return exc.message
        return admission.wasi_settings_error(stdout)

    def evaluate(self, instance: WasiCommandPolicy, policy: LoadedPolicy,
                 request: EvaluationRequest) -> dict[str, Any]:
        stdout = instance.call("validate", admission.validation_payload(request, policy.settings_json))
        return admission.response_from_wasi(request, stdout)

    def timed_out(self, request: EvaluationRequest, exc: GuestTimeout) -> dict[str, Any]:
        stderr = exc.stderr if isinstance(exc, WasiCommandTimeout) else ""
        return admission.reject(request.uid, admission.wasi_interrupted_message(stderr), 500)

    def failed(self, request: EvaluationRequest, exc: GuestCallFailure) -> dict[str, Any]:
        message = exc.message if isinstance(exc, WasiCommandFailure) else str(exc)
        return admission.reject(request.uid, message, 500)


class OpaMode(ExecutionMode):
    """Rego compiled by OPA: input `{"request": ...}`, data = the settings, result `response`."""

    name = metadata.OPA
    runtime = OpaModule
    lists_inventory = True

    def boot_warning(self, linked: OpaModule, policy: LoadedPolicy) -> str | None:
        return rego_entrypoint_warning(linked, self.name, policy.entrypoint)

    def settings_error(self, instance: OpaInstance, settings_json: bytes) -> str | None:
        return None  # Rego policies have no settings validation: always valid (spec §5.4)

    def documents(self, policy: LoadedPolicy, request: EvaluationRequest) -> tuple[bytes, bytes]:
        """Input and data; a context-aware policy's data carries the cluster inventory as `kubernetes`."""
        input_json, data_json = admission.opa_documents(request, policy.settings_json)
        if policy.spec.context_aware_resources:
            data_json = inventory.opa_data_json(policy.capabilities, policy.name,
                                                policy.spec.context_aware_resources, policy.settings_json,
                                                policy.limits.timeout_seconds)
        return input_json, data_json

    def evaluate(self, instance: OpaInstance, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any]:
        try:
            input_json, data_json = self.documents(policy, request)
        except inventory.InventoryUnavailable as exc:
            log.error("policy %s: no cluster inventory: %s", policy.name, exc)
            return admission.internal_error(request.uid, str(exc))
        result = instance.evaluate(instance.module.entrypoint_id(policy.entrypoint), input_json, data_json)
        return self.response(request, result)

    def response(self, request: EvaluationRequest, result: bytes) -> dict[str, Any]:
        return admission.response_from_opa(request, result)

    def timed_out(self, request: EvaluationRequest, exc: GuestTimeout) -> dict[str, Any]:
        return admission.internal_error(request.uid, str(exc))

    def failed(self, request: EvaluationRequest, exc: GuestCallFailure) -> dict[str, Any]:
        return admission.internal_error(request.uid, str(exc))


class GatekeeperMode(OpaMode):
    """Gatekeeper constraint templates: input `{"parameters", "review"}`, a set of violations."""

    name = metadata.GATEKEEPER

    def refusal(self, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any] | None:
        if request.raw:
            return admission.internal_error(request.uid, admission.GATEKEEPER_RAW_UNSUPPORTED)
        return None

    def documents(self, policy: LoadedPolicy, request: EvaluationRequest) -> tuple[bytes, bytes]:
        """Input and data; a context-aware policy's data is `{"inventory": ...}`."""
        input_json, data_json = admission.gatekeeper_documents(request, policy.settings_json)
        if policy.spec.context_aware_resources:
            data_json = inventory.gatekeeper_data_json(policy.capabilities, policy.spec.context_aware_resources,
                                                       policy.limits.timeout_seconds)
        return input_json, data_json

    def response(self, request: EvaluationRequest, result: bytes) -> dict[str, Any]:
        return admission.response_from_gatekeeper(request, result)


MODES: dict[str, ExecutionMode] = {mode.name: mode for mode in (WapcMode(), WasiMode(), OpaMode(), GatekeeperMode())}


def mode_named(name: str) -> ExecutionMode:
    try:
        return MODES[name]
    except KeyError:
        raise InstantiationFailure(
            f"execution mode `{name}` is not supported by this build (supported: {', '.join(MODES)})"
        ) from None

