"""Kubernetes callbacks end to end: a kwserver connected through a kubeconfig to a local HTTPS API server
(tests/support/kube_api.py), and a waPC guest that makes one host call and answers with what the host said."""

from __future__ import annotations

import time

import pytest

from tests.support.kube_api import NAMESPACES, SERVICES, connected
from tests.support.modules import answer, host_policy
from tests.support.server import metrics_text, wait_for

pytestmark = pytest.mark.integration


def test_list_get_and_can_i_answer_from_the_cluster(run_server, kube_api, tmp_path):
    kube_api.grants.add(("alice", "create", "pods", "team-a"))
    policies = {
        "by-namespace": host_policy(tmp_path, "by-namespace", "list_resources_by_namespace", {
            "api_version": "v1", "kind": "Service", "namespace": "team-a"}, contextAwareResources=SERVICES),
        "all": host_policy(tmp_path, "all", "list_resources_all", {"api_version": "v1", "kind": "Namespace"},
                           contextAwareResources=NAMESPACES),
        "labelled": host_policy(tmp_path, "labelled", "list_resources_all", {
            "api_version": "v1", "kind": "Namespace", "label_selector": "team=a"}, contextAwareResources=NAMESPACES),
        "get": host_policy(tmp_path, "get", "get_resource", {
            "api_version": "v1", "kind": "Namespace", "name": "team-a", "disable_cache": False},
            contextAwareResources=NAMESPACES),
        "can-i": host_policy(tmp_path, "can-i", "can_i", {"subject_access_review": {
            "user": "alice", "groups": None, "resource_attributes": {
                "namespace": "team-a", "verb": "create", "resource": "pods"}}, "disable_cache": False}),
        "cannot": host_policy(tmp_path, "cannot", "can_i", {"subject_access_review": {
            "user": "bob", "resource_attributes": {"verb": "delete", "resource": "pods"}}, "disable_cache": True}),
    }
    server = connected(run_server, kube_api, tmp_path, policies)

    outcome, services = answer(server, "by-namespace")
    assert outcome == "ok"
    assert services["apiVersion"] == "v1" and services["kind"] == "ServiceList" and services["metadata"] == {}
    assert [(s["metadata"]["namespace"], s["metadata"]["name"]) for s in services["items"]] == [("team-a", "web")]
    assert services["items"][0]["kind"] == "Service"

    outcome, namespaces = answer(server, "all")
    assert [n["metadata"]["name"] for n in namespaces["items"]] == ["default", "team-a"]
    team = namespaces["items"][1]["metadata"]
    assert "managedFields" not in team and team["annotations"] == {"owner": "alice"}

    assert [n["metadata"]["name"] for n in answer(server, "labelled")[1]["items"]] == ["team-a"]

    outcome, namespace = answer(server, "get")
    assert outcome == "ok" and namespace["kind"] == "Namespace" and namespace["metadata"]["name"] == "team-a"

    assert answer(server, "can-i") == ("ok", {"allowed": True, "reason": "granted by the test"})
    assert answer(server, "cannot")[1]["allowed"] is False


def test_lists_follow_the_cluster_through_the_watch(run_server, kube_api, tmp_path):
    policies = {"all": host_policy(tmp_path, "all", "list_resources_all", {"api_version": "v1", "kind": "Namespace"},
                                   contextAwareResources=NAMESPACES)}
    server = connected(run_server, kube_api, tmp_path, policies)
    assert len(answer(server, "all")[1]["items"]) == 2
    kube_api.put("v1", "Namespace", "team-b")
    kube_api.delete("v1", "Namespace", "default")
    deadline = time.monotonic() + 10
    names: list[str] = []
    while time.monotonic() < deadline:
        names = [n["metadata"]["name"] for n in answer(server, "all")[1]["items"]]
        if names == ["team-a", "team-b"]:
            break
        time.sleep(0.1)
    assert names == ["team-a", "team-b"]
    # One list, then watches: later answers come from the reflector, not from new lists.
    lists = [line for line in kube_api.requests if line.startswith("GET /api/v1/namespaces?")]
    assert sum(1 for line in lists if "watch=1" not in line) == 1


def test_get_resource_is_cached_unless_disabled(run_server, kube_api, tmp_path):
    payload = {"api_version": "v1", "kind": "Service", "name": "web", "namespace": "team-a"}
    policies = {
        "cached": host_policy(tmp_path, "cached", "get_resource", {**payload, "disable_cache": False},
                              contextAwareResources=SERVICES),
        "uncached": host_policy(tmp_path, "uncached", "get_resource", {**payload, "disable_cache": True},
                                contextAwareResources=SERVICES),
    }
    server = connected(run_server, kube_api, tmp_path, policies)
    path = "GET /api/v1/namespaces/team-a/services/web"
    for _ in range(3):
        assert answer(server, "cached")[0] == "ok"
    assert kube_api.count(path) == 1
    for _ in range(3):
        assert answer(server, "uncached")[0] == "ok"
    assert kube_api.count(path) == 4


@pytest.mark.parametrize("operation,payload,allowed,message", [
    ("list_resources_all", {"api_version": "v1", "kind": "Pod"}, SERVICES,
     "Policy has not been granted access to Kubernetes v1/Pod resources. The violation has been reported."),
    ("get_resource", {"api_version": "v1", "kind": "service", "name": "web", "namespace": "team-a",
                      "disable_cache": False}, SERVICES,
     "Policy has not been granted access to Kubernetes v1/service resources. The violation has been reported."),
    ("list_resources_all", {"api_version": "v1", "kind": "Gadget"}, [{"apiVersion": "v1", "kind": "Gadget"}],
     "Cannot find resource v1/Gadget"),
    ("list_resources_by_namespace", {"api_version": "v1", "kind": "Namespace", "namespace": "team-a"}, NAMESPACES,
     "resource v1/Namespace is cluster wide. Cannot search for it inside of a namespace"),
    ("get_resource", {"api_version": "v1", "kind": "Service", "name": "web", "disable_cache": False}, SERVICES,
     "Resource v1/Service is namespaced, but no namespace was provided"),
    ("get_resource", {"api_version": "v1", "kind": "Service", "name": "nope", "namespace": "team-a",
                      "disable_cache": False}, SERVICES,
     "Cannot find v1/Service named 'nope' inside of namespace 'Some(\"team-a\")'"),
    ("get_resource", {"api_version": "v1", "kind": "Namespace", "name": "nope", "disable_cache": False}, NAMESPACES,
     "Cannot find v1/Namespace named 'nope' inside of namespace 'None'"),
])
def test_callback_errors(run_server, kube_api, tmp_path, operation, payload, allowed, message):
    policies = {"p": host_policy(tmp_path, "p", operation, payload, contextAwareResources=allowed)}
    server = connected(run_server, kube_api, tmp_path, policies)
    assert answer(server, "p") == ("error", message)
    if "granted" in message:
        assert f"policy p tried to access Kubernetes {payload['api_version']}/{payload['kind']}" in server.log()


def test_without_a_reachable_cluster(run_server, kube_api, tmp_path):
    policies = {"p": host_policy(tmp_path, "p", "list_resources_all", {"api_version": "v1", "kind": "Service"},
                                 contextAwareResources=SERVICES, timeoutEvalSeconds=2)}
    config = kube_api.kubeconfig(tmp_path / "kubeconfig")
    kube_api.stop()
    server = run_server(policies, env={"KUBECONFIG": str(config)}, wait=False)
    assert server.process.wait(timeout=60) == 1
    assert "Cannot connect to Kubernetes, context aware policies would not work properly" in server.log()

    server = run_server(policies, env={"KUBECONFIG": str(config)}, args=["--ignore-kubernetes-connection-failure"])
    assert answer(server, "p") == ("error", "kube::Client was not initialized properly")


def test_an_api_server_that_goes_away_fails_the_call_within_the_policy_timeout(run_server, kube_api, tmp_path):
    payload = {"api_version": "v1", "kind": "Service", "name": "web", "namespace": "team-a", "disable_cache": True}
    policies = {"p": host_policy(tmp_path, "p", "get_resource", payload, contextAwareResources=SERVICES,
                                 timeoutEvalSeconds=2)}
    server = connected(run_server, kube_api, tmp_path, policies)
    assert answer(server, "p")[0] == "ok"
    kube_api.stop()
    outcome, text = answer(server, "p")
    assert outcome == "error" and text.startswith("cannot get v1/Service web:")


def test_wrong_credentials_are_a_startup_failure(run_server, kube_api, tmp_path):
    config = kube_api.kubeconfig(tmp_path / "kubeconfig", token="wrong")
    policies = {"p": host_policy(tmp_path, "p", "list_resources_all", {"api_version": "v1", "kind": "Service"},
                                 contextAwareResources=SERVICES)}
    server = run_server(policies, env={"KUBECONFIG": str(config)}, wait=False)
    assert server.process.wait(timeout=60) == 1
    assert "401" in server.log()


def test_field_masks_prune_lists_and_gets(run_server, kube_api, tmp_path):
    kube_api.put("v1", "Service", "wide", "team-a", spec={
        "type": "ClusterIP", "clusterIP": "10.0.0.7", "ports": [{"port": 443, "protocol": "TCP", "name": "https"}]},
        status={"loadBalancer": {}})
    masked = ["spec.ports.port", "spec.type"]
    policies = {
        "list": host_policy(tmp_path, "list", "list_resources_by_namespace", {
            "api_version": "v1", "kind": "Service", "namespace": "team-a", "field_masks": masked},
            contextAwareResources=SERVICES),
        "whole": host_policy(tmp_path, "whole", "list_resources_by_namespace", {
            "api_version": "v1", "kind": "Service", "namespace": "team-a"}, contextAwareResources=SERVICES),
        "get": host_policy(tmp_path, "get", "get_resource", {
            "api_version": "v1", "kind": "Service", "name": "wide", "namespace": "team-a", "disable_cache": False,
            "field_masks": masked}, contextAwareResources=SERVICES),
        "absent": host_policy(tmp_path, "absent", "get_resource", {
            "api_version": "v1", "kind": "Service", "name": "wide", "namespace": "team-a", "disable_cache": False,
            "field_masks": ["spec.nothing", "nothing.either"]}, contextAwareResources=SERVICES),
        "wrong": host_policy(tmp_path, "wrong", "get_resource", {
            "api_version": "v1", "kind": "Service", "name": "wide", "namespace": "team-a", "disable_cache": False,
            "field_masks": "spec"}, contextAwareResources=SERVICES),
    }
    server = connected(run_server, kube_api, tmp_path, policies)

    outcome, services = answer(server, "list")
    assert outcome == "ok"
    wide = services["items"][1]
    assert wide["spec"] == {"type": "ClusterIP", "ports": [{"port": 443}]} and "status" not in wide
    assert wide["metadata"]["name"] == "wide" and wide["apiVersion"] == "v1" and wide["kind"] == "Service"
    assert answer(server, "whole")[1]["items"][1]["spec"]["clusterIP"] == "10.0.0.7"  # a list of its own

    outcome, service = answer(server, "get")
    assert outcome == "ok" and service["spec"] == {"type": "ClusterIP", "ports": [{"port": 443}]}
    outcome, service = answer(server, "absent")
    assert outcome == "ok" and service["spec"] == {} and set(service) == {"apiVersion", "kind", "metadata", "spec"}
    assert answer(server, "wrong") == ("error", 'invalid type: string "spec", expected a sequence')


def test_the_cluster_cache_stores_objects_pruned(kube_api, tmp_path, monkeypatch):
    from kwserver.cluster.client import ClusterClient
    from kwserver.cluster.connection import load_config, open_http

    kube_api.put("v1", "Service", "wide", "team-a", spec={"ports": [{"port": 443, "name": "https"}],
                                                          "clusterIP": "10.0.0.7"})
    monkeypatch.setenv("KUBECONFIG", str(kube_api.kubeconfig(tmp_path / "kubeconfig")))
    client = ClusterClient(open_http(load_config()))
    try:
        client.list("v1", "Service", None, None, None, 10.0, masks=["spec.ports.port"])
        client.list("v1", "Service", None, None, None, 10.0)
        kept = {key[-1]: reflector.objects for key, reflector in client.reflectors.items()}
        assert set(kept) == {("spec.ports.port",), None}
        assert all(b'"ports":[{"port":' in obj for obj in kept[("spec.ports.port",)].values())
        assert sum(map(len, kept[("spec.ports.port",)].values())) < sum(map(len, kept[None].values()))
        pruned = client.get("v1", "Service", "web", "team-a", False, 10.0, masks=["metadata"])
        assert b'"spec"' not in pruned and client.answers.stats().bytes < 1024
        whole = client.get("v1", "Service", "web", "team-a", False, 10.0)
        assert client.answers.stats().bytes - 1024 > len(whole) - len(pruned) > 0  # each kept as answered
    finally:
        client.close()


def test_the_legacy_binding_is_an_unknown_binding(run_server, kube_api, tmp_path):
    policies = {"legacy": host_policy(tmp_path, "legacy", "list", {}, binding="kubernetes", namespace="services",
                                      hostCapabilities=["*"])}
    server = connected(run_server, kube_api, tmp_path, policies)
    assert answer(server, "legacy") == ("error", "unknown binding: kubernetes")
    assert not [line for line in kube_api.requests if "/services" in line]


def test_refused_calls_are_logged_and_counted_and_caches_are_measured(run_server, kube_api, tmp_path):
    review = {"subject_access_review": {"user": "alice", "resource_attributes": {"verb": "get", "resource": "pods"}},
              "disable_cache": False}
    policies = {
        "namespaced-team-a-p": host_policy(tmp_path, "p", "can_i", review, hostCapabilities=["oci/*"]),
        "get": host_policy(tmp_path, "get", "get_resource", {
            "api_version": "v1", "kind": "Namespace", "name": "team-a", "disable_cache": False},
            contextAwareResources=NAMESPACES),
    }
    server = connected(run_server, kube_api, tmp_path, policies, env={"KUBEWARDEN_WORKERS": "1"})
    assert answer(server, "namespaced-team-a-p") == ("error", "Policy has not been granted access to the "
                                                     "'kubernetes/can_i' host capability. The violation has been "
                                                     "reported.")
    assert answer(server, "get")[0] == "ok"
    assert not [line for line in kube_api.requests if "subjectaccessreviews" in line]
    assert ("policy namespaced-team-a-p tried to use the host capability kubernetes/can_i it has not been "
            "granted (allowed: [oci/*])") in server.log()
    expected = ['kwserver_host_capability_denials_total{capability="kubernetes/can_i",'
                'policy_name="namespaced-team-a-p"} 1.0', 'kwserver_host_cache_entries{cache="cluster_answers"} 1.0',
                'kwserver_cluster_cache_lists 0.0']
    # Workers publish every second, the cache process every 5.
    wait_for(lambda: all(line in metrics_text(server) for line in expected), timeout=15, interval=0.5)
