"""`opa`: Rego compiled to Wasm by OPA (kwserver.runtime.opa runs it).

Input `{"request": <request>}`, data the settings; the result's `response` is the AdmissionResponse.
A context-aware policy's data carries the cluster inventory as `kubernetes`, in kube-mgmt's layout:
`{<plural>: {<namespace>: {<name>: obj}}}` for namespaced kinds, `{<plural>: {<name>: obj}}` for
cluster-scoped ones. Rego policies have no settings validation: their settings are always valid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson

from kwserver import admission
from kwserver.admission import EvaluationRequest
from kwserver.evaluation import inventory
from kwserver.evaluation.modes.base import ExecutionMode
from kwserver.evaluation.registry import LoadedPolicy
from kwserver.runtime import GuestCallFailure, GuestTimeout
from kwserver.runtime.opa import OpaInstance, OpaModule
from kwserver.truncation import bounded

log = logging.getLogger(__name__)

OPA_UNINTERPRETABLE = "cannot interpret OPA policy result"
_STATUS_KEYS = ("status", "message", "reason", "details", "code")


def is_rego_module(export_names: set[str]) -> bool:
    """Rego compiled by OPA exports its ABI functions (`opa_eval`, `opa_malloc`, ...); kwctl's test too."""
    return any(name.startswith("opa_") for name in export_names)


def opa_documents(request: EvaluationRequest, settings_json: bytes) -> tuple[bytes, bytes]:
    """Input `{"request": <request>}` and data = the settings (without the inventory)."""
    return b'{"request":' + request.json + b"}", settings_json


def opa_inventory(lists: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> dict[str, Any]:
    """`data.kubernetes` from (plural name, listed objects) pairs. A kind with no objects has no key, as in
    the reference."""
    found: dict[str, Any] = {}
    for plural, objects in lists:
        for namespace, name, obj in inventory.named(objects):
            by_name = found.setdefault(plural, {})
            if namespace is not None:
                by_name = by_name.setdefault(namespace, {})
            by_name[name] = obj
    return found


def response_from_opa(request: EvaluationRequest, result: bytes) -> dict[str, Any]:
    """`result[0].result.response` of an OPA-mode policy, with the request's uid."""
    uid = request.uid
    json_type = admission.json_type
    try:
        response = orjson.loads(result)[0]["result"]["response"]
    except (orjson.JSONDecodeError, LookupError, TypeError):
        return admission.internal_error(uid, OPA_UNINTERPRETABLE)
    if not isinstance(response, dict):
        return admission.internal_error(uid, f"invalid type: {json_type(response)}, expected struct AdmissionResponse")
    for key, check, expected in (("uid", str, "a string"), ("allowed", bool, "a boolean")):
        if key not in response or response[key] is None:
            return admission.internal_error(uid, f"missing field `{key}`")
        if not isinstance(response[key], check):
            return admission.internal_error(uid, f"invalid type: {json_type(response[key])}, expected {expected}")
    given = response.get("status")
    if given is not None and not isinstance(given, dict):
        return admission.internal_error(uid, f"invalid type: {json_type(given)}, expected struct Status")
    patch = response.get("patch")
    if patch is not None and not isinstance(patch, str):
        return admission.internal_error(uid, f"invalid type: {json_type(patch)}, expected a base64 string")
    return admission.admission_response(
        uid, response["allowed"],
        status={k: _bounded_text(given[k]) for k in _STATUS_KEYS if given.get(k) is not None} if given else None,
        patch=patch,
        audit_annotations=response.get("auditAnnotations"),
        warnings=response.get("warnings"),
    )


def _bounded_text(value: Any) -> Any:
    return bounded(value) if isinstance(value, str) else value


class OpaMode(ExecutionMode):
    name = "opa"
    runtime = OpaModule
    rego = True
    lists_inventory = True  # the cluster inventory, read by the host outside `hostCapabilities`

    def preload(self) -> None:
        from kwserver.runtime.opa_builtins import text

        text.preload()

    def boot_warning(self, linked: OpaModule, policy: LoadedPolicy) -> str | None:
        linked.entrypoint_id(policy.entrypoint)  # InstantiationFailure for a name the module does not have
        return None

    def settings_error(self, instance: OpaInstance, settings_json: bytes) -> str | None:
        return None

    # Input and data of a policy that reads no cluster.
    plain_documents = staticmethod(opa_documents)

    def documents(self, policy: LoadedPolicy, request: EvaluationRequest) -> tuple[bytes, bytes]:
        """Input and data; a context-aware policy's data is built from the cluster inventory."""
        input_json, data_json = self.plain_documents(request, policy.settings_json)
        if policy.spec.context_aware_resources:
            data_json = self.inventory_data(policy)
        return input_json, data_json

    def inventory_data(self, policy: LoadedPolicy) -> bytes:
        """The settings with the cluster inventory as `kubernetes`; raises InventoryUnavailable."""
        host, resources = policy.capabilities, policy.spec.context_aware_resources
        deadline = inventory.deadline_for(policy.limits.timeout_seconds)
        lists = inventory.fetch(host, resources, deadline)
        # Asked every time, after the lists, as the reference does (recorded sessions see the same calls).
        plurals = tuple(inventory.plural_name(host, resource, deadline) for resource in resources)

        def build(first: bool) -> bytes:
            settings = orjson.loads(policy.settings_json)
            if not isinstance(settings, dict):
                settings = {}
            if "kubernetes" in settings and first:
                log.warning("policy %s: the `kubernetes` key of its settings is replaced by the cluster inventory",
                            policy.name)
            kinds = [(plural, inventory.listed_objects(raw)) for plural, raw in zip(plurals, lists, strict=True)]
            return orjson.dumps({**settings, "kubernetes": opa_inventory(kinds)})

        return inventory.document((self.name, tuple(resources), plurals, policy.settings_json), lists, build)

    def evaluate(self, instance: OpaInstance, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any]:
        try:
            input_json, data_json = self.documents(policy, request)
        except inventory.InventoryUnavailable as exc:
            log.error("policy %s: no cluster inventory: %s", policy.name, exc)
            return admission.internal_error(request.uid, str(exc))
        result = instance.evaluate(instance.module.entrypoint_id(policy.entrypoint), input_json, data_json)
        return self.response(request, result)

    def response(self, request: EvaluationRequest, result: bytes) -> dict[str, Any]:
        return response_from_opa(request, result)

    def timed_out(self, request: EvaluationRequest, exc: GuestTimeout) -> dict[str, Any]:
        return admission.internal_error(request.uid, str(exc))

    def failed(self, request: EvaluationRequest, exc: GuestCallFailure) -> dict[str, Any]:
        return admission.internal_error(request.uid, str(exc))


MODE = OpaMode()
