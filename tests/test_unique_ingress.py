"""The library's context-aware policy, unique-ingress, in a kwserver connected to the local API server
(tests/support/kube_api.py): the cluster's Ingresses decide, and a change in the cluster is seen after its watch
event."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.kube_api import KubeApi, connected
from tests.support.paths import FIXTURES, REPO, load_json

pytestmark = pytest.mark.integration

MODULE = str(REPO / "policies" / "dist" / "unique-ingress.wasm")
INGRESSES = [{"apiVersion": "networking.k8s.io/v1", "kind": "Ingress"}]
GRANTED = {"module": MODULE, "contextAwareResources": INGRESSES, "hostCapabilities": ["kubernetes/list_resources_all"]}
UPSTREAM_REQUEST = FIXTURES / "kubewarden-policies" / "unique-ingress-policy" / "test_data" / "ingress.json"


def ingress_spec(*hosts: str) -> dict[str, Any]:
    return {"rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
        "service": {"name": "web", "port": {"number": 80}}}}]}} for host in hosts]}


def request(name: str, namespace: str, *hosts: str, operation: str = "CREATE") -> dict[str, Any]:
    """The upstream test request, for an Ingress `namespace/name` with these rule hosts."""
    doc = copy.deepcopy(load_json(UPSTREAM_REQUEST))
    doc.update(name=name, namespace=namespace, operation=operation)
    doc["object"]["metadata"] = {"name": name, "namespace": namespace}
    doc["object"]["spec"] = ingress_spec(*hosts)
    return doc


def verdict(server: Any, admission_request: dict[str, Any], policy: str = "unique") -> tuple[bool, Any]:
    response = server.post(f"/validate/{policy}", {"request": admission_request}).json()["response"]
    return response["allowed"], (response.get("status") or {}).get("message")


@pytest.fixture
def kube_api(tmp_path: Path):
    api = KubeApi(tmp_path).start()
    api.put("networking.k8s.io/v1", "Ingress", "shop", "team-a", spec=ingress_spec("shop.example", "api.example"))
    api.put("networking.k8s.io/v1", "Ingress", "blog", "team-b", spec=ingress_spec("blog.example"))
    yield api
    api.stop()


def test_a_host_used_by_another_ingress_is_rejected(run_server, kube_api, tmp_path):
    server = connected(run_server, kube_api, tmp_path, {"unique": GRANTED})
    assert verdict(server, request("new", "team-c", "new.example")) == (True, None)
    assert verdict(server, request("new", "team-c", "blog.example", "new.example")) == (
        False, "ingress host conflicts with an existing ingress <blog.example>")
    # one message per conflicting host, sorted, joined as Gatekeeper joins its violations
    assert verdict(server, request("new", "team-b", "shop.example", "blog.example", "api.example")) == (
        False, "ingress host conflicts with an existing ingress <api.example>, "
               "ingress host conflicts with an existing ingress <blog.example>, "
               "ingress host conflicts with an existing ingress <shop.example>")
    # an Ingress does not conflict with itself: updating `team-a/shop` keeps its hosts
    assert verdict(server, request("shop", "team-a", "shop.example", "api.example", operation="UPDATE")) == (True, None)
    # the same name in another namespace is another Ingress
    assert verdict(server, request("shop", "team-b", "shop.example"))[0] is False


def test_the_cluster_changes_are_seen_after_the_watch_event(run_server, kube_api, tmp_path):
    server = connected(run_server, kube_api, tmp_path, {"unique": GRANTED})
    blog = request("other-blog", "team-c", "blog.example")
    assert verdict(server, blog)[0] is False
    kube_api.delete("networking.k8s.io/v1", "Ingress", "blog", "team-b")
    deadline = time.monotonic() + 10
    while verdict(server, blog)[0] is False and time.monotonic() < deadline:
        time.sleep(0.1)
    assert verdict(server, blog) == (True, None)
    kube_api.put("networking.k8s.io/v1", "Ingress", "blog", "team-d", spec=ingress_spec("blog.example"))
    while verdict(server, blog)[0] is True and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    assert verdict(server, blog) == (False, "ingress host conflicts with an existing ingress <blog.example>")
    assert kube_api.count("GET /apis/networking.k8s.io/v1/ingresses?limit=") == 1  # one list, then the watch


def test_without_the_grant_the_policy_fails_with_the_reference_message(run_server, kube_api, tmp_path):
    server = connected(run_server, kube_api, tmp_path, {
        "unique": {"module": MODULE, "hostCapabilities": ["kubernetes/list_resources_all"]},
        "ungranted": {"module": MODULE, "contextAwareResources": INGRESSES}})
    allowed, message = verdict(server, request("new", "team-c", "blog.example"))
    assert allowed is False
    assert message.endswith("cannot list the Ingresses of the cluster: Policy has not been granted access to "
                            "Kubernetes networking.k8s.io/v1/Ingress resources. The violation has been reported.")
    allowed, message = verdict(server, request("new", "team-c", "blog.example"), "ungranted")
    assert allowed is False
    assert message.endswith("cannot list the Ingresses of the cluster: Policy has not been granted access to the "
                            "'kubernetes/list_resources_all' host capability. The violation has been reported.")


def test_other_kinds_and_ingresses_without_hosts_are_accepted(run_server, kube_api, tmp_path):
    server = connected(run_server, kube_api, tmp_path, {"unique": GRANTED})
    assert verdict(server, request("new", "team-c"))[0] is True
    pod = request("p", "team-c", "blog.example")
    pod["kind"] = {"group": "", "version": "v1", "kind": "Pod"}
    assert verdict(server, pod)[0] is True
