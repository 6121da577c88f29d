"""One cluster cache for the whole server: the workers ask the cache process the master supervises, so the
API server sees one list+watch per reflector however many workers answer; the cache is restarted when it
dies, and a cache that does not answer fails the callback within the policy's timeout."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support.kube_api import NAMESPACES, SERVICES, KubeApi, connected
from tests.support.modules import answer, host_policy

pytestmark = pytest.mark.integration

LIST_NAMESPACES = {"api_version": "v1", "kind": "Namespace"}


def status(server) -> dict:
    return requests.get(f"http://127.0.0.1:{server.metrics_port}/status", timeout=5).json()


def cache_pid(server) -> int:
    pids = [p["pid"] for p in status(server)["processes"] if p["role"] == "cluster-cache"]
    assert len(pids) == 1
    return pids[0]


def fresh_connection_answer(server, policy: str) -> tuple[str, object]:
    """The guest's outcome over a new connection (keep-alive would pin every call to one worker)."""
    response = requests.post(f"{server.url}/validate_raw/{policy}", json={"request": {"uid": "u"}},
                             headers={"Connection": "close"}, timeout=30).json()["response"]
    outcome, _, text = response["status"]["message"].partition(":")
    return outcome, text


def lists_and_watches(api: KubeApi, path: str) -> tuple[int, int]:
    lines = [line for line in list(api.requests) if line.partition("?")[0] == f"GET {path}"]
    watches = sum(1 for line in lines if "watch=1" in line)
    return len(lines) - watches, watches


def test_workers_share_one_list_and_watch_per_reflector(run_server, kube_api, tmp_path):
    policies = {"all": host_policy(tmp_path, "all", "list_resources_all", LIST_NAMESPACES,
                                   contextAwareResources=NAMESPACES)}
    server = connected(run_server, kube_api, tmp_path, policies, env={"KUBEWARDEN_WORKERS": "3"})
    served: list[int] = []
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(6) as pool:
        while time.monotonic() < deadline:
            outcomes = list(pool.map(lambda _: fresh_connection_answer(server, "all")[0], range(24)))
            assert set(outcomes) == {"ok"}
            served = [p["requests"] for p in status(server)["processes"] if p["role"] == "worker"]
            if sum(1 for count in served if count) >= 2:
                break
            time.sleep(0.5)
    assert sum(1 for count in served if count) >= 2, served
    assert lists_and_watches(kube_api, "/api/v1/namespaces") == (1, 1)
    assert len([p for p in status(server)["processes"] if p["role"] == "cluster-cache"]) == 1


def test_a_killed_cache_is_started_again(run_server, kube_api, tmp_path):
    policies = {"all": host_policy(tmp_path, "all", "list_resources_all", LIST_NAMESPACES,
                                   contextAwareResources=NAMESPACES, timeoutEvalSeconds=5)}
    server = connected(run_server, kube_api, tmp_path, policies)
    assert answer(server, "all")[0] == "ok"
    first = cache_pid(server)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        roles = {p["pid"]: p["role"] for p in status(server)["processes"]}
        if first not in roles and "cluster-cache" in roles.values():
            break
        time.sleep(0.2)
    assert cache_pid(server) != first
    outcome, namespaces = answer(server, "all")
    assert outcome == "ok" and [n["metadata"]["name"] for n in namespaces["items"]] == ["default", "team-a"]
    assert f"the cluster cache (pid {first}) exited" in server.log()
    # The new cache lists again: its memory died with the old one.
    assert lists_and_watches(kube_api, "/api/v1/namespaces")[0] == 2


def test_a_cache_that_does_not_answer_fails_the_call_within_the_policy_timeout(run_server, kube_api, tmp_path):
    policies = {"p": host_policy(tmp_path, "p", "list_resources_all", {"api_version": "v1", "kind": "Service"},
                                 contextAwareResources=SERVICES, timeoutEvalSeconds=2)}
    server = connected(run_server, kube_api, tmp_path, policies)
    pid = cache_pid(server)
    os.kill(pid, signal.SIGSTOP)
    try:
        # The guest reads the host error (not a timeout rejection): the call gave up before the deadline.
        assert answer(server, "p") == ("error", "cannot list v1/Service: the cluster cache did not answer in time")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert answer(server, "p")[0] == "ok"


def test_the_cache_is_bounded(run_server, kube_api, tmp_path):
    policies = {
        "namespaces": host_policy(tmp_path, "namespaces", "list_resources_all", LIST_NAMESPACES,
                                  contextAwareResources=NAMESPACES),
        "services": host_policy(tmp_path, "services", "list_resources_all", {"api_version": "v1", "kind": "Service"},
                                contextAwareResources=SERVICES),
        "team-a": host_policy(tmp_path, "team-a", "list_resources_by_namespace", {
            "api_version": "v1", "kind": "Service", "namespace": "team-a"}, contextAwareResources=SERVICES),
    }
    server = connected(run_server, kube_api, tmp_path, policies,
                       env={"KWSERVER_CLUSTER_MAX_REFLECTORS": "2", "KWSERVER_CLUSTER_MAX_OBJECTS": "3"})
    assert answer(server, "namespaces")[0] == "ok"  # 2 objects
    assert answer(server, "services") == ("error", "cannot list v1/Service: the cluster cache may hold 3 objects "
                                                   "(--cluster-max-objects) and this list would make it 4")
    assert answer(server, "team-a") == ("error", "cannot list v1/Service: the cluster cache keeps at most 2 lists "
                                                 "(--cluster-max-reflectors) and all are in use")
