"""The reference server's integration suite against the real kwserver over HTTP."""

from __future__ import annotations

import base64
import json
import re

import jsonpatch
import pytest
import requests

from tests.support.paths import SERVER_FIXTURES, load_json, policy_path
from tests.support.server import free_port, response_of, start_server, stop_server

pytestmark = pytest.mark.integration

PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
UNPRIVILEGED = load_json(SERVER_FIXTURES / "pod_without_privileged_containers.json")
SLEEP_100MS = load_json(SERVER_FIXTURES / "pod_sleep_100ms.json")
SLEEP_4S = load_json(SERVER_FIXTURES / "pod_sleep_4s.json")
RAW_REVIEW = load_json(SERVER_FIXTURES / "raw_review.json")
RAW_MUTATION_SETTINGS = {"forbiddenResources": ["banana", "carrot"], "defaultResource": "hay"}
GROUP_MESSAGE = "The group policy rejected your request"
INTERRUPTED = {"message": "Policy execution interrupted because it exceeded the allowed execution time", "code": 500}

POLICIES = {
    "pod-privileged": {"module": policy_path("pod-privileged")},
    "pod-privileged-custom-message": {"module": policy_path("pod-privileged"), "message": "Custom error message"},
    "pod-privileged-monitor": {"module": policy_path("pod-privileged"), "policyMode": "monitor"},
    "raw-mutation": {"module": policy_path("raw-mutation"), "allowedToMutate": True,
                     "settings": RAW_MUTATION_SETTINGS},
    "raw-mutation-not-allowed": {"module": policy_path("raw-mutation"), "settings": RAW_MUTATION_SETTINGS},
    "raw-mutation-monitor": {"module": policy_path("raw-mutation"), "policyMode": "monitor",
                             "settings": RAW_MUTATION_SETTINGS},
    "sleep": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 2}},
    "sleep-1s-timeout": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 2},
                         "timeoutEvalSeconds": 1},
    "group-policy-just-pod-privileged": {
        "expression": "pod_privileged() && true", "message": GROUP_MESSAGE,
        "policies": {"pod_privileged": {"module": policy_path("pod-privileged")}},
    },
    "group-policy-arithmetic": {
        "expression": "pod_privileged() || -7 / 2 == -3 && -7 % 2 == -1 && 1 / (2 - 2) == 0",
        "message": GROUP_MESSAGE, "policies": {"pod_privileged": {"module": policy_path("pod-privileged")}},
    },
    "group-policy-monitor": {
        "expression": "pod_privileged() && true", "message": GROUP_MESSAGE, "policyMode": "monitor",
        "policies": {"pod_privileged": {"module": policy_path("pod-privileged")}},
    },
    "group-policy-just-raw-mutation": {
        "expression": "raw_mutation() && true", "message": GROUP_MESSAGE,
        "policies": {"raw_mutation": {"module": policy_path("raw-mutation"), "settings": RAW_MUTATION_SETTINGS}},
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, compile_cache):
    server = start_server(tmp_path_factory.mktemp("http"), POLICIES, compile_cache,
                          env={"KUBEWARDEN_ALWAYS_ACCEPT_ADMISSION_REVIEWS_ON_NAMESPACE": "always-ok"})
    yield server
    stop_server(server)


def test_validate(server):
    response = response_of(server.post("/validate/pod-privileged", PRIVILEGED))
    assert response["allowed"] is False
    assert response["status"] == {"message": "Privileged container is not allowed"}
    assert response["uid"] == PRIVILEGED["request"]["uid"]


def test_validate_envelope(server):
    body = server.post("/validate/pod-privileged", UNPRIVILEGED).json()
    assert body == {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "response": {
        "uid": UNPRIVILEGED["request"]["uid"], "allowed": True, "auditAnnotations": None, "warnings": None}}


def test_validate_custom_rejection_message(server):
    response = response_of(server.post("/validate/pod-privileged-custom-message", PRIVILEGED))
    assert response["allowed"] is False
    assert response["status"] == {
        "message": "Custom error message",
        "details": {"causes": [{"reason": None, "message": "Privileged container is not allowed", "field": None}]},
    }


def test_validate_policy_group_rejects(server):
    response = response_of(server.post("/validate/group-policy-just-pod-privileged", PRIVILEGED))
    assert response["allowed"] is False
    assert response["status"]["message"] == GROUP_MESSAGE
    assert response["status"]["details"]["causes"] == [
        {"reason": None, "message": "Privileged container is not allowed", "field": "spec.policies.pod_privileged"}]
    assert response["warnings"] is None


def test_validate_policy_group_accepts(server):
    response = response_of(server.post("/validate/group-policy-just-pod-privileged", UNPRIVILEGED))
    assert response["allowed"] is True
    assert "status" not in response and response["warnings"] is None


def test_policy_group_arithmetic_truncates_and_division_by_zero_is_an_evaluation_error(server):
    # Unprivileged: the member accepts and `||` skips the arithmetic.
    assert response_of(server.post("/validate/group-policy-arithmetic", UNPRIVILEGED))["allowed"] is True
    # Privileged: `-7 / 2 == -3 && -7 % 2 == -1` hold (as in Rhai), so `1 / 0` is reached and fails.
    response = response_of(server.post("/validate/group-policy-arithmetic", PRIVILEGED))
    assert response["allowed"] is False
    assert response["status"] == {"code": 500, "message": (
        "error evaluating policy group expression: Division by zero: 1 / 0")}


def test_policy_group_in_monitor_mode_accepts_and_audit_keeps_the_rejection(server):
    response = response_of(server.post("/validate/group-policy-monitor", PRIVILEGED))
    assert response == {"uid": PRIVILEGED["request"]["uid"], "allowed": True, "auditAnnotations": None,
                        "warnings": None}
    audit = response_of(server.post("/audit/group-policy-monitor", PRIVILEGED))
    assert audit["allowed"] is False and audit["status"]["message"] == GROUP_MESSAGE
    assert [c["field"] for c in audit["status"]["details"]["causes"]] == ["spec.policies.pod_privileged"]


@pytest.mark.parametrize("route", ["validate", "validate_raw", "audit"])
def test_policy_not_found(server, route):
    reply = server.post(f"/{route}/does_not_exist", PRIVILEGED)
    assert reply.status_code == 404
    assert reply.json() == {"message": "unknown policy: does_not_exist", "status": 404}


def test_group_members_are_not_addressable(server):
    assert server.post("/validate/group-policy-just-pod-privileged%2Fpod_privileged", PRIVILEGED).status_code == 404


@pytest.mark.parametrize("route,policy,json_wrapped", [
    ("validate", "pod-privileged", True), ("audit", "pod-privileged", False), ("validate_raw", "raw-mutation", False),
])
def test_invalid_payload(server, route, policy, json_wrapped):
    reply = server.post(f"/{route}/{policy}", {})
    assert reply.status_code == 422
    message = "Failed to deserialize the JSON body into the target type: missing field `request`"
    if json_wrapped:
        assert reply.json() == {"message": message, "status": 422}
    else:
        assert reply.text == message


def test_validate_raw(server):
    response = response_of(server.post("/validate_raw/raw-mutation", RAW_REVIEW))
    assert response["allowed"] is True
    assert "status" not in response
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    assert jsonpatch.apply_patch(RAW_REVIEW["request"], patch) == {**RAW_REVIEW["request"], "resource": "hay"}
    assert set(server.post("/validate_raw/raw-mutation", RAW_REVIEW).json()) == {"response"}


def test_validate_policy_group_does_not_do_mutation(server):
    response = response_of(server.post("/validate_raw/group-policy-just-raw-mutation", RAW_REVIEW))
    assert response["allowed"] is False
    assert response["status"]["message"] == GROUP_MESSAGE
    assert "patch" not in response and response["warnings"] is None
    causes = response["status"]["details"]["causes"]
    assert [c["message"] for c in causes] == ["mutation is not allowed inside of policy group"]


def test_mutation_not_allowed(server):
    response = response_of(server.post("/validate_raw/raw-mutation-not-allowed", RAW_REVIEW))
    assert response["allowed"] is False and "patch" not in response
    assert response["status"] == {"message": (
        "Request rejected by policy raw-mutation-not-allowed. The policy attempted to mutate the request, but it "
        "is currently configured to not allow mutations.")}


def test_mutation_in_monitor_mode_is_accepted_without_patch(server):
    response = response_of(server.post("/validate_raw/raw-mutation-monitor", RAW_REVIEW))
    assert response["allowed"] is True and "patch" not in response and "status" not in response


def test_monitor_mode_accepts_but_audit_keeps_the_rejection(server):
    assert response_of(server.post("/validate/pod-privileged-monitor", PRIVILEGED))["allowed"] is True
    audit = response_of(server.post("/audit/pod-privileged-monitor", PRIVILEGED))
    assert audit["allowed"] is False
    assert audit["status"] == {"message": "Privileged container is not allowed"}


def test_audit(server):
    response = response_of(server.post("/audit/pod-privileged", PRIVILEGED))
    assert response["allowed"] is False
    assert response["status"] == {"message": "Privileged container is not allowed"}


def test_always_accept_namespace(server):
    review = json.loads(json.dumps(PRIVILEGED))
    review["request"]["namespace"] = "always-ok"
    for route in ("validate", "audit"):
        response = response_of(server.post(f"/{route}/pod-privileged", review))
        assert response == {"uid": review["request"]["uid"], "allowed": True, "auditAnnotations": None,
                            "warnings": None}
    assert server.post("/validate/does_not_exist", review).status_code == 404


def test_timeout_protection_accept(server):
    assert response_of(server.post("/validate/sleep", SLEEP_100MS))["allowed"] is True


def test_timeout_protection_reject(server):
    response = response_of(server.post("/validate/sleep", SLEEP_4S))
    assert response["allowed"] is False
    assert response["status"] == INTERRUPTED
    # The worker that timed out keeps serving.
    assert response_of(server.post("/validate/sleep", SLEEP_100MS))["allowed"] is True


def test_client_errors(server):
    assert server.post("/validate/pod-privileged", data=b"{not json").status_code == 400
    reply = server.post("/audit/pod-privileged", data=b"[1,")
    assert reply.status_code == 400 and reply.text.startswith("Failed to parse the request body as JSON: ")
    reply = server.post("/validate/pod-privileged", PRIVILEGED, headers={"Content-Type": "text/plain"})
    assert reply.status_code == 415
    assert reply.json()["message"] == "Expected request with `Content-Type: application/json`"
    reply = server.post("/validate/pod-privileged", PRIVILEGED,
                        headers={"Content-Type": "application/vnd.k8s+json; charset=utf-8"})
    assert reply.status_code == 200


def test_body_limit_is_the_api_servers_3_mib(server):
    review = json.loads(json.dumps(UNPRIVILEGED))
    review["request"]["object"]["metadata"]["annotations"] = {"big": "x" * (3 * 1024 * 1024 - 20_000)}
    assert response_of(server.post("/validate/pod-privileged", review))["allowed"] is True
    review["request"]["object"]["metadata"]["annotations"] = {"big": "x" * (3 * 1024 * 1024)}
    reply = server.post("/validate/pod-privileged", review)
    assert reply.status_code == 413


def test_unknown_routes_and_methods(server):
    reply = server.session.get(server.url + "/nothing-here")
    assert reply.status_code == 404 and reply.content == b""
    assert server.session.get(server.url + "/validate/pod-privileged").status_code == 405


NOT_JSON = "Failed to parse the request body as JSON: "
WRONG_SHAPE = "Failed to deserialize the JSON body into the target type: "


def _nested_in_object(depth: int) -> bytes:
    """A valid AdmissionReview whose object holds `depth` nested lists."""
    text = json.dumps({**PRIVILEGED, "request": {**PRIVILEGED["request"], "object": "NESTED"}})
    return text.replace('"NESTED"', "[" * depth + "]" * depth).encode()


@pytest.mark.parametrize("body,admission_status,admission_message,raw_status", [
    (b"", 400, NOT_JSON + "Input is a zero-length, empty document", 400),
    (b"\xff\xfe", 400, NOT_JSON + "str is not valid UTF-8", 400),
    (b"1e999999", 400, NOT_JSON + "number is infinity", 400),
    (b"null", 422, WRONG_SHAPE + "invalid type: null, expected a map", 422),
    (b"[]", 422, WRONG_SHAPE + "invalid type: sequence, expected a map", 422),
    # A raw request may be any JSON value, null included: the policy evaluates it.
    (b'{"request": null}', 422, WRONG_SHAPE + "request: invalid type: null, expected a map", 200),
    (b'{"request": {"uid": 1}}', 422, WRONG_SHAPE + "request.uid: invalid type: integer `1`, expected a string", 200),
    # Deeper than the server writes JSON back for the policy, then deeper than it reads.
    (_nested_in_object(300), 400, NOT_JSON + "recursion limit exceeded: more than 254 nested", 400),
    (_nested_in_object(1100), 400, NOT_JSON + "depth limit exceeded", 400),
])
def test_bad_input_is_answered_precisely_and_never_kills_a_worker(server, body, admission_status,
                                                                   admission_message, raw_status):
    validate = server.post("/validate/pod-privileged", data=body)
    assert validate.status_code == admission_status
    assert validate.json()["status"] == admission_status and validate.json()["message"].startswith(admission_message)
    audit = server.post("/audit/pod-privileged", data=body)
    assert audit.status_code == admission_status and audit.text.startswith(admission_message)
    raw = server.post("/validate_raw/raw-mutation", data=body)
    assert raw.status_code == raw_status
    if raw_status == 200:
        assert raw.json()["response"] == {"uid": "", "allowed": True, "auditAnnotations": None, "warnings": None}
    assert response_of(server.post("/validate/pod-privileged", PRIVILEGED))["allowed"] is False
    assert server.process.poll() is None


def _privileged_with(**members) -> bytes:
    return json.dumps({**PRIVILEGED, "request": {**PRIVILEGED["request"], **members}}).encode()


def _privileged_user_with(**members) -> bytes:
    return _privileged_with(userInfo={**PRIVILEGED["request"]["userInfo"], **members})


@pytest.mark.parametrize("body,message", [
    # Found by fuzzing AdmissionReview bodies: a list as requestKind.kind was evaluated, then broke the metrics (500).
    (_privileged_with(requestKind={"group": "", "version": "v1", "kind": ["Pod"]}),
     "request.requestKind.kind: invalid type: sequence, expected a string"),
    (_privileged_with(requestKind=["Pod"]), "request.requestKind: invalid type: sequence, expected a map"),
    (_privileged_with(requestResource={"group": "", "version": "v1", "resource": 7}),
     "request.requestResource.resource: invalid type: integer `7`, expected a string"),
    (_privileged_with(dryRun="no"), 'request.dryRun: invalid type: string "no", expected a boolean'),
    (_privileged_with(namespace={"name": "x"}), "request.namespace: invalid type: map, expected a string"),
    (_privileged_user_with(groups="system:masters"),
     'request.userInfo.groups: invalid type: string "system:masters", expected a sequence of strings'),
    (_privileged_user_with(extra={"scopes": "x"}),
     "request.userInfo.extra: invalid type: map, expected a map of string sequences"),
    (_privileged_user_with(username=1), "request.userInfo.username: invalid type: integer `1`, expected a string"),
])
def test_a_request_member_of_the_wrong_type_is_422_as_the_reference_types_it(server, body, message):
    validate, audit = (server.post(route, data=body) for route in ("/validate/pod-privileged", "/audit/pod-privileged"))
    assert validate.status_code == audit.status_code == 422, audit.text
    assert validate.json()["message"].startswith(WRONG_SHAPE + message) and audit.text.startswith(WRONG_SHAPE + message)
    assert response_of(server.post("/validate/pod-privileged", PRIVILEGED))["allowed"] is False


def _raw_http(server, head: bytes, body_chunks=(), chunk: bytes = b"") -> tuple[bytes, bool]:
    """Send `head`, then up to `body_chunks` copies of `chunk`; what came back, and whether the server
    closed the connection before everything was sent."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        closed_early = False
        try:
            for _ in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            closed_early = True
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:
            closed_early = True
        return received, closed_early


def test_bodies_over_the_limit_get_413_and_the_connection_closes(server):
    head = (b"POST /validate/pod-privileged HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n")
    # 4 MiB: refused at once, read to the end and dropped, so the client reads the 413; then closed.
    received, closed_early = _raw_http(server, head % (4 << 20), range(4), b" " * (1 << 20))
    assert received.startswith(b"HTTP/1.1 413 ") and b"connection: close" in received.lower()
    assert b"Failed to buffer the request body: length limit exceeded" in received and not closed_early
    # 256 MiB announced: the worker stops reading after its discard bound and closes the connection.
    received, closed_early = _raw_http(server, head % (256 << 20), range(256), b" " * (1 << 20))
    assert closed_early and received.startswith(b"HTTP/1.1 413 ")
    assert response_of(server.post("/validate/pod-privileged", PRIVILEGED))["allowed"] is False


def test_readiness(server):
    reply = requests.get(f"http://127.0.0.1:{server.readiness_port}/readiness", timeout=5)
    assert reply.status_code == 200 and reply.content == b""


def test_policy_specific_timeout_overrides_global(run_server):
    server = run_server({"sleep-1s-timeout": POLICIES["sleep-1s-timeout"]}, env={"KUBEWARDEN_POLICY_TIMEOUT": "20"})
    assert response_of(server.post("/validate/sleep-1s-timeout", SLEEP_4S))["status"] == INTERRUPTED


def test_disabled_timeout_protection_ignores_per_policy_timeouts_with_a_warning(run_server):
    # As the reference since its PR #1982: --disable-timeout-protection is absolute.
    server = run_server({"sleep-1s-timeout": POLICIES["sleep-1s-timeout"], "sleep": POLICIES["sleep"]},
                        args=["--disable-timeout-protection"], env={"KUBEWARDEN_WORKERS": "1"})
    assert ("timeout protection is disabled (--disable-timeout-protection): the timeoutEvalSeconds of "
            "sleep-1s-timeout are ignored") in server.log()
    assert response_of(server.post("/validate/sleep-1s-timeout", SLEEP_4S))["allowed"] is True
    assert response_of(server.post("/validate/sleep", SLEEP_100MS))["allowed"] is True


def test_policy_initialization_errors_with_continue_on_errors(run_server):
    server = run_server({
        "invalid_settings": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": "abc"}},
        "wrong_url": {"module": f"registry://127.0.0.1:{free_port()}/kubewarden/tests/not_existing:v0.1.0"},
        "monitored_invalid": {"module": policy_path("sleeping"), "policyMode": "monitor",
                              "settings": {"sleepMilliseconds": "abc"}},
    }, args=["--continue-on-errors"])
    response = response_of(server.post("/validate/invalid_settings", SLEEP_100MS))
    assert response["allowed"] is False and response["status"]["code"] == 500
    assert re.search(r"Policy settings are invalid:.*Error decoding validation payload.*invalid type: string"
                     r".*expected u64.*", response["status"]["message"])
    response = response_of(server.post("/audit/wrong_url", SLEEP_100MS))
    assert response["allowed"] is False and response["status"]["code"] == 500
    assert re.search(r"Error while downloading policy 'wrong_url' from registry://127.0.0.1:\d+/kubewarden/tests/"
                     r"not_existing:v0.1.0: cannot connect to", response["status"]["message"])
    # Initialisation errors reject even in monitor mode.
    assert response_of(server.post("/validate/monitored_invalid", SLEEP_100MS))["allowed"] is False


def test_initialization_error_is_fatal_by_default(tmp_path, compile_cache):
    server = start_server(tmp_path, {"p": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": "x"}}},
                          compile_cache, wait=False)
    assert server.process.wait(timeout=60) != 0
    assert "Policy settings are invalid" in server.log()
