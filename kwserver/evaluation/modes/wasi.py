"""`wasi`: plain WASI commands (Go, Javy policies); each call is a program run, stdout is the answer.

The request goes in on stdin as a ValidationRequest (kwserver.runtime.wasi_command runs the
program); a failed run answers with what the program wrote to stderr, as the reference does.
"""

from __future__ import annotations

from typing import Any

import orjson

from kwserver import admission
from kwserver.admission import INTERRUPTED_MESSAGE, EvaluationRequest
from kwserver.evaluation.modes.base import ExecutionMode
from kwserver.evaluation.registry import LoadedPolicy
from kwserver.runtime import GuestCallFailure, GuestTimeout
from kwserver.runtime.wasi_command import (
    WasiCommandFailure,
    WasiCommandModule,
    WasiCommandPolicy,
    WasiCommandTimeout,
)


def response_from_wasi(request: EvaluationRequest, stdout: bytes) -> dict[str, Any]:
    """The stdout of a WASI policy's `validate` run (one ValidationResponse) as an AdmissionResponse."""
    try:
        answer = orjson.loads(stdout)
    except orjson.JSONDecodeError as exc:
        problem: str | None = admission.json_error_text(exc)
    else:
        problem = admission.validation_response_problem(answer)
    if problem is not None:
        return admission.internal_error(request.uid, f"Cannot deserialize policy validation response: {problem}")
    return admission.admission_from_validation(request, answer)


def wasi_interrupted_message(stderr: str) -> str:
    """A WASI timeout says so, and keeps what the policy wrote to stderr (the reference gave stderr only)."""
    stderr = stderr.strip()
    return f"{INTERRUPTED_MESSAGE}; policy stderr: {stderr}" if stderr else INTERRUPTED_MESSAGE


def wasi_settings_error(stdout: bytes) -> str | None:
    """The stdout of a WASI policy's `validate-settings` run: None when valid, else the reason."""
    try:
        answer = orjson.loads(stdout)
        if not isinstance(answer, dict):
            raise TypeError(
                f"invalid type: {admission.json_type(answer)}, expected struct SettingsValidationResponse")
        valid = answer.get("valid")
        if not isinstance(valid, bool):
            raise TypeError("missing field `valid`" if valid is None else "invalid type for `valid`")
    except (orjson.JSONDecodeError, TypeError) as exc:
        return f"Cannot deserialize settings validation response: {admission.json_error_text(exc)}"
    return None if valid else (answer.get("message") or "no message")


class WasiMode(ExecutionMode):
    name = "wasi"
    runtime = WasiCommandModule

    def recognises(self, exports: set[str], imports: set[str]) -> bool:
        return "_start" in exports and "wasi_snapshot_preview1" in imports

    def settings_error(self, instance: WasiCommandPolicy, settings_json: bytes) -> str | None:
        """A failed `validate-settings` run means invalid settings, with what the program said."""
        try:
            stdout = instance.call("validate_settings", settings_json)
        except WasiCommandTimeout as exc:
            return wasi_interrupted_message(exc.stderr)
        except WasiCommandFailure as exc:
            return exc.message
        return wasi_settings_error(stdout)

    def evaluate(self, instance: WasiCommandPolicy, policy: LoadedPolicy,
                 request: EvaluationRequest) -> dict[str, Any]:
        stdout = instance.call("validate", admission.validation_payload(request, policy.settings_json))
        return response_from_wasi(request, stdout)

    def timed_out(self, request: EvaluationRequest, exc: GuestTimeout) -> dict[str, Any]:
        stderr = exc.stderr if isinstance(exc, WasiCommandTimeout) else ""
        return admission.reject(request.uid, wasi_interrupted_message(stderr), 500)

    def failed(self, request: EvaluationRequest, exc: GuestCallFailure) -> dict[str, Any]:
        message = exc.message if isinstance(exc, WasiCommandFailure) else str(exc)
        return admission.reject(request.uid, message, 500)


MODE = WasiMode()
