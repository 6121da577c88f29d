"""Messages from guests and host errors are bounded in responses and logs: the head is kept and the
number of bytes cut is said (kwserver.truncation.MESSAGE_LIMIT_BYTES, documented in operations.md)."""

from __future__ import annotations

import copy
import json
import re

import pytest

from kwserver.truncation import MESSAGE_LIMIT_BYTES
from tests.support.paths import REPO, SERVER_FIXTURES, load_json, policy_path
from tests.support.server import response_of

pytestmark = pytest.mark.integration

REVIEW = load_json(SERVER_FIXTURES / "pod_without_privileged_containers.json")
BIG = 2_000_000
MARKER = re.compile(r"\.\.\. \(truncated, ([\d,]+) bytes\)$")
ECHO = str(REPO / "policies" / "dist" / "echo.wasm")


def review_with(change) -> dict:
    review = copy.deepcopy(REVIEW)
    change(review["request"])
    return review


def assert_bounded(message: str, full_length: int) -> str:
    """The message is the head of a `full_length`-byte text, cut at the limit, with the marker."""
    match = MARKER.search(message)
    assert match, message[-200:]
    head = message[:match.start()]
    assert len(head.encode()) == MESSAGE_LIMIT_BYTES
    assert int(match.group(1).replace(",", "")) == full_length - MESSAGE_LIMIT_BYTES
    return head


def log_growth(server, action) -> str:
    before = len(server.log())
    action()
    return server.log()[before:]


def test_a_long_guest_message_is_cut_in_the_response_and_the_log(run_server):
    server = run_server({"echo": {"module": ECHO}, "echo-monitor": {"module": ECHO, "policyMode": "monitor"}},
                        env={"KUBEWARDEN_WORKERS": "1"})

    def annotate(request: dict) -> None:
        request["object"]["metadata"]["annotations"] = {"io.kubewarden.policy.echo.create": "x" * BIG}

    # A raw request reaches the policy untouched; echo answers with all of it, as compact JSON with
    # sorted keys: more than 2 MB.
    raw = review_with(annotate)
    reply = server.post("/validate_raw/echo", raw)
    assert len(reply.content) < 2 * MESSAGE_LIMIT_BYTES
    response = response_of(reply)
    assert response["allowed"] is False and response["status"]["code"] == 418
    echoed = json.dumps(raw["request"], sort_keys=True, separators=(",", ":"))
    head = assert_bounded(response["status"]["message"], len(echoed))
    assert echoed.startswith(head)

    review = review_with(annotate)
    reply = server.post("/validate/echo", review)
    assert len(reply.content) < 2 * MESSAGE_LIMIT_BYTES and MARKER.search(response_of(reply)["status"]["message"])
    logged = log_growth(server, lambda: response_of(server.post("/validate/echo-monitor", review)))
    assert "policy evaluation (monitor mode): policy echo-monitor" in logged
    assert "(truncated, " in logged and len(logged) < 2 * MESSAGE_LIMIT_BYTES


def test_a_long_settings_error_is_cut_in_the_stored_error(run_server):
    entries = [{"readOnly": True}] * 3000  # hostpaths-psp lists every entry that lacks its pathPrefix
    server = run_server({"hostpaths": {"module": str(REPO / "policies" / "dist" / "hostpaths-psp.wasm"),
                                       "settings": {"allowedHostPaths": entries}}},
                        args=["--continue-on-errors"])
    error = "Policy settings are invalid: " + "; ".join(["pathPrefix key is missing"] * len(entries))
    message = response_of(server.post("/validate/hostpaths", REVIEW))["status"]["message"]
    assert error.startswith(assert_bounded(message, len(error)))
    assert max(len(line) for line in server.log().splitlines()) < 2 * MESSAGE_LIMIT_BYTES


@pytest.mark.parametrize("mode", ["protect", "monitor"])
def test_a_payload_the_guest_cannot_decode_is_named_not_echoed(run_server, mode):
    server = run_server({"pod-privileged": {"module": policy_path("pod-privileged"), "policyMode": mode}},
                        env={"KUBEWARDEN_WORKERS": "1"})
    # Raw: the server passes it to the guest untouched (an AdmissionReview with a string `dryRun` is a 422,
    # as the reference types it), and the guest's SDK cannot decode it.
    review = review_with(lambda request: request.update(dryRun="y" * BIG))
    sent = []
    logged = log_growth(server, lambda: sent.append(server.post("/validate_raw/pod-privileged",
                                                                {"request": review["request"]})))
    reply = sent[0]
    assert len(reply.content) < 4096
    response = response_of(reply)
    if mode == "monitor":
        assert response["allowed"] is True
        assert "policy evaluation (monitor mode)" in logged and len(logged) < 4096
        return
    assert response["allowed"] is False and response["status"]["code"] == 500
    message = response["status"]["message"]
    assert message.startswith("internal server error: Guest call failure: Error decoding validation payload: "
                              "field `request.dryRun`: invalid type: string \"yyy")
    assert "expected a boolean at line 1 column" in message and "(truncated, " in message
    assert '"uid"' not in message  # nothing else of the payload
