"""Policies on one module share a worker's instance, and each evaluation still runs as its own policy."""

from __future__ import annotations

import copy
import json
import time

import pytest
import requests

from tests.support.paths import SERVER_FIXTURES, load_json, policy_path

pytestmark = pytest.mark.integration

SLEEP_100MS = load_json(SERVER_FIXTURES / "pod_sleep_100ms.json")


def _raw(user: str) -> dict:
    return {"request": {"user": user, "action": "eats", "resource": "hay"}}


def _raw_validation(user: str) -> dict:
    return {"module": policy_path("raw-validation"),
            "settings": {"validUsers": [user], "validActions": ["eats"], "validResources": ["hay"]}}


def _sleeping(milliseconds: int) -> dict:
    pod = copy.deepcopy(SLEEP_100MS)
    pod["request"]["object"]["metadata"]["annotations"]["kubewarden.sleep_duration_milliseconds"] = milliseconds
    return pod


def _published_instances(server, served: int) -> dict[str, float]:
    """Idle instances per `instance` label, once the worker has published `served` requests."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    deadline = time.monotonic() + 10
    while True:
        lines = requests.get(url, timeout=10).text.splitlines()
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in lines
                      if line.startswith("kwserver_worker_requests_total "))
        if counted == served or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    instances = {}
    for line in lines:
        if line.startswith("kwserver_policy_instances{"):
            label = line[line.index('instance="') + 10:]
            instances[label[:label.index('"')]] = float(line.rsplit(" ", 1)[1])
    return instances


def test_policies_on_one_module_share_an_instance_with_their_own_settings(run_server):
    server = run_server({"alice-only": _raw_validation("alice"), "bob-only": _raw_validation("bob")},
                        env={"KUBEWARDEN_WORKERS": "1"})
    for _ in range(3):
        for policy, accepted, rejected in (("alice-only", "alice", "bob"), ("bob-only", "bob", "alice")):
            assert server.post(f"/validate_raw/{policy}", _raw(accepted)).json()["response"]["allowed"] is True
            answer = server.post(f"/validate_raw/{policy}", _raw(rejected)).json()["response"]
            assert answer["allowed"] is False and answer["status"]["message"] == "this request is not accepted"
    instances = _published_instances(server, served=12)
    # One instance, named after the policies that share it.
    assert instances == {"alice-only, bob-only": 1.0}, instances


def test_own_instance_opts_out_of_sharing(run_server):
    server = run_server({"alice-only": _raw_validation("alice"),
                         "bob-only": {**_raw_validation("bob"), "ownInstance": True}},
                        env={"KUBEWARDEN_WORKERS": "1"})
    assert server.post("/validate_raw/alice-only", _raw("alice")).json()["response"]["allowed"] is True
    assert server.post("/validate_raw/bob-only", _raw("bob")).json()["response"]["allowed"] is True
    instances = _published_instances(server, served=2)
    assert instances == {"alice-only": 1.0, "bob-only": 1.0}, instances


def test_host_calls_name_the_policy_that_made_them(run_server):
    server = run_server({"first": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 1}},
                         "second": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 1}}},
                        env={"KUBEWARDEN_WORKERS": "1", "KUBEWARDEN_LOG_FMT": "json",
                             "KUBEWARDEN_LOG_LEVEL": "info"})
    order = ["first", "second", "second", "first", "second"]
    for policy in order:
        assert server.post(f"/validate/{policy}", _sleeping(1)).json()["response"]["allowed"] is True
    time.sleep(0.5)
    logged = [json.loads(line)["fields"]["policy_id"] for line in server.log().splitlines()
              if line.startswith("{") and "sleeping for 1 milliseconds" in line]
    assert logged == order


def test_a_timed_out_policy_does_not_change_another_policys_answer(run_server):
    sleeping = {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 1}}
    server = run_server({"slow": {**sleeping, "timeoutEvalSeconds": 1}, "quick": sleeping},
                        env={"KUBEWARDEN_WORKERS": "1"})
    assert server.post("/validate/quick", _sleeping(1)).json()["response"]["allowed"] is True
    interrupted = server.post("/validate/slow", _sleeping(3000)).json()["response"]
    assert interrupted["allowed"] is False and interrupted["status"]["code"] == 500
    # The interrupted instance was thrown away; the other policy of the module gets a sound one.
    for _ in range(3):
        assert server.post("/validate/quick", _sleeping(1)).json()["response"]["allowed"] is True
