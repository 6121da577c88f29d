"""Cluster access follows the configuration: a reload that adds the first policy reading the cluster
connects and starts the cluster cache, one that removes the last stops it (once the workers still
serving the old configuration have exited), as a fresh start would; requests meanwhile never fail."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.kube_api import NAMESPACES, connected
from tests.support.modules import host_policy
from tests.support.paths import SERVER_FIXTURES, load_json, policy_path
from tests.support.server import Load, wait_for

pytestmark = pytest.mark.integration

PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
PLAIN = {"pod-privileged": {"module": policy_path("pod-privileged")}}
RAW = {"request": {"uid": "u"}}


def cache_processes(server) -> list[int]:
    status = requests.get(f"http://127.0.0.1:{server.metrics_port}/status", timeout=5).json()
    return [p["pid"] for p in status["processes"] if p["role"] == "cluster-cache"]


def lists_the_cluster(reply: requests.Response) -> bool:
    """The context-aware policy answered with the namespaces, or (before it is loaded, after it is
    removed) it is unknown; a failed Kubernetes call or any other answer is a failure."""
    if reply.status_code == 404:
        return True
    return reply.status_code == 200 and reply.json()["response"]["status"]["message"].startswith("ok:")


def test_a_reload_turns_cluster_access_on_and_off_under_load(run_server, kube_api, tmp_path):
    reading = {**PLAIN, "namespaces": host_policy(tmp_path, "namespaces", "list_resources_all",
                                                  {"api_version": "v1", "kind": "Namespace"},
                                                  contextAwareResources=NAMESPACES)}
    server = connected(run_server, kube_api, tmp_path, PLAIN)
    config = Path(server.log_path).parent / "policies.yml"
    assert "no policy reads the cluster: not connecting to Kubernetes" in server.log()
    assert cache_processes(server) == [] and not kube_api.requests

    with Load(server, "/validate/pod-privileged", PRIVILEGED, threads=2) as plain, \
            Load(server, "/validate_raw/namespaces", RAW, threads=2, accept=lists_the_cluster) as cluster:
        config.write_text(yaml.safe_dump(reading))
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(lambda: server.post("/validate_raw/namespaces", RAW).status_code == 200, timeout=60)
        assert len(cache_processes(server)) == 1
        assert "connected to Kubernetes at" in server.log()
        served = cluster.count
        wait_for(lambda: cluster.count > served + 20)

        config.write_text(yaml.safe_dump(PLAIN))
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(lambda: "the cluster cache stops once the current workers exit" in server.log(), timeout=60)
        # The old workers finish on the old configuration, with the cache; it stops after them.
        wait_for(lambda: cache_processes(server) == [], timeout=60)
        wait_for(lambda: server.post("/validate_raw/namespaces", RAW).status_code == 404, timeout=30)
        served = plain.count
        wait_for(lambda: plain.count > served + 20)

    assert plain.failures == [] and cluster.failures == []
    assert plain.count > 50 and cluster.count > 50
