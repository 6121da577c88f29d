"""An invalid policy-group expression: fatal by default, that group's initialisation error with
--continue-on-errors (every other policy keeps serving)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from tests.support.paths import SERVER_FIXTURES, load_json, policy_path
from tests.support.server import response_of, start_server

pytestmark = pytest.mark.integration

PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
UNPRIVILEGED = load_json(SERVER_FIXTURES / "pod_without_privileged_containers.json")
MEMBER = {"module": policy_path("pod-privileged")}
POLICIES = {
    "pod-privileged": MEMBER,
    "good-group": {"expression": "pod_privileged()", "message": "rejected by the group",
                   "policies": {"pod_privileged": MEMBER}},
    "broken-group": {"expression": "pod_privileged() && not_a_member()", "message": "never shown",
                     "policyMode": "monitor", "policies": {"pod_privileged": MEMBER}},
}


def test_invalid_expression_is_that_groups_error_with_continue_on_errors(run_server):
    server = run_server(POLICIES, args=["--continue-on-errors"])
    for route in ("/validate/broken-group", "/audit/broken-group"):
        for review in (UNPRIVILEGED, PRIVILEGED):
            response = response_of(server.post(route, review))
            # Rejected even in monitor mode, like any policy that failed to initialise.
            assert response["allowed"] is False and response["status"]["code"] == 500
            message = response["status"]["message"]
            assert message.startswith("error evaluating policy group expression: ")
            assert "broken-group" in message and "Function not found: not_a_member ()" in message
    assert response_of(server.post("/validate/pod-privileged", UNPRIVILEGED))["allowed"] is True
    assert response_of(server.post("/validate/pod-privileged", PRIVILEGED))["allowed"] is False
    assert response_of(server.post("/validate/good-group", UNPRIVILEGED))["allowed"] is True
    rejected = response_of(server.post("/validate/good-group", PRIVILEGED))
    assert rejected["allowed"] is False and rejected["status"]["message"] == "rejected by the group"
    assert "policy broken-group failed to initialise" in server.log()


def test_invalid_expression_refuses_to_start_without_continue_on_errors(tmp_path, compile_cache):
    server = start_server(tmp_path, POLICIES, compile_cache, wait=False)
    assert server.process.wait(timeout=60) != 0
    log = server.log()
    assert "error while loading policies" in log
    assert "invalid expression 'pod_privileged() && not_a_member()': Function not found: not_a_member ()" in log


def test_check_names_the_group_with_the_invalid_expression(tmp_path):
    config = tmp_path / "policies.yml"
    config.write_text(yaml.safe_dump(POLICIES))
    result = subprocess.run([sys.executable, "-m", "kwserver", "check", "--policies", str(config)],
                            capture_output=True, text=True, timeout=120,
                            env={"KWSERVER_COMPILE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "pod-privileged: ok" in lines and "good-group: ok (group)" in lines
    broken = next(line for line in lines if line.startswith("broken-group: ERROR: "))
    assert "Function not found: not_a_member ()" in broken


def test_reload_switches_in_an_invalid_expression_as_that_groups_error(run_server):
    server = run_server({"pod-privileged": MEMBER}, args=["--continue-on-errors"])
    config = server.log_path.parent / "policies.yml"
    config.write_text(yaml.safe_dump(POLICIES))
    reload = subprocess.run([sys.executable, "-m", "kwserver", "reload", "--pid", str(server.process.pid)],
                            capture_output=True, text=True, timeout=30)
    assert reload.returncode == 0, reload.stderr
    deadline = time.monotonic() + 30
    while server.post("/validate/broken-group", UNPRIVILEGED).status_code == 404:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    response = response_of(server.post("/validate/broken-group", UNPRIVILEGED))
    assert response["status"]["code"] == 500 and "Function not found: not_a_member ()" in response["status"]["message"]
    assert response_of(server.post("/validate/good-group", UNPRIVILEGED))["allowed"] is True
