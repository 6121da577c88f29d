import base64
import json

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kwserver import admission
from kwserver.admission import RequestShapeError
from kwserver.evaluation.modes import gatekeeper as gatekeeper_mode
from kwserver.evaluation.modes import opa as opa_mode
from kwserver.evaluation.modes import wapc as wapc_mode
from kwserver.evaluation.modes import wasi as wasi_mode
from tests.support.paths import SERVER_FIXTURES, load_json

POD_REVIEW = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")


def test_reserialised_request_key_order_and_omissions():
    doc = json.loads(json.dumps(POD_REVIEW))
    doc["request"]["oldObject"] = None
    doc["request"]["unknownField"] = 1
    doc["request"]["userInfo"]["uid"] = None
    request = admission.parse_admission_review(doc)
    keys = list(json.loads(request.json))
    order = ["uid", "kind", "resource", "subResource", "requestKind", "requestResource", "requestSubResource",
             "name", "namespace", "operation", "userInfo", "object", "oldObject", "dryRun", "options"]
    assert keys == [k for k in order if k in keys]
    assert "oldObject" not in keys and "unknownField" not in keys
    assert "uid" not in request.value["userInfo"]
    assert request.value["object"] == doc["request"]["object"]
    assert request.uid == "1299d386-525b-4032-98ae-1949f69f9cfc"
    assert request.namespace == "default"


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("request"), "missing field `request`"),
    (lambda d: d["request"].pop("uid"), "missing field `uid`"),
    (lambda d: d["request"]["kind"].pop("version"), "missing field `version`"),
    (lambda d: d["request"].pop("userInfo"), "missing field `userInfo`"),
    (lambda d: d["request"].__setitem__("operation", 3), "expected a string"),
])
def test_required_fields(mutate, message):
    doc = json.loads(json.dumps(POD_REVIEW))
    mutate(doc)
    with pytest.raises(RequestShapeError, match=message):
        admission.parse_admission_review(doc)


def test_raw_request_uid_and_base_object():
    raw = admission.parse_raw_review({"request": {"uid": "u1", "resource": "banana"}})
    assert raw.uid == "u1" and raw.base_object == {"uid": "u1", "resource": "banana"}
    assert admission.parse_raw_review({"request": [1, 2]}).uid == ""
    with pytest.raises(RequestShapeError):
        admission.parse_raw_review({})


def test_validation_payload_is_valid_json():
    request = admission.parse_raw_review({"request": {"a": 1}})
    assert json.loads(admission.validation_payload(request, b'{"x":true}')) == {
        "request": {"a": 1}, "settings": {"x": True}}


def _mutation_response(base, mutated):
    request = admission.parse_raw_review({"request": base})
    return wapc_mode.response_from_validation(
        request, json.dumps({"accepted": True, "mutated_object": mutated}).encode())


def test_mutation_becomes_a_base64_json_patch_that_applies():
    base = {"user": "tonio", "resource": "banana", "list": [1, 2]}
    mutated = {"user": "tonio", "resource": "hay", "list": [1, 2, 3]}
    response = _mutation_response(base, mutated)
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    assert jsonpatch.apply_patch(base, patch) == mutated


def test_unchanged_mutated_object_gives_no_patch():
    response = _mutation_response({"a": 1}, {"a": 1})
    assert "patch" not in response and response["allowed"] is True


def test_mutation_of_a_deleted_object_is_refused():
    doc = json.loads(json.dumps(POD_REVIEW))
    del doc["request"]["object"]
    request = admission.parse_admission_review(doc)
    response = wapc_mode.response_from_validation(request, b'{"accepted":true,"mutated_object":{"a":1}}')
    assert response["allowed"] is False
    assert response["status"] == {"message": admission.NULL_OBJECT_MUTATION}


@pytest.mark.parametrize("raw,message", [
    (b"not json", "internal server error: invalid response from policy:"),
    (b'{"message":"x"}', "internal server error: invalid response from policy: missing field `accepted`"),
])
def test_invalid_policy_responses(raw, message):
    request = admission.parse_raw_review({"request": {}})
    response = wapc_mode.response_from_validation(request, raw)
    assert response["allowed"] is False
    assert response["status"]["code"] == 500
    assert response["status"]["message"].startswith(message)


def test_status_only_when_message_or_code():
    request = admission.parse_raw_review({"request": {}})
    response = wapc_mode.response_from_validation(
        request, b'{"accepted":false,"message":"no","code":403,"warnings":["w"],"audit_annotations":{"a":"b"}}')
    assert response == {"uid": "", "allowed": False, "status": {"message": "no", "code": 403},
                        "auditAnnotations": {"a": "b"}, "warnings": ["w"]}
    accepted = wapc_mode.response_from_validation(request, b'{"accepted":true}')
    assert accepted == {"uid": "", "allowed": True, "auditAnnotations": None, "warnings": None}


REJECTED = admission.reject("u", "Privileged container is not allowed")
PATCHED = admission.admission_response("u", True, patch="cGF0Y2g=", warnings=["w"])


def _post(response, mode="protect", mutate=False, message=None):
    return admission.post_process(response, policy_id="p", policy_mode=mode, allowed_to_mutate=mutate,
                                  custom_message=message)


def test_monitor_accepts_and_drops_patch_and_status_but_keeps_warnings():
    assert _post(REJECTED, "monitor") == {"uid": "u", "allowed": True, "auditAnnotations": None, "warnings": None}
    assert _post(PATCHED, "monitor") == {"uid": "u", "allowed": True, "auditAnnotations": None, "warnings": ["w"]}


def test_protect_keeps_rejection():
    assert _post(REJECTED) == REJECTED


def test_mutation_not_allowed():
    result = _post(PATCHED)
    assert result["allowed"] is False and "patch" not in result and "patchType" not in result
    assert result["status"] == {"message": admission.mutation_rejected_message("p")}
    assert result["warnings"] == ["w"]
    assert _post(PATCHED, mutate=True) == PATCHED


def test_custom_message_keeps_original_as_cause_and_code():
    result = _post(admission.reject("u", "original", 500), message="Custom error message")
    assert result["status"] == {
        "message": "Custom error message",
        "details": {"causes": [{"reason": None, "message": "original", "field": None}]},
        "code": 500,
    }
    assert _post(admission.admission_response("u", True), message="x")["allowed"] is True


def _review_with(change):
    doc = json.loads(json.dumps(POD_REVIEW))
    change(doc["request"])
    return doc


@pytest.mark.parametrize("change,message", [
    (lambda r: r.__setitem__("uid", 1), "request.uid: invalid type: integer `1`, expected a string"),
    (lambda r: r.__setitem__("kind", []), "request.kind: invalid type: sequence, expected a map"),
    (lambda r: r["kind"].__setitem__("version", True), "request.kind.version: invalid type: boolean `true`, "
                                                        "expected a string"),
    (lambda r: r["resource"].pop("group"), "request.resource.missing field `group`"),
    (lambda r: r["resource"].__setitem__("resource", 1.5), "request.resource.resource: invalid type: "
                                                           "floating point `1.5`, expected a string"),
    (lambda r: r.__setitem__("operation", None), "request.missing field `operation`"),
    (lambda r: r.__setitem__("userInfo", "me"), 'request.userInfo: invalid type: string "me", expected a map'),
    (lambda r: r.__setitem__("name", {}), "request.name: invalid type: map, expected a string"),
    (lambda r: r.__setitem__("namespace", 7), "request.namespace: invalid type: integer `7`, expected a string"),
    (lambda r: r.__setitem__("subResource", False), "request.subResource: invalid type: boolean `false`"),
    (lambda r: r.__setitem__("requestSubResource", [1]), "request.requestSubResource: invalid type: sequence"),
])
def test_shape_errors_name_the_field_and_what_was_found(change, message):
    with pytest.raises(RequestShapeError) as error:
        admission.parse_admission_review(_review_with(change))
    assert str(error.value).startswith(message)


def test_request_itself_must_be_a_map():
    with pytest.raises(RequestShapeError, match=r"^request: invalid type: null, expected a map$"):
        admission.parse_admission_review({"request": None})
    with pytest.raises(RequestShapeError, match=r"^request: invalid type: integer `3`, expected a map$"):
        admission.parse_admission_review({"request": 3})
    with pytest.raises(RequestShapeError, match=r"^invalid type: integer `3`, expected a map$"):
        admission.parse_admission_review(3)


def test_parsed_request_fields():
    doc = _review_with(lambda r: (r["kind"].__setitem__("extra", 1), r["resource"].__setitem__("extra", 2),
                                  r["userInfo"].__setitem__("unknown", 3)))
    request = admission.parse_admission_review(doc)
    original = doc["request"]
    assert (request.uid, request.namespace, request.operation, request.kind, request.raw) == (
        original["uid"], "default", "CREATE", "Pod", False)
    assert request.base_object == original["object"] and request.has_base_object is True
    # Re-serialised as the reference's structs: group/version/kind only, known userInfo fields only.
    assert request.value["kind"] == {k: original["kind"][k] for k in ("group", "version", "kind")}
    assert request.value["resource"] == {k: original["resource"][k] for k in ("group", "version", "resource")}
    assert "unknown" not in request.value["userInfo"] and request.value["userInfo"]["username"]
    assert json.loads(request.json) == request.value
    without_kind = admission.parse_admission_review(_review_with(lambda r: r.pop("requestKind")))
    assert without_kind.kind == ""
    # Typed as the reference types it: a requestKind must be a whole GroupVersionKind (HTTP 422 otherwise).
    with pytest.raises(admission.RequestShapeError, match=r"requestKind\.missing field `group`"):
        admission.parse_admission_review(_review_with(lambda r: r.__setitem__("requestKind", {})))
    deleted = admission.parse_admission_review(_review_with(lambda r: r.__setitem__("object", None)))
    assert deleted.has_base_object is False and deleted.base_object is None


# Members of an AdmissionRequest and of its userInfo, and values of every JSON type to put there.
_MEMBERS = [("uid",), ("kind",), ("kind", "version"), ("resource",), ("resource", "group"), ("subResource",),
            ("requestKind",), ("requestKind", "kind"), ("requestResource",), ("requestResource", "resource"),
            ("requestSubResource",), ("name",), ("namespace",), ("operation",), ("userInfo",),
            ("userInfo", "username"), ("userInfo", "uid"), ("userInfo", "groups"), ("userInfo", "extra"),
            ("object",), ("oldObject",), ("dryRun",), ("options",), ("unknown",)]
_ABSENT = object()
_JSON = st.one_of(st.just(_ABSENT), st.none(), st.booleans(), st.integers(-2, 2), st.just("s"),
                  st.lists(st.sampled_from(["a", 1]), max_size=2),
                  st.dictionaries(st.sampled_from(["group", "version", "kind", "resource", "k"]),
                                  st.one_of(st.just("v"), st.lists(st.just("x"), max_size=1), st.just(1)), max_size=4))


@settings(max_examples=400, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(_MEMBERS), _JSON, max_size=4))
def test_every_request_is_typed_or_refused_naming_a_member(changes):
    """The inlined checks every request goes through agree with the checks that name what is wrong."""
    doc = json.loads(json.dumps(POD_REVIEW))
    for path, value in sorted(changes.items(), key=lambda item: len(item[0])):
        parent = doc["request"]
        for key in path[:-1]:
            parent = parent.get(key)
        if not isinstance(parent, dict):
            continue
        if value is _ABSENT:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = value
    req = doc["request"]
    try:
        request = admission.parse_admission_review(doc)
    except RequestShapeError:
        return  # and `_shape_error` found what (it raises AssertionError when it finds nothing)
    with pytest.raises(AssertionError):
        admission._shape_error(req)
    order = ["uid", "kind", "resource", "subResource", "requestKind", "requestResource", "requestSubResource",
             "name", "namespace", "operation", "userInfo", "object", "oldObject", "dryRun", "options"]
    fields = {"kind": ("group", "version", "kind"), "requestKind": ("group", "version", "kind"),
              "resource": ("group", "version", "resource"), "requestResource": ("group", "version", "resource")}
    expected = {key: req[key] for key in order if req.get(key) is not None}
    for key, names in fields.items():
        if key in expected:
            expected[key] = {name: req[key][name] for name in names}
    expected["userInfo"] = {k: v for k, v in req["userInfo"].items()
                            if k in ("username", "uid", "groups", "extra") and v is not None}
    assert request.value == expected and list(request.value) == list(expected)
    assert json.loads(request.json) == expected


def test_envelopes_and_canned_answers():
    response = admission.admission_response("u", True)
    assert admission.review_envelope(response) == {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
                                                   "response": response}
    assert admission.raw_envelope(response) == {"response": response}
    assert admission.interrupted("u") == {"uid": "u", "allowed": False, "status": {
        "message": "Policy execution interrupted because it exceeded the allowed execution time", "code": 500},
        "auditAnnotations": None, "warnings": None}
    assert admission.internal_error("u", "boom")["status"] == {"message": "internal server error: boom", "code": 500}


REQUEST = admission.parse_raw_review({"request": {"uid": "req-1"}})


@pytest.mark.parametrize("result,message", [
    (b"not json", "cannot interpret OPA policy result"),
    (b'[{"result": {"response": 3}}]', "invalid type: integer `3`, expected struct AdmissionResponse"),
    (b'[{"result": {"response": {"allowed": true}}}]', "missing field `uid`"),
    (b'[{"result": {"response": {"uid": 1, "allowed": true}}}]', "invalid type: integer `1`, expected a string"),
    (b'[{"result": {"response": {"uid": "x", "allowed": "yes"}}}]',
     'invalid type: string "yes", expected a boolean'),
    (b'[{"result": {"response": {"uid": "x", "allowed": true, "status": []}}}]',
     "invalid type: sequence, expected struct Status"),
    (b'[{"result": {"response": {"uid": "x", "allowed": true, "patch": 5}}}]',
     "invalid type: integer `5`, expected a base64 string"),
])
def test_uninterpretable_opa_results_keep_the_request_uid(result, message):
    response = opa_mode.response_from_opa(REQUEST, result)
    assert response == admission.internal_error("req-1", message)


def test_opa_status_keeps_only_the_status_fields_that_are_set():
    result = b'[{"result": {"response": {"uid": "x", "allowed": false, "status": {"message": "no", "code": null}}}}]'
    assert opa_mode.response_from_opa(REQUEST, result)["status"] == {"message": "no"}
    result = b'[{"result": {"response": {"uid": "x", "allowed": true, "status": {}}}}]'
    assert "status" not in opa_mode.response_from_opa(REQUEST, result)


@pytest.mark.parametrize("result,message", [
    (b"nope", "not JSON: invalid literal"),
    (b"[]", "the entrypoint is undefined (it produced no result)"),
    (b'[{"other": 1}]', "the entrypoint is undefined (it produced no result)"),
    (b"[3]", "the entrypoint is undefined (it produced no result)"),
    (b'[{"result": {"a": 1}}]', "expected a set of violations, got map"),
    (b'[{"result": ["x"]}]', 'a violation must be an object, got string "x"'),
    (b'[{"result": [{"msg": 1}]}]', "a violation's `msg` must be a string, got integer `1`"),
])
def test_uninterpretable_gatekeeper_results_say_why_and_keep_the_uid(result, message):
    response = gatekeeper_mode.response_from_gatekeeper(REQUEST, result)
    assert response["uid"] == "req-1" and response["allowed"] is False and response["status"]["code"] == 500
    assert response["status"]["message"].startswith(
        f"internal server error: cannot interpret Gatekeeper policy result: {message}")


def test_gatekeeper_answers_keep_the_uid():
    assert gatekeeper_mode.response_from_gatekeeper(REQUEST, b'[{"result": []}]') == admission.admission_response(
        "req-1", True)
    rejected = gatekeeper_mode.response_from_gatekeeper(REQUEST, b'[{"result": [{"msg": "a"}, {}, {"msg": "b"}]}]')
    assert rejected == admission.admission_response("req-1", False, status={"message": "a, b"})


def test_wasi_answer_that_is_not_json_keeps_the_uid():
    response = wasi_mode.response_from_wasi(REQUEST, b"{oops")
    assert response["uid"] == "req-1"
    assert response["status"]["message"].startswith(
        "internal server error: Cannot deserialize policy validation response: unexpected character")


def test_custom_message_keeps_the_details_and_causes_a_policy_gave():
    given = {"details": {"causes": [admission.cause("first", "spec.a")], "name": "x"}, "code": 403}
    rejected = admission.admission_response("u", False, status=given)
    result = _post(rejected, message="Custom")
    assert result["status"] == {"message": "Custom", "code": 403, "details": {
        "name": "x", "causes": [admission.cause("first", "spec.a"), admission.cause("")]}}


def test_mutation_rejected_message_names_the_policy():
    assert admission.mutation_rejected_message("p1") == (
        "Request rejected by policy p1. The policy attempted to mutate the request, but it is currently configured "
        "to not allow mutations.")
