"""AdmissionReview shapes and the server-side answer logic, as pure functions over JSON values.

Parsing and re-serialising requests; Kubewarden's ValidationRequest and ValidationResponse (what waPC
and WASI policies speak), a ValidationResponse turned into an AdmissionResponse with its JSON Patch;
building responses; and the post-processing the reference applies after every evaluation: monitor
mode, the mutation constraint, custom rejection messages. What each execution mode makes of a request
and of its guest's answer is the mode's (kwserver.evaluation.modes). Nothing here knows about wasm or
HTTP.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import jsonpatch
import orjson

from kwserver.truncation import bounded

API_VERSION = "admission.k8s.io/v1"

NULL_OBJECT_MUTATION = (
    "Incoming object is null, which happens only with DELETE operations, but the policy is attempting a "
    "mutation. This is not allowed"
)
INTERRUPTED_MESSAGE = "Policy execution interrupted because it exceeded the allowed execution time"


class RequestShapeError(ValueError):
    """Valid JSON that is not the expected request shape (answered with HTTP 422)."""


class RequestTooDeep(ValueError):
    """JSON nested deeper than the server re-serialises (answered with HTTP 400, as a parse error)."""


# orjson writes at most this many nested arrays and objects (it reads up to 1024).
MAX_NESTING = 254


def _serialise(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        if "Recursion limit" not in str(exc):
            raise
        raise RequestTooDeep(f"recursion limit exceeded: more than {MAX_NESTING} nested arrays or objects") from exc


@dataclass(slots=True)
class EvaluationRequest:
    """What a policy evaluates: an AdmissionRequest, or any JSON value for raw validation.

    Never changed once made; not frozen because one is made for every request, and a frozen dataclass's
    `__init__` costs 2.5 times as much."""

    uid: str
    value: Any  # the request as given to the policy
    json: bytes  # `value` serialised (re-serialised in the reference's key order for AdmissionRequests)
    base_object: Any  # what a mutation is diffed against
    has_base_object: bool
    raw: bool
    namespace: str | None = None
    operation: str | None = None
    kind: str = ""  # requestKind.kind, for metrics


# --- parsing ------------------------------------------------------------------------------------

_USER_INFO_KEYS = ("username", "uid", "groups", "extra")
_GVK = ("group", "version", "kind")
_GVR = ("group", "version", "resource")


def _require_str(doc: dict[str, Any], key: str, where: str) -> str:
    if key not in doc or doc[key] is None:
        raise RequestShapeError(f"{where}missing field `{key}`")
    if not isinstance(doc[key], str):
        raise RequestShapeError(f"{where}{key}: invalid type: {json_type(doc[key])}, expected a string")
    return doc[key]


def _require_object(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    if key not in doc or doc[key] is None:
        raise RequestShapeError(f"{where}missing field `{key}`")
    if not isinstance(doc[key], dict):
        raise RequestShapeError(f"{where}{key}: invalid type: {json_type(doc[key])}, expected a map")
    return doc[key]


def json_type(value: Any) -> str:
    """How serde names a JSON value's type in its errors (`integer `5``, `a sequence`...)."""
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"integer `{value}`" if isinstance(value, int) else f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    return {list: "sequence", dict: "map"}.get(type(value), "null")


def _group_version(doc: dict[str, Any], key: str, fields: tuple[str, ...], where: str) -> dict[str, str]:
    obj = _require_object(doc, key, where)
    return {name: _require_str(obj, name, f"{where}{key}.") for name in fields}


def _optional(doc: dict[str, Any], key: str, where: str, expected: str, valid: Any) -> None:
    """An optional member (absent or null is fine) of the given JSON type."""
    value = doc.get(key)
    if value is not None and not valid(value):
        raise RequestShapeError(f"{where}{key}: invalid type: {json_type(value)}, expected {expected}")


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_extra(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_str_list(item) for item in value.values())


def _shape_error(req: dict[str, Any]) -> RequestShapeError:
    """What makes `req` not an AdmissionRequest of the reference's type: its first member that is not of
    its type, in the order serde meets them (a missing required member, or a member of the wrong type)."""
    where = "request."
    try:
        _require_str(req, "uid", where)
        _group_version(req, "kind", _GVK, where)
        _group_version(req, "resource", _GVR, where)
        _require_str(req, "operation", where)
        _require_object(req, "userInfo", where)
        for key, fields in (("requestKind", _GVK), ("requestResource", _GVR)):
            if req.get(key) is not None:
                _group_version(req, key, fields, where)
        for key in ("name", "namespace", "subResource", "requestSubResource"):
            _optional(req, key, where, "a string", _is_str)
        _optional(req, "dryRun", where, "a boolean", lambda value: isinstance(value, bool))
        user_info, inner = req["userInfo"], f"{where}userInfo."
        for key in ("username", "uid"):
            _optional(user_info, key, inner, "a string", _is_str)
        _optional(user_info, "groups", inner, "a sequence of strings", _is_str_list)
        _optional(user_info, "extra", inner, "a map of string sequences", _is_extra)
    except RequestShapeError as exc:
        return exc
    raise AssertionError("a request of the AdmissionRequest type was refused")  # _typed_request disagrees


def _typed(value: Any, fields: tuple[str, str, str]) -> dict[str, str] | None:
    """A GroupVersionKind (or GroupVersionResource) with its three members only; None when it is not one."""
    if not isinstance(value, dict):
        return None
    first, second, third = value.get(fields[0]), value.get(fields[1]), value.get(fields[2])
    if isinstance(first, str) and isinstance(second, str) and isinstance(third, str):
        return {fields[0]: first, fields[1]: second, fields[2]: third}
    return None


def _typed_request(req: dict[str, Any]) -> dict[str, Any] | None:
    """`req` as the reference's AdmissionRequest type re-serialises it: its members in the type's order,
    unknown and null ones left out, kinds and resources with their three members, userInfo with its
    known ones. None when some member is not of its type (`_shape_error` says which).

    Every request goes through here, so it is straight-line code: the checks of `_shape_error`, inlined."""
    get = req.get
    uid, operation, user_info = get("uid"), get("operation"), get("userInfo")
    kind, resource = _typed(get("kind"), _GVK), _typed(get("resource"), _GVR)
    if not (isinstance(uid, str) and isinstance(operation, str) and isinstance(user_info, dict)
            and kind is not None and resource is not None):
        return None
    request_kind, request_resource = get("requestKind"), get("requestResource")
    if request_kind is not None and (request_kind := _typed(request_kind, _GVK)) is None:
        return None
    if request_resource is not None and (request_resource := _typed(request_resource, _GVR)) is None:
        return None
    sub_resource, request_sub_resource = get("subResource"), get("requestSubResource")
    name, namespace, dry_run = get("name"), get("namespace"), get("dryRun")
    if not ((sub_resource is None or isinstance(sub_resource, str))
            and (request_sub_resource is None or isinstance(request_sub_resource, str))
            and (name is None or isinstance(name, str)) and (namespace is None or isinstance(namespace, str))
            and (dry_run is None or isinstance(dry_run, bool))):
        return None
    user_get = user_info.get
    username, user_uid, groups, extra = user_get("username"), user_get("uid"), user_get("groups"), user_get("extra")
    if not ((username is None or isinstance(username, str)) and (user_uid is None or isinstance(user_uid, str))
            and (groups is None or _is_str_list(groups)) and (extra is None or _is_extra(extra))):
        return None
    user = {key: member for key, member in (("username", username), ("uid", user_uid), ("groups", groups),
                                            ("extra", extra)) if member is not None}
    value = {"uid": uid, "kind": kind, "resource": resource}
    for key, member in (("subResource", sub_resource), ("requestKind", request_kind),
                        ("requestResource", request_resource), ("requestSubResource", request_sub_resource),
                        ("name", name), ("namespace", namespace), ("operation", operation), ("userInfo", user),
                        ("object", get("object")), ("oldObject", get("oldObject")), ("dryRun", dry_run),
                        ("options", get("options"))):
        if member is not None:
            value[key] = member
    return value


def _request_envelope(doc: Any) -> Any:
    if not isinstance(doc, dict):
        raise RequestShapeError(f"invalid type: {json_type(doc)}, expected a map")
    if "request" not in doc:
        raise RequestShapeError("missing field `request`")
    return doc["request"]


def parse_admission_review(doc: Any) -> EvaluationRequest:
    """An AdmissionReview body, re-serialised the way the reference server hands it to policies."""
    req = _request_envelope(doc)
    if not isinstance(req, dict):
        raise RequestShapeError(f"request: invalid type: {json_type(req)}, expected a map")
    value = _typed_request(req)
    if value is None:
        raise _shape_error(req)
    request_kind = value.get("requestKind")
    obj = value.get("object")
    return EvaluationRequest(
        uid=value["uid"],
        value=value,
        json=_serialise(value),
        base_object=obj,
        has_base_object=obj is not None,
        raw=False,
        namespace=value.get("namespace"),
        operation=value["operation"],
        kind=request_kind["kind"] if request_kind is not None else "",
    )


def parse_raw_review(doc: Any) -> EvaluationRequest:
    """A `/validate_raw` body: `{"request": <any JSON>}`, passed to the policy untouched."""
    value = _request_envelope(doc)
    uid = value.get("uid") if isinstance(value, dict) else None
    return EvaluationRequest(
        uid=uid if isinstance(uid, str) else "",
        value=value,
        json=_serialise(value),
        base_object=value,
        has_base_object=True,
        raw=True,
    )


def validation_payload(request: EvaluationRequest, settings_json: bytes) -> bytes:
    """The ValidationRequest `{"request": ..., "settings": ...}`, built without re-encoding either part."""
    return b'{"request":' + request.json + b',"settings":' + settings_json + b"}"


# --- building responses -------------------------------------------------------------------------

def cause(message: str | None, field: str | None = None) -> dict[str, Any]:
    # All three keys are always serialised, as the reference does.
    return {"reason": None, "message": message, "field": field}


def status(message: str | None = None, code: int | None = None,
           causes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if message is not None:
        result["message"] = bounded(message) if isinstance(message, str) else message
    if causes:
        result["details"] = {"causes": causes}
    if code is not None:
        result["code"] = code
    return result


def admission_response(uid: str, allowed: bool, *, status: dict[str, Any] | None = None,
                       patch: str | None = None, audit_annotations: dict[str, str] | None = None,
                       warnings: list[str] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch is not None:
        response["patchType"] = "JSONPatch"
        response["patch"] = patch
    if status:
        response["status"] = status
    response["auditAnnotations"] = audit_annotations
    response["warnings"] = [bounded(w) if isinstance(w, str) else w for w in warnings] if warnings else warnings
    return response


def reject(uid: str, message: str, code: int | None = None) -> dict[str, Any]:
    return admission_response(uid, False, status=status(message, code))


def internal_error(uid: str, message: str) -> dict[str, Any]:
    return reject(uid, f"internal server error: {message}", 500)


def interrupted(uid: str) -> dict[str, Any]:
    return reject(uid, INTERRUPTED_MESSAGE, 500)


def json_error_text(exc: Exception) -> str:
    """The first line of a JSON decoding error."""
    return str(exc).split("\n", 1)[0]


def json_patch(base: Any, mutated: Any) -> str | None:
    """Base64 of the RFC 6902 patch from `base` to `mutated`, or None when nothing changed."""
    operations = jsonpatch.make_patch(base, mutated).patch
    if not operations:
        return None
    return base64.b64encode(orjson.dumps(operations)).decode()


def validation_response_problem(answer: Any) -> str | None:
    """What makes `answer` not a ValidationResponse, or None."""
    if not isinstance(answer, dict):
        return f"invalid type: {json_type(answer)}, expected struct ValidationResponse"
    accepted = answer.get("accepted")
    if not isinstance(accepted, bool):
        return "missing field `accepted`" if accepted is None else "invalid type for `accepted`"
    return None


def admission_from_validation(request: EvaluationRequest, answer: dict[str, Any]) -> dict[str, Any]:
    """A ValidationResponse (checked by `validation_response_problem`) as an AdmissionResponse."""
    uid = request.uid
    patch = None
    mutated = answer.get("mutated_object")
    if mutated is not None:
        if not request.has_base_object:
            return admission_response(uid, False, status=status(NULL_OBJECT_MUTATION))
        try:
            patch = json_patch(request.base_object, mutated)
        except (jsonpatch.JsonPatchException, TypeError, ValueError) as exc:
            return internal_error(uid, f"invalid response format: {exc}")
    message, code = answer.get("message"), answer.get("code")
    return admission_response(
        uid, answer["accepted"],
        status=status(message, code) if message is not None or code is not None else None,
        patch=patch,
        audit_annotations=answer.get("audit_annotations"),
        warnings=answer.get("warnings"),
    )


# --- post-processing (validate and validate_raw; never audit) ------------------------------------

def mutation_rejected_message(policy_id: str) -> str:
    return (
        f"Request rejected by policy {policy_id}. The policy attempted to mutate the request, but it is "
        "currently configured to not allow mutations."
    )


def post_process(response: dict[str, Any], *, policy_id: str, policy_mode: str, allowed_to_mutate: bool,
                 custom_message: str | None) -> dict[str, Any]:
    """Monitor mode, then the mutation constraint, then the custom message (in the reference's order)."""
    result = dict(response)
    if policy_mode == "monitor":
        for key in ("patch", "patchType", "status"):
            result.pop(key, None)
        result["allowed"] = True
        return result
    if not allowed_to_mutate and "patch" in result:
        result.pop("patch")
        result.pop("patchType", None)
        result["allowed"] = False
        result["status"] = status(mutation_rejected_message(policy_id))
    if not result["allowed"] and custom_message is not None:
        original = dict(result.get("status") or {})
        causes = list((original.get("details") or {}).get("causes") or [])
        causes.append(cause(original.get("message", "")))
        details = {**(original.get("details") or {}), "causes": causes}
        new_status = {"message": custom_message, "details": details}
        new_status.update({k: v for k, v in original.items() if k not in ("message", "details")})
        result["status"] = new_status
    return result


def review_envelope(response: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "AdmissionReview", "apiVersion": API_VERSION, "response": response}


def raw_envelope(response: dict[str, Any]) -> dict[str, Any]:
    return {"response": response}
