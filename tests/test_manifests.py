"""`kwserver manifests`: the objects are valid Kubernetes objects and say what policies.yml says.

Validity is checked offline against the Kubernetes API's OpenAPI types through the official client's
models: every object deserialises into its model (required fields, types, enums the models check)
and serialises back to exactly what was generated, so no field is unknown, misspelt or mistyped.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.paths import REPO

kubernetes = pytest.importorskip("kubernetes")

EXAMPLE = REPO / "deploy" / "examples" / "policies.yml"
STATIC = REPO / "deploy" / "kubernetes" / "kwserver.yaml"
DIST = REPO / "policies" / "dist"
MODELS = {
    "ConfigMap": "V1ConfigMap", "ServiceAccount": "V1ServiceAccount", "Deployment": "V1Deployment",
    "Service": "V1Service", "PodDisruptionBudget": "V1PodDisruptionBudget",
    "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler", "NetworkPolicy": "V1NetworkPolicy",
    "ValidatingWebhookConfiguration": "V1ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration": "V1MutatingWebhookConfiguration",
    "ClusterRole": "V1ClusterRole", "ClusterRoleBinding": "V1ClusterRoleBinding",
}


def manifests(*args: str, cwd: Path = REPO) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "kwserver", "manifests", *args], capture_output=True, text=True,
                            cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in objects}


def assert_valid(obj: dict) -> None:
    client = kubernetes.client.ApiClient()
    model = client._ApiClient__deserialize(obj, MODELS[obj["kind"]])  # the client's own deserialiser
    assert client.sanitize_for_serialization(model) == obj


def metadata_of(module: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "kwserver", "inspect", str(DIST / module)], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    return yaml.safe_load(out)


def test_the_example_configuration_gives_valid_objects_of_every_kind():
    objects = manifests("--policies", str(EXAMPLE))
    for obj in objects:
        assert_valid(obj)
    assert sorted(by_kind(objects)) == sorted(set(MODELS) - {"ClusterRole", "ClusterRoleBinding"})


def test_webhooks_follow_module_metadata_and_allowed_to_mutate():
    objects = by_kind(manifests("--policies", str(EXAMPLE), "--namespace", "admission"))
    policies = yaml.safe_load(EXAMPLE.read_text())
    webhooks = {hook["clientConfig"]["service"]["path"].removeprefix("/validate/"): (kind, hook)
                for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
                for hook in objects[kind]["webhooks"]}
    assert sorted(webhooks) == sorted(policies)
    for name, policy in policies.items():
        kind, hook = webhooks[name]
        metadata = metadata_of(Path(policy["module"]).name)
        mutating = metadata["mutating"] and policy.get("allowedToMutate", False)
        assert kind == ("MutatingWebhookConfiguration" if mutating else "ValidatingWebhookConfiguration"), name
        assert hook["rules"] == metadata["rules"]
        assert hook["clientConfig"]["service"]["namespace"] == "admission"
        excluded = hook["namespaceSelector"]["matchExpressions"][0]
        assert excluded["operator"] == "NotIn" and "admission" in excluded["values"]


def test_the_pod_runs_as_the_controller_runs_a_policy_server():
    objects = by_kind(manifests("--policies", str(EXAMPLE), "--image", "registry.example/kwserver:1"))
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert container["image"] == "registry.example/kwserver:1"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    assert env["KUBEWARDEN_POLICIES"] == "/config/policies.yml" and env["KUBEWARDEN_PORT"] == "8443"
    assert {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]} == {
        "/config": True, "/pki": True, "/tmp": False}
    served = yaml.safe_load(objects["ConfigMap"]["data"]["policies.yml"])
    assert served["clusterwide-no-privileged-pod"]["module"] == "/opt/kwserver/policies/dist/pod-privileged.wasm"
    policy = objects["NetworkPolicy"]["spec"]["ingress"][0]
    assert {p["port"] for p in policy["ports"]} == {8443, 8081}
    # The reference's two ports only; Prometheus scrapes /metrics on the readiness port.
    assert [p["containerPort"] for p in container["ports"]] == [8443, 8081] and "KWSERVER_METRICS_PORT" not in env
    assert objects["Service"]["spec"]["ports"][1]["targetPort"] == "readiness"
    assert objects["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_options_change_the_objects(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    objects = manifests("--policies", str(EXAMPLE), "--name", "ps", "--replicas", "3", "--max-replicas", "7",
                        "--ca-bundle", str(ca), "--api-server-cidr", "10.0.0.1/32", "--failure-policy", "Ignore",
                        "--port", "9443")
    for obj in objects:
        assert_valid(obj)
    kinds = by_kind(objects)
    hook = kinds["ValidatingWebhookConfiguration"]["webhooks"][0]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca.read_bytes()
    assert hook["failurePolicy"] == "Ignore" and hook["clientConfig"]["service"]["name"] == "ps"
    assert "cert-manager.io/inject-ca-from" not in kinds["ValidatingWebhookConfiguration"]["metadata"]["annotations"]
    assert kinds["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 3
    assert kinds["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 7
    assert kinds["NetworkPolicy"]["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 9443


def test_the_sigstore_trust_config_travels_in_the_config_map(tmp_path):
    trust = tmp_path / "trust.json"
    trust.write_text('{"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json"}')
    kinds = by_kind(manifests("--policies", str(EXAMPLE), "--sigstore-trust-config", str(trust)))
    assert kinds["ConfigMap"]["data"]["sigstore-trust-config.json"] == trust.read_text()
    env = {e["name"]: e["value"] for e in kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEWARDEN_SIGSTORE_TRUST_CONFIG_PATH"].endswith("/sigstore-trust-config.json")


def test_context_aware_resources_get_read_only_rbac_and_groups_get_their_members_rules(tmp_path):
    (tmp_path / "policies.yml").write_text(yaml.safe_dump({
        "aware": {"module": str(DIST / "pod-privileged.wasm"), "contextAwareResources": [
            {"apiVersion": "v1", "kind": "Namespace"}, {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress"},
            {"apiVersion": "apps/v1", "kind": "Deployment"}]},
        "group": {"expression": "a() && b()", "message": "no", "policies": {
            "a": {"module": str(DIST / "apparmor-psp.wasm")}, "b": {"module": str(DIST / "safe-labels.wasm")}}},
    }))
    objects = manifests("--policies", str(tmp_path / "policies.yml"), cwd=tmp_path)
    for obj in objects:
        assert_valid(obj)
    kinds = by_kind(objects)
    rules = kinds["ClusterRole"]["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
                     {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch"]},
                     {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"],
                      "verbs": ["get", "list", "watch"]}]
    assert kinds["ClusterRoleBinding"]["subjects"][0]["name"] == "kwserver"
    assert kinds["Deployment"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    group = next(h for h in kinds["ValidatingWebhookConfiguration"]["webhooks"]
                 if h["clientConfig"]["service"]["path"] == "/validate/group")
    assert group["rules"] == metadata_of("apparmor-psp.wasm")["rules"] + metadata_of("safe-labels.wasm")["rules"]


def test_without_context_aware_policies_the_pod_gets_no_token():
    spec = by_kind(manifests("--policies", str(EXAMPLE)))["Deployment"]["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False


def test_the_static_deployment_grants_what_its_policies_read(tmp_path):
    """deploy/kubernetes/kwserver.yaml: valid objects; the Deployment runs as the ServiceAccount that the
    ClusterRoleBinding binds to a read-only role with the rules `kwserver manifests` derives from the
    ConfigMap's policies.yml."""
    documents = list(yaml.safe_load_all(STATIC.read_text()))
    for obj in documents:
        assert_valid(obj)
    kinds = by_kind(documents)
    account = kinds["ServiceAccount"]["metadata"]["name"]
    assert kinds["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == account
    binding = kinds["ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kwserver"}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": kinds["ClusterRole"]["metadata"]["name"]}
    policies = kinds["ConfigMap"]["data"]["policies.yml"].replace("/opt/kwserver/policies/dist", str(DIST))
    (tmp_path / "policies.yml").write_text(policies)
    generated = by_kind(manifests("--policies", str(tmp_path / "policies.yml"), cwd=tmp_path))
    assert kinds["ClusterRole"]["rules"] == generated["ClusterRole"]["rules"]
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in kinds["ClusterRole"]["rules"])


def test_a_module_without_metadata_rules_is_an_error(tmp_path):
    bare = tmp_path / "bare.wasm"
    bare.write_bytes(b"\0asm\x01\0\0\0")
    (tmp_path / "policies.yml").write_text(yaml.safe_dump({"p": {"module": str(bare)}}))
    result = subprocess.run([sys.executable, "-m", "kwserver", "manifests", "--policies",
                             str(tmp_path / "policies.yml")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "has no metadata rules" in result.stderr and not result.stdout
