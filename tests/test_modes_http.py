"""WASI, OPA and Gatekeeper policies through a real kwserver (gunicorn, one worker): the conformance
cases, the result mapping, and failures (traps, aborts, timeouts, malformed results) answered with
200 + code 500 while the worker keeps serving."""

import base64
import copy
import json

import jsonpatch
import pytest
import wasmtime

from tests.support.modules import (
    GATEKEEPER_HAPPY,
    GATEKEEPER_UNHAPPY,
    OPA_NO_DEFAULT_NS,
    WASI_TESTBED,
    annotated,
    fake_opa_wasm,
    javy_host_call_wat,
    request_fixture,
)
from tests.support.paths import CONFORMANCE, as_review, load_json
from tests.support.server import start_server, stop_server

pytestmark = pytest.mark.integration

CASES = [c for c in load_json(CONFORMANCE / "expectations/runnable-cases.json")["cases"]
         if c["mode"] in ("opa", "gatekeeper")]
POD = request_fixture("fixtures/kwctl/privileged-pod.json")  # Pod `nginx` in namespace `default`
INTERRUPTED = "Policy execution interrupted because it exceeded the allowed execution time"


@pytest.fixture(scope="module")
def server(tmp_path_factory, compile_cache):
    work = tmp_path_factory.mktemp("modes")
    opa = annotated(work, "opa", OPA_NO_DEFAULT_NS.read_bytes(), "opa")
    testbed = str(WASI_TESTBED)

    def fake(name, behaviour, mode, **kwargs):
        return annotated(work, name, fake_opa_wasm(behaviour, **kwargs), mode)

    raw_settings = {"validUsers": ["wanda", "oscar"], "validActions": ["eats", "likes"],
                    "validResources": ["hay", "banana"]}
    policies = {
        "opa-no-default-ns": {"module": opa},
        "opa-by-entrypoint": {"module": opa, "entrypoint": "policy/main"},
        "opa-bad-entrypoint": {"module": opa, "entrypoint": "policy/nope"},
        "gatekeeper-happy": {"module": str(GATEKEEPER_HAPPY)},  # no metadata: mode inferred
        "gatekeeper-unhappy": {"module": str(GATEKEEPER_UNHAPPY)},
        "wasi": {"module": testbed, "settings": {"deniedNames": ["nginx"]}, "hostCapabilities": ["kubernetes/*"]},
        "wasi-raw": {"module": testbed, "settings": raw_settings, "allowedToMutate": True},
        "wasi-slow": {"module": testbed, "timeoutEvalSeconds": 1},
        "wasi-bad-settings": {"module": testbed, "settings": {"validUsers": []}},
        "wasi-javy": {"module": annotated(work, "javy", bytes(wasmtime.wat2wasm(javy_host_call_wat())), "wasi")},
        "fake-gatekeeper-echo": {"module": fake("gk-echo", "echo-input", "gatekeeper")},
        "fake-gatekeeper-trap": {"module": fake("gk-trap", "trap", "gatekeeper")},
        "fake-gatekeeper-loop": {"module": fake("gk-loop", "loop", "gatekeeper"), "timeoutEvalSeconds": 1},
        "fake-gatekeeper-deny": {"module": fake("gk-deny", "constant", "gatekeeper",
                                                entrypoints={"kubernetes/admission/deny": 0})},
        "fake-opa-echo": {"module": fake("opa-echo", "echo-input", "opa")},
        "fake-opa-abort": {"module": fake("opa-abort", "abort", "opa")},
        "fake-opa-missing-builtin": {"module": fake("opa-missing", "constant", "opa", builtins={"http.send": 0})},
        "group": {
            "policies": {"happy_policy_1": {"module": str(GATEKEEPER_HAPPY)},
                         "unhappy_policy_1": {"module": str(GATEKEEPER_UNHAPPY)},
                         "unhappy_policy_2": {"module": str(GATEKEEPER_UNHAPPY)}},
            "expression": "unhappy_policy_1() || (happy_policy_1() && unhappy_policy_2())",
            "message": "something went wrong",
        },
    }
    server = start_server(work, policies, compile_cache,
                          env={"KUBEWARDEN_WORKERS": "1", "KUBEWARDEN_CONTINUE_ON_ERRORS": "true"})
    yield server
    stop_server(server)


def validate(server, policy, request):
    answer = server.post(f"/validate/{policy}", as_review(request))
    assert answer.status_code == 200, answer.text
    return answer.json()["response"]


def validate_raw(server, policy, request):
    answer = server.post(f"/validate_raw/{policy}", {"request": request})
    assert answer.status_code == 200, answer.text
    return answer.json()["response"]


def with_behaviour(behaviour):
    request = copy.deepcopy(POD)
    request["object"]["metadata"]["annotations"] = {"kwserver.test/behaviour": behaviour}
    return request


def assert_internal_error(response, message_start):
    assert response["allowed"] is False
    assert response["status"]["code"] == 500
    assert response["status"]["message"].startswith(message_start), response["status"]["message"]


# --- conformance ---------------------------------------------------------------------------------------------

def _policy_for(case):
    if case["mode"] == "opa":
        return "opa-no-default-ns"
    return "gatekeeper-happy" if "happy_policy" in case["policy"] and "unhappy" not in case["policy"] \
        else "gatekeeper-unhappy"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_conformance_case(server, case):
    request = request_fixture(case["request"])
    response = validate(server, _policy_for(case), request)
    assert response["uid"] == request["uid"]
    assert response["allowed"] is case["expect"]["allowed"]
    if "message" in case["expect"]:
        assert response["status"]["message"] == case["expect"]["message"]
    else:
        assert "status" not in response


def test_opa_entrypoint_chosen_by_name(server):
    assert validate(server, "opa-by-entrypoint", POD)["status"]["message"] == "you cannot use the default namespace"


def test_opa_raw_request(server):
    in_default = {"uid": "raw-1", "object": {"metadata": {"namespace": "default"}}}
    rejected = validate_raw(server, "opa-no-default-ns", in_default)
    assert rejected["uid"] == "raw-1"
    assert rejected["status"]["message"] == "you cannot use the default namespace"
    assert validate_raw(server, "opa-no-default-ns", {"uid": "raw-2", "object": {"metadata": {"namespace": "a"}}})[
        "allowed"] is True


def test_gatekeeper_rejects_raw_requests(server):
    response = validate_raw(server, "gatekeeper-happy", {"uid": "raw-3"})
    assert response["status"] == {
        "message": "internal server error: Gatekeeper does not support raw validation requests", "code": 500}


def test_gatekeeper_policy_group(server):
    response = validate(server, "group", load_json(
        CONFORMANCE / "fixtures/kubewarden-policy-evaluator/group_scale_update_request.json"))
    assert response["allowed"] is False
    assert response["status"]["message"] == "something went wrong"
    causes = response["status"]["details"]["causes"]
    assert {"field": "spec.policies.unhappy_policy_1", "message": "failing as expected", "reason": None} in causes
    assert {"field": "spec.policies.unhappy_policy_2", "message": "failing as expected", "reason": None} in causes


def test_initialization_errors_reject_with_the_reason(server):
    assert_internal_error(validate(server, "opa-bad-entrypoint", POD), "bootstrap failure: opa-bad-entrypoint: "
                          "entrypoint `policy/nope` not found in the module (available: policy/main)")
    assert_internal_error(validate(server, "fake-opa-missing-builtin", POD),
                          "bootstrap failure: fake-opa-missing-builtin: Missing Rego builtins: http.send")
    assert_internal_error(validate(server, "wasi-bad-settings", POD),
                          "Policy settings are invalid: validUsers must be a non-empty list of strings")


def test_gatekeeper_entrypoint_that_is_not_violation_warns_at_startup(server):
    assert "fake-gatekeeper-deny: Gatekeeper entrypoint 0 is `kubernetes/admission/deny`, not a `violation` rule" \
        in server.log()


# --- failures: 200 + code 500, and the worker keeps serving ------------------------------------------------------

def test_uninterpretable_results_fail_closed(server):
    assert_internal_error(validate(server, "fake-gatekeeper-echo", POD),
                          "internal server error: cannot interpret Gatekeeper policy result")
    assert_internal_error(validate(server, "fake-opa-echo", POD),
                          "internal server error: cannot interpret OPA policy result")


def test_rego_traps_aborts_and_timeouts(server):
    assert_internal_error(validate(server, "fake-gatekeeper-trap", POD),
                          "internal server error: wasm trap: wasm `unreachable` instruction executed")
    assert_internal_error(validate(server, "fake-opa-abort", POD),
                          "internal server error: opa_abort: aborting on purpose")
    assert_internal_error(validate(server, "fake-gatekeeper-loop", POD),
                          "internal server error: guest code interrupted, execution deadline exceeded")
    # the same policies answer again (fresh instances), and so does everything else
    assert_internal_error(validate(server, "fake-opa-abort", POD), "internal server error: opa_abort")
    assert validate(server, "gatekeeper-unhappy", POD)["status"]["message"] == "failing as expected"
    assert validate(server, "opa-no-default-ns", POD)["allowed"] is False


def test_wasi_validation(server):
    assert validate(server, "wasi", POD)["status"] == {"message": "The 'nginx' name is on the deny list"}
    other = copy.deepcopy(POD)
    other["object"]["metadata"]["name"] = "apache"
    assert validate(server, "wasi", other)["allowed"] is True
    assert validate_raw(server, "wasi-raw", {"user": "wanda", "action": "eats", "resource": "hay"})["allowed"]
    assert validate_raw(server, "wasi-raw", {"user": "tonio", "action": "eats", "resource": "spinach"})[
        "status"] == {"message": "this request is not accepted"}
    coded = validate(server, "wasi", with_behaviour("stderr-then-reject"))
    assert coded["status"] == {"message": "rejected after writing to stderr", "code": 418}


def test_wasi_mutation(server):
    request = {"uid": "m1", "behaviour": "mutate", "resource": "hay"}
    response = validate_raw(server, "wasi-raw", request)
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    assert patch == [{"op": "replace", "path": "/resource", "value": "mutated"}]
    assert jsonpatch.apply_patch(request, patch) == {**request, "resource": "mutated"}


def test_wasi_host_calls(server):
    message = validate(server, "wasi", with_behaviour("host-call"))["status"]["message"]
    # granted kubernetes/*, but no contextAwareResources: that allow-list refuses the Kubernetes call
    assert message == ('log: 0 ""; list_resources_all: 1 Policy has not been granted access to Kubernetes '
                       'v1/Namespace resources. The violation has been reported.')
    # no hostCapabilities at all: no call but logging goes through
    assert validate(server, "wasi-javy", POD)["status"]["message"] == \
        ("javy host call returned 1: Policy has not been granted access to the 'kubernetes/list_resources_all' "
         "host capability. The violation has been reported.")


@pytest.mark.parametrize(("behaviour", "message"), [
    ("panic", "thread 'main' panicked at 'boom: the policy panicked on purpose'"),
    ("exit", "exiting with code 3 on purpose"),
    ("silent-exit", "the policy exited with code 4"),
    ("silent-trap", "the policy trapped: wasm trap: wasm `unreachable` instruction executed"),
    ("garbage", "internal server error: Cannot deserialize policy validation response: "),
    ("no-accepted", "internal server error: Cannot deserialize policy validation response: missing field `accepted`"),
])
def test_wasi_failures(server, behaviour, message):
    assert_internal_error(validate(server, "wasi", with_behaviour(behaviour)), message)
    assert validate(server, "wasi", POD)["status"]["message"] == "The 'nginx' name is on the deny list"


def test_wasi_timeout_says_so_and_keeps_stderr(server):
    response = validate(server, "wasi-slow", with_behaviour("busy-loop"))
    assert response["status"] == {"message": f"{INTERRUPTED}; policy stderr: looping forever", "code": 500}
    response = validate(server, "wasi-slow", with_behaviour("sleep"))
    assert response["status"] == {"message": f"{INTERRUPTED}; policy stderr: sleeping for an hour", "code": 500}
    assert validate(server, "wasi-slow", POD)["allowed"] is True


def test_audit_endpoint_serves_rego_policies(server):
    answer = server.post("/audit/gatekeeper-unhappy", as_review(POD))
    assert answer.status_code == 200
    assert json.loads(answer.text)["response"]["status"]["message"] == "failing as expected"
