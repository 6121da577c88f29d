import base64
import json

import jsonpatch
import pytest

from kwserver import admission
from kwserver.admission import RequestShapeError
from tests.conftest import SERVER_FIXTURES, load_json

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
    return admission.response_from_validation(
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
    response = admission.response_from_validation(request, b'{"accepted":true,"mutated_object":{"a":1}}')
    assert response["allowed"] is False
    assert response["status"] == {"message": admission.NULL_OBJECT_MUTATION}


@pytest.mark.parametrize("raw,message", [
    (b"not json", "internal server error: invalid response from policy:"),
    (b'{"message":"x"}', "internal server error: invalid response from policy: missing field `accepted`"),
])
def test_invalid_policy_responses(raw, message):
    request = admission.parse_raw_review({"request": {}})
    response = admission.response_from_validation(request, raw)
    assert response["allowed"] is False
    assert response["status"]["code"] == 500
    assert response["status"]["message"].startswith(message)


def test_status_only_when_message_or_code():
    request = admission.parse_raw_review({"request": {}})
    response = admission.response_from_validation(
        request, b'{"accepted":false,"message":"no","code":403,"warnings":["w"],"audit_annotations":{"a":"b"}}')
    assert response == {"uid": "", "allowed": False, "status": {"message": "no", "code": 403},
                        "auditAnnotations": {"a": "b"}, "warnings": ["w"]}
    accepted = admission.response_from_validation(request, b'{"accepted":true}')
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
