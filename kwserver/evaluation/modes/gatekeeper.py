"""`gatekeeper`: Gatekeeper constraint templates compiled by OPA (kwserver.runtime.opa runs them).

Input `{"parameters": <settings>, "review": <request>}`, data `{}`; the result is a set of violations:
none accepts, any rejects with their `msg`s joined by ", ". A context-aware policy's data is
`{"inventory": ...}` in Gatekeeper's sync layout: `{"cluster": {<apiVersion>: {<Kind>: {<name>: obj}}},
"namespace": {<namespace>: {<apiVersion>: {<Kind>: {<name>: obj}}}}}`. Raw requests are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from kwserver import admission
from kwserver.admission import EvaluationRequest
from kwserver.config import ContextAwareResource
from kwserver.evaluation import inventory
from kwserver.evaluation.modes.opa import OpaMode
from kwserver.evaluation.registry import LoadedPolicy
from kwserver.runtime.opa import OpaModule

GATEKEEPER_RAW_UNSUPPORTED = "Gatekeeper does not support raw validation requests"
GATEKEEPER_UNINTERPRETABLE = "cannot interpret Gatekeeper policy result"


def gatekeeper_documents(request: EvaluationRequest, settings_json: bytes) -> tuple[bytes, bytes]:
    """Input `{"parameters": <settings>, "review": <request>}` and data `{}` (without the inventory)."""
    return b'{"parameters":' + settings_json + b',"review":' + request.json + b"}", b"{}"


def gatekeeper_inventory(lists: Sequence[tuple[ContextAwareResource, Sequence[dict[str, Any]]]]) -> dict[str, Any]:
    """`data.inventory` from (resource, listed objects) pairs."""
    cluster: dict[str, Any] = {}
    namespaced: dict[str, Any] = {}
    for resource, objects in lists:
        for namespace, name, obj in inventory.named(objects):
            scope = cluster if namespace is None else namespaced.setdefault(namespace, {})
            scope.setdefault(resource.api_version, {}).setdefault(resource.kind, {})[name] = obj
    return {"cluster": cluster, "namespace": namespaced}


def gatekeeper_violations(result: bytes) -> list[dict[str, Any]]:
    """The violations `result[0].result` of a Gatekeeper policy; ValueError when it is not one."""
    json_type = admission.json_type
    try:
        value = orjson.loads(result)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {admission.json_error_text(exc)}") from exc
    if not isinstance(value, list) or not value or not isinstance(value[0], dict) or "result" not in value[0]:
        raise ValueError("the entrypoint is undefined (it produced no result)")
    violations = value[0]["result"]
    if not isinstance(violations, list):
        raise ValueError(f"expected a set of violations, got {json_type(violations)}")
    for violation in violations:
        if not isinstance(violation, dict):
            raise ValueError(f"a violation must be an object, got {json_type(violation)}")
        if violation.get("msg") is not None and not isinstance(violation["msg"], str):
            raise ValueError(f"a violation's `msg` must be a string, got {json_type(violation['msg'])}")
    return violations


def response_from_gatekeeper(request: EvaluationRequest, result: bytes) -> dict[str, Any]:
    """No violations: allowed; otherwise rejected with the `msg`s joined by ", ". A result that is not
    a list of violations is a rejection with code 500 (fail closed; the reference accepted it)."""
    try:
        violations = gatekeeper_violations(result)
    except ValueError as exc:
        return admission.internal_error(request.uid, f"{GATEKEEPER_UNINTERPRETABLE}: {exc}")
    if not violations:
        return admission.admission_response(request.uid, True)
    messages = [v["msg"] for v in violations if v.get("msg") is not None]
    return admission.admission_response(request.uid, False, status=admission.status(", ".join(messages)))


def entrypoint_warning(module: OpaModule, name: str | None) -> str | None:
    """A warning when the chosen entrypoint is not a `violation` rule; InstantiationFailure for an
    entrypoint name the module does not have."""
    entrypoint_id = module.entrypoint_id(name)
    chosen = module.info.entrypoint_name(entrypoint_id)
    if chosen is not None and chosen.rsplit("/", 1)[-1] == "violation":
        return None
    available = ", ".join(sorted(module.info.entrypoints)) or "none"
    return (
        f"Gatekeeper entrypoint {entrypoint_id} is `{chosen}`, not a `violation` rule (entrypoints: {available}); "
        "results that are not a set of violations reject the request. Select the entrypoint with "
        "`entrypoint` in policies.yml or the module metadata"
    )


class GatekeeperMode(OpaMode):
    name = "gatekeeper"

    def recognises(self, exports: set[str], imports: set[str]) -> bool:
        # Both Rego flavours look alike; Gatekeeper is the more common un-annotated one.
        return "opa_eval_ctx_new" in exports

    def boot_warning(self, linked: OpaModule, policy: LoadedPolicy) -> str | None:
        return entrypoint_warning(linked, policy.entrypoint)

    def refusal(self, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any] | None:
        if request.raw:
            return admission.internal_error(request.uid, GATEKEEPER_RAW_UNSUPPORTED)
        return None

    plain_documents = staticmethod(gatekeeper_documents)

    def inventory_data(self, policy: LoadedPolicy) -> bytes:
        """`{"inventory": ...}`; raises InventoryUnavailable."""
        resources = policy.spec.context_aware_resources
        lists = inventory.fetch(policy.capabilities, resources, inventory.deadline_for(policy.limits.timeout_seconds))

        def build(first: bool) -> bytes:
            kinds = [(resource, inventory.listed_objects(raw)) for resource, raw in zip(resources, lists, strict=True)]
            return orjson.dumps({"inventory": gatekeeper_inventory(kinds)})

        return inventory.document((self.name, tuple(resources)), lists, build)

    def response(self, request: EvaluationRequest, result: bytes) -> dict[str, Any]:
        return response_from_gatekeeper(request, result)


MODE = GatekeeperMode()
