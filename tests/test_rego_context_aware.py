"""Context-aware OPA and Gatekeeper policies end to end: a kwserver connected through a kubeconfig to the
local API server (tests/support/kube_api.py) hands the cluster inventory to Rego modules as `data`.

No Rego compiler is available offline, so the module is written in WAT against the OPA Wasm ABI: its
`eval` rejects with the `data` document it was given as the message, which shows exactly what a compiled
Rego policy would read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import wasmtime
import yaml

from tests.support.kube_api import KubeApi, connected
from tests.support.modules import annotated, opa_module_wat, wat_string
from tests.support.paths import CONFORMANCE, REPO

pytestmark = pytest.mark.integration

# The result of `eval`: the data document, JSON-escaped between these two texts.
RESULT_TEXTS = {
    "opa": ('[{"result":{"response":{"uid":"","allowed":false,"status":{"message":"', '"}}}}]'),
    "gatekeeper": ('[{"result":[{"msg":"', '"}]}]'),
}
ENTRYPOINTS = {"opa": "policy/main", "gatekeeper": "policy/violation"}


def data_echo_wat(mode: str) -> str:
    """An OPA-ABI module whose `eval` answers with its `data` document as the rejection message."""
    prefix, suffix = RESULT_TEXTS[mode]
    definitions = f"""  (data (i32.const 4096) "{wat_string(prefix)}")
  (data (i32.const 8192) "{wat_string(suffix)}")
  (func $copy (param $dst i32) (param $src i32) (param $len i32) (result i32)
    (memory.copy (local.get $dst) (local.get $src) (local.get $len))
    (i32.add (local.get $dst) (local.get $len)))
  (func $echo_data (local $len i32) (local $src i32) (local $dst i32) (local $c i32)
    (block $end (loop $count
      (br_if $end (i32.eqz (i32.load8_u (i32.add (global.get $data) (local.get $len)))))
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (br $count)))
    (global.set $result (call $malloc (i32.add (i32.mul (local.get $len) (i32.const 2)) (i32.const 128))))
    (local.set $dst (call $copy (global.get $result) (i32.const 4096) (i32.const {len(prefix)})))
    (local.set $src (global.get $data))
    (block $done (loop $next
      (local.set $c (i32.load8_u (local.get $src)))
      (br_if $done (i32.eqz (local.get $c)))
      (if (i32.or (i32.eq (local.get $c) (i32.const 34)) (i32.eq (local.get $c) (i32.const 92)))
        (then (i32.store8 (local.get $dst) (i32.const 92)) (local.set $dst (i32.add (local.get $dst) (i32.const 1)))))
      (i32.store8 (local.get $dst) (local.get $c))
      (local.set $dst (i32.add (local.get $dst) (i32.const 1)))
      (local.set $src (i32.add (local.get $src) (i32.const 1)))
      (br $next)))
    (local.set $dst (call $copy (local.get $dst) (i32.const 8192) (i32.const {len(suffix)})))
    (i32.store8 (local.get $dst) (i32.const 0)))"""
    return opa_module_wat("(call $echo_data)", entrypoints={ENTRYPOINTS[mode]: 0}, definitions=definitions,
                          heap=16384)


def echo_policy(directory: Path, mode: str, **policy: Any) -> dict[str, Any]:
    wasm = wasmtime.wat2wasm(data_echo_wat(mode))
    return {"module": annotated(directory, f"echo-{mode}", wasm, mode), **policy}


def review(namespace: str = "team-a") -> dict[str, Any]:
    return {"request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
                        "name": "p", "namespace": namespace, "userInfo": {"username": "alice"},
                        "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}}}


def data_seen(server: Any, policy: str) -> Any:
    response = server.post(f"/validate/{policy}", review()).json()["response"]
    assert response["allowed"] is False, response
    return json.loads(response["status"]["message"])


@pytest.fixture
def kube_api(tmp_path: Path):
    api = KubeApi(tmp_path).start()
    api.put("v1", "Namespace", "default")
    api.put("v1", "Namespace", "team-a", metadata={"labels": {"team": "a"}, "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": "{...}"}})
    api.put("v1", "Service", "web", "team-a", spec={"ports": [{"port": 80}]})
    api.put("apps/v1", "Deployment", "api", "team-a", spec={"replicas": 2})
    yield api
    api.stop()


GRANTED = [{"apiVersion": "v1", "kind": "Namespace"}, {"apiVersion": "v1", "kind": "Service"},
           {"apiVersion": "apps/v1", "kind": "Deployment"}, {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress"}]


def stored(api: KubeApi, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    """An object as the inventory holds it: without managedFields and the last-applied annotation."""
    obj = json.loads(json.dumps(api.objects[api.kind(api_version, kind)][(namespace or "", name)]))
    obj["metadata"].pop("managedFields", None)
    obj["metadata"].get("annotations", {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return obj


def test_opa_data_is_the_settings_with_the_inventory_as_kubernetes(run_server, kube_api, tmp_path):
    policies = {
        "opa": echo_policy(tmp_path, "opa", contextAwareResources=GRANTED,
                           settings={"forbidden": ["x"], "kubernetes": "replaced"}),
        "plain": echo_policy(tmp_path, "opa", settings={"forbidden": ["x"]}),
    }
    server = connected(run_server, kube_api, tmp_path, policies)
    namespace = {name: stored(kube_api, "v1", "Namespace", name) for name in ("default", "team-a")}
    assert namespace["team-a"]["metadata"]["annotations"] == {}
    assert data_seen(server, "opa") == {
        "forbidden": ["x"],
        "kubernetes": {
            "namespaces": namespace,  # cluster-scoped: <plural>.<name>
            "services": {"team-a": {"web": stored(kube_api, "v1", "Service", "web", "team-a")}},
            "deployments": {"team-a": {"api": stored(kube_api, "apps/v1", "Deployment", "api", "team-a")}},
            # no Ingress in the cluster: no key, as in the reference
        },
    }
    assert "the `kubernetes` key of its settings is replaced by the cluster inventory" in server.log()
    # Without an allow-list the data is the settings alone, and the cluster is not asked.
    assert data_seen(server, "plain") == {"forbidden": ["x"]}


def test_gatekeeper_data_is_the_inventory(run_server, kube_api, tmp_path):
    policies = {
        "gk": echo_policy(tmp_path, "gatekeeper", contextAwareResources=GRANTED, settings={"p": 1}),
        "plain": echo_policy(tmp_path, "gatekeeper"),
    }
    server = connected(run_server, kube_api, tmp_path, policies)
    assert data_seen(server, "gk") == {"inventory": {
        "cluster": {"v1": {"Namespace": {name: stored(kube_api, "v1", "Namespace", name)
                                         for name in ("default", "team-a")}}},
        "namespace": {"team-a": {
            "v1": {"Service": {"web": stored(kube_api, "v1", "Service", "web", "team-a")}},
            "apps/v1": {"Deployment": {"api": stored(kube_api, "apps/v1", "Deployment", "api", "team-a")}},
        }},
    }}
    assert data_seen(server, "plain") == {}


@pytest.mark.parametrize("mode", ["opa", "gatekeeper"])
def test_the_inventory_follows_the_cluster_through_the_watch(run_server, kube_api, tmp_path, mode):
    services = [{"apiVersion": "v1", "kind": "Service"}]
    server = connected(run_server, kube_api, tmp_path,
                       {"p": echo_policy(tmp_path, mode, contextAwareResources=services)})

    def service_names() -> list[tuple[str, str]]:
        data = data_seen(server, "p")
        by_namespace = data["kubernetes"]["services"] if mode == "opa" else {
            ns: kinds["v1"]["Service"] for ns, kinds in data["inventory"]["namespace"].items()}
        return sorted((ns, name) for ns, names in by_namespace.items() for name in names)

    assert service_names() == [("team-a", "web")]
    kube_api.put("v1", "Service", "db", "default")
    kube_api.delete("v1", "Service", "web", "team-a")
    deadline = time.monotonic() + 10
    names: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        names = service_names()
        if names == [("default", "db")]:
            break
        time.sleep(0.1)
    assert names == [("default", "db")]
    assert kube_api.count("GET /api/v1/services?limit=") == 1  # one list, then the watch


@pytest.mark.parametrize("mode", ["opa", "gatekeeper"])
def test_an_unknown_kind_rejects_with_the_discovery_error(run_server, kube_api, tmp_path, mode):
    policies = {"p": echo_policy(tmp_path, mode, contextAwareResources=[{"apiVersion": "v1", "kind": "Gadget"}])}
    server = connected(run_server, kube_api, tmp_path, policies)
    response = server.post("/validate/p", review()).json()["response"]
    assert response["allowed"] is False
    assert response["status"] == {"message": "internal server error: Cannot find resource v1/Gadget", "code": 500}


def test_without_a_cluster_the_policy_rejects_with_the_reference_message(run_server, kube_api, tmp_path):
    config = kube_api.kubeconfig(tmp_path / "kubeconfig")
    kube_api.stop()
    policies = {"p": echo_policy(tmp_path, "gatekeeper", contextAwareResources=GRANTED)}
    server = run_server(policies, env={"KUBECONFIG": str(config)}, args=["--ignore-kubernetes-connection-failure"])
    response = server.post("/validate/p", review()).json()["response"]
    assert response["status"] == {"message": "internal server error: kube::Client was not initialized properly",
                                  "code": 500}


def test_an_api_server_that_goes_away_answers_from_the_last_inventory(run_server, kube_api, tmp_path):
    """The reflectors keep their copy while they retry (eventually consistent, as the reference)."""
    policies = {"p": echo_policy(tmp_path, "gatekeeper", contextAwareResources=GRANTED, timeoutEvalSeconds=2)}
    server = connected(run_server, kube_api, tmp_path, policies)
    before = data_seen(server, "p")
    kube_api.stop()
    assert data_seen(server, "p") == before


def test_kwserver_run_replays_the_inventory_lists_of_a_recorded_session(tmp_path, compile_cache):
    """As `kwctl run --replay-host-capabilities-interactions` does for upstream's unique-ingress Gatekeeper
    policy: the inventory is built from the session's recorded `KubernetesListResourceAll` answer."""
    upstream = CONFORMANCE / "fixtures/kubewarden-policies/unique-ingress-policy/test_data"
    wasm = wasmtime.wat2wasm(data_echo_wat("gatekeeper"))
    module = annotated(tmp_path, "echo", wasm, "gatekeeper",
                       contextAwareResources=[{"apiVersion": "networking.k8s.io/v1", "kind": "Ingress"}])
    result = subprocess.run(
        [sys.executable, "-m", "kwserver", "run", module, "--request-path", str(upstream / "ingress.json"),
         "--allow-context-aware", "--replay-host-capabilities-interactions", str(upstream / "k8s_ctx_duplicate.yml")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "KWSERVER_COMPILE_CACHE_DIR": str(compile_cache)})
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout.strip().splitlines()[-1])
    session = yaml.safe_load((upstream / "k8s_ctx_duplicate.yml").read_text())
    recorded = json.loads(session[0]["response"]["payload"])["items"][0]
    assert json.loads(response["status"]["message"]) == {"inventory": {
        "cluster": {}, "namespace": {"default": {"networking.k8s.io/v1": {"Ingress": {"test": recorded}}}}}}
    assert "have not been replayed" not in result.stderr


def test_a_gatekeeper_policy_decides_on_the_inventory(run_server, kube_api, tmp_path):
    """tests/policies/opa-ingress-hosts: an OPA-ABI module (no Rego compiler offline) that parses its data
    and rejects an Ingress host that another Ingress of data.inventory has, as the Rego example does."""
    kube_api.put("networking.k8s.io/v1", "Ingress", "shop", "team-a", spec={"rules": [{"host": "shop.example"}]})
    module = str(REPO / "tests" / "policies" / "opa-ingress-hosts.wasm")
    grant = [{"apiVersion": "networking.k8s.io/v1", "kind": "Ingress"}]
    server = connected(run_server, kube_api, tmp_path, {"hosts": {"module": module, "contextAwareResources": grant}})

    def ingress(namespace: str, name: str, *hosts: str) -> dict[str, Any]:
        return {"request": {"uid": "u", "kind": {"group": "networking.k8s.io", "version": "v1", "kind": "Ingress"},
                            "resource": {"group": "networking.k8s.io", "version": "v1", "resource": "ingresses"},
                            "userInfo": {"username": "alice"}, "operation": "CREATE",
                            "namespace": namespace, "name": name,
                            "object": {"metadata": {"name": name, "namespace": namespace},
                                       "spec": {"rules": [{"host": host} for host in hosts]}}}}

    def verdict(doc: dict[str, Any]) -> tuple[bool, Any]:
        response = server.post("/validate/hosts", doc).json()["response"]
        return response["allowed"], (response.get("status") or {}).get("message")

    conflict = ingress("team-b", "web", "new.example", "shop.example")
    assert verdict(conflict) == (False, "ingress host conflicts with an existing ingress <shop.example>")
    assert verdict(ingress("team-b", "web", "new.example")) == (True, None)
    assert verdict(ingress("team-a", "shop", "shop.example")) == (True, None)  # itself
    kube_api.delete("networking.k8s.io/v1", "Ingress", "shop", "team-a")
    deadline = time.monotonic() + 10
    while verdict(conflict)[0] is False and time.monotonic() < deadline:
        time.sleep(0.1)
    assert verdict(conflict) == (True, None)
