"""`kubewarden-wapc`: Kubewarden's waPC protocol (Rust, TinyGo, AssemblyScript policies).

`validate` and `validate_settings` calls on a reused instance (kwserver.runtime.wapc); the request
goes in as a ValidationRequest and comes back as a ValidationResponse (kwserver.admission).
"""

from __future__ import annotations

from typing import Any

import orjson

from kwserver import admission
from kwserver.admission import EvaluationRequest
from kwserver.evaluation.modes.base import ExecutionMode
from kwserver.evaluation.registry import LoadedPolicy
from kwserver.metadata import MetadataError, PolicyMetadata
from kwserver.runtime import GuestCallFailure, GuestTimeout, wapc
from kwserver.runtime.wapc import WapcInstance, WapcModule


def rust_debug_string(text: str) -> str:
    """`format!("{:?}", s)` of a Rust string: the reference embeds guest errors this way."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def response_from_validation(request: EvaluationRequest, raw_response: bytes) -> dict[str, Any]:
    """A policy's ValidationResponse as an AdmissionResponse."""
    uid = request.uid
    try:
        answer = orjson.loads(raw_response)
    except orjson.JSONDecodeError as exc:
        return admission.internal_error(uid, f"invalid response from policy: {admission.json_error_text(exc)}")
    problem = admission.validation_response_problem(answer)
    if problem is not None:
        return admission.internal_error(uid, f"invalid response from policy: {problem}")
    return admission.admission_from_validation(request, answer)


class WapcMode(ExecutionMode):
    name = "kubewarden-wapc"
    aliases = ("kubewarden",)
    runtime = WapcModule
    protocol_version = "v1"
    startup = staticmethod(wapc.startup)

    def recognises(self, exports: set[str], imports: set[str]) -> bool:
        return "__guest_call" in exports

    def check_metadata(self, metadata: PolicyMetadata) -> None:
        if metadata.protocol_version is None:
            raise MetadataError(
                "Policy is missing protocol version, which is required for KubewardenWapc execution mode"
            )
        if metadata.protocol_version != "v1":
            raise MetadataError("Policy uses protocol version Unknown but only V1 is supported")

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
        return response_from_validation(request, raw)


MODE = WapcMode()
