"""The policy library (policies/dist/) through the HTTP API of a real kwserver.

One server, started once for the module, hosts every policy with the settings each case needs; the
request fixtures are the upstream Kubewarden policies' own test data. Per policy: accept, reject with
the exact message, mutate (the returned JSON Patch applied to the object gives the expected object),
invalid settings with the exact message (the server runs with continue-on-errors, so a policy whose
settings are invalid answers every request with a code-500 rejection carrying the error), and the
server-side rules for mutating policies (allowedToMutate: false, monitor mode).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.support.paths import FIXTURES, REPO, load_json
from tests.support.paths import upstream_request as fixture
from tests.support.registries import push_library, start_registry
from tests.support.server import start_server, stop_server

pytestmark = pytest.mark.integration

LIBRARY = REPO / "policies"
DIST = LIBRARY / "dist"
UPSTREAM = FIXTURES / "kubewarden-policies"
NAMES = [
    "allow-privilege-escalation-psp", "apparmor-psp", "capabilities-psp", "deprecated-api-versions", "echo",
    "host-namespaces-psp", "hostpaths-psp", "pod-privileged", "safe-labels", "unique-ingress", "user-group-psp",
]


def module(name: str) -> str:
    return str(DIST / f"{name}.wasm")


def settings_file(path: str) -> dict[str, Any]:
    return load_json(UPSTREAM / path)


UG = "user-group-psp-policy/test_data/"
UG_E2E = UG + "e2e/"
HOSTPATHS_SEVERAL = [
    {"pathPrefix": "/data", "readOnly": False},
    {"pathPrefix": "/va", "readOnly": True},
    {"pathPrefix": "/var/local/aaa", "readOnly": True},
]
UG_RANGE = {"rule": "MustRunAs", "ranges": [{"min": 1000, "max": 1010}]}
NON_ROOT = {"run_as_user": {"rule": "MustRunAsNonRoot"}, "run_as_group": {"rule": "RunAsAny"},
            "supplemental_groups": {"rule": "RunAsAny"}}

# policy id -> (module, settings, extra policies.yml keys)
POLICIES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "pod-privileged": ("pod-privileged", {}, {}),
    "pod-privileged-skip": ("pod-privileged", settings_file(
        "pod-privileged-policy/test_data/settings_skip_init_and_ephemeral_containers.json"), {}),
    "ape": ("allow-privilege-escalation-psp", {}, {}),
    "ape-default-false": ("allow-privilege-escalation-psp", {"default_allow_privilege_escalation": False},
                          {"allowedToMutate": True}),
    "ape-not-allowed-to-mutate": ("allow-privilege-escalation-psp", {"default_allow_privilege_escalation": False},
                                  {}),
    "ape-monitor": ("allow-privilege-escalation-psp", {"default_allow_privilege_escalation": False},
                    {"policyMode": "monitor"}),
    "caps": ("capabilities-psp", {"allowed_capabilities": ["NET_ADMIN", "SYS_TIME"],
                                  "required_drop_capabilities": ["SYS_PTRACE"]}, {"allowedToMutate": True}),
    "caps-none-allowed": ("capabilities-psp", {}, {"allowedToMutate": True}),
    "caps-must-drop": ("capabilities-psp", {"allowed_capabilities": ["*"],
                                            "required_drop_capabilities": ["NET_ADMIN", "SYS_TIME"]},
                       {"allowedToMutate": True}),
    "caps-default-add": ("capabilities-psp", {"allowed_capabilities": ["NET_ADMIN", "SYS_TIME", "KILL"],
                                              "default_add_capabilities": ["NET_ADMIN", "SYS_TIME"]},
                         {"allowedToMutate": True}),
    "caps-drop-all": ("capabilities-psp", {"required_drop_capabilities": ["ALL"]}, {"allowedToMutate": True}),
    "caps-drop-all-not-allowed-to-mutate": ("capabilities-psp", {"required_drop_capabilities": ["ALL"]}, {}),
    "caps-drop-all-monitor": ("capabilities-psp", {"required_drop_capabilities": ["ALL"]},
                              {"policyMode": "monitor", "allowedToMutate": True}),
    "host-namespaces": ("host-namespaces-psp", {}, {}),
    "host-namespaces-upstream": ("host-namespaces-psp", settings_file(
        "host-namespaces-psp-policy/test_data/settings.json"), {}),
    "host-namespaces-open": ("host-namespaces-psp", {"allow_host_ipc": True, "allow_host_network": True,
                                                     "allow_host_pid": True,
                                                     "allow_host_ports": [{"min": 440, "max": 450}]}, {}),
    "host-namespaces-no-ports": ("host-namespaces-psp", {"allow_host_ipc": True, "allow_host_network": True,
                                                         "allow_host_pid": True}, {}),
    "hostpaths": ("hostpaths-psp", {"allowedHostPaths": HOSTPATHS_SEVERAL}, {}),
    "hostpaths-not-listed": ("hostpaths-psp", {"allowedHostPaths": [{"pathPrefix": "/var", "readOnly": False},
                                                                    {"pathPrefix": "/var/local/aaa",
                                                                     "readOnly": False}]}, {}),
    "hostpaths-precedence": ("hostpaths-psp", {"allowedHostPaths": [{"pathPrefix": "/var", "readOnly": False},
                                                                    {"pathPrefix": "/var/local",
                                                                     "readOnly": True}]}, {}),
    "hostpaths-empty": ("hostpaths-psp", {}, {}),
    "apparmor": ("apparmor-psp", {"allowed_profiles": ["runtime/default"]}, {}),
    "apparmor-custom": ("apparmor-psp", {"allowed_profiles": ["runtime/default", "localhost/cognac-cointreau-lemon"]},
                        {}),
    "echo": ("echo", {}, {}),
    "ug-must-run-as": ("user-group-psp", settings_file(UG_E2E + "settings_must_run_as.json"),
                       {"allowedToMutate": True}),
    "ug-must-run-as-100-200": ("user-group-psp", settings_file(UG_E2E + "settings_must_run_as_100_200.json"),
                               {"allowedToMutate": True}),
    "ug-overwrite": ("user-group-psp", settings_file(UG_E2E + "settings_must_run_as_overwrite.json"),
                     {"allowedToMutate": True}),
    "ug-may-run-as": ("user-group-psp", settings_file(UG_E2E + "settings_may_run_as.json"),
                      {"allowedToMutate": True}),
    "ug-non-root": ("user-group-psp", NON_ROOT, {"allowedToMutate": True}),
    "ug-non-root-not-allowed-to-mutate": ("user-group-psp", NON_ROOT, {}),
    "ug-non-root-monitor": ("user-group-psp", NON_ROOT, {"policyMode": "monitor"}),
    "ug-validate-only": ("user-group-psp", settings_file(UG_E2E + "settings_must_run_as_validate_only.json"),
                         {"allowedToMutate": True}),
    "ug-non-root-validate-only": ("user-group-psp", settings_file(
        UG_E2E + "settings_must_run_as_non_root_validate_only.json"), {"allowedToMutate": True}),
    "ug-image": ("user-group-psp", settings_file(UG_E2E + "settings_run_as_any_and_validate_container.json"),
                 {"allowedToMutate": True}),
    "safe-labels": ("safe-labels", {"denied_labels": ["owner"], "mandatory_labels": ["app", "cc-center"],
                                    "constrained_labels": {"cc-center": r"^cc-\d+$"}}, {}),
    "safe-labels-ok": ("safe-labels", {"mandatory_labels": ["owner"], "constrained_labels": {"cc-center": r"cc-\d+"}},
                       {}),
    "deprecated": ("deprecated-api-versions", {"kubernetes_version": "1.25.0"}, {}),
    "deprecated-lenient": ("deprecated-api-versions", {"kubernetes_version": "v1.19.0", "deny_on_deprecation": False},
                           {}),
    "deprecated-strict": ("deprecated-api-versions", {"kubernetes_version": "1.19.0"}, {}),
    # Invalid settings: the server stores the error and rejects every request with it.
    "bad-pod-privileged": ("pod-privileged", {"skip_init_containers": "yes"}, {}),
    "bad-ape": ("allow-privilege-escalation-psp", {"default_allow_privilege_escalation": 1}, {}),
    "bad-caps": ("capabilities-psp", {"allowed_capabilities": ["SYS_TIME", "KILL"],
                                      "required_drop_capabilities": ["KILL"]}, {}),
    "bad-caps-default": ("capabilities-psp", {"allowed_capabilities": ["SYS_TIME"],
                                              "default_add_capabilities": ["NET_ADMIN", "KILL"]}, {}),
    "bad-caps-default-dropped": ("capabilities-psp", {"allowed_capabilities": ["*"],
                                                      "required_drop_capabilities": ["KILL", "NET_RAW"],
                                                      "default_add_capabilities": ["NET_RAW", "KILL"]}, {}),
    "bad-host-namespaces": ("host-namespaces-psp", {"allow_host_ports": [{"min": 443, "max": 80}]}, {}),
    "bad-hostpaths": ("hostpaths-psp", {"allowedHostPaths": [{"readOnly": True}, {"pathPrefix": "/foo"}]}, {}),
    "bad-apparmor": ("apparmor-psp", {"allowed_profiles": "runtime/default"}, {}),
    "bad-ug": ("user-group-psp", {"run_as_user": {"rule": "MustRunAs"}}, {}),
    "bad-ug-range": ("user-group-psp", {"run_as_user": {"rule": "MustRunAs", "ranges": [{"min": 11, "max": 10}]}},
                     {}),
    "bad-ug-rule": ("user-group-psp", {"run_as_user": {"rule": "MayRunAs", "ranges": [{"min": 1, "max": 10}]}}, {}),
    "bad-ug-overwrite": ("user-group-psp", {"run_as_group": {"rule": "RunAsAny", "overwrite": True}}, {}),
    "bad-ug-unknown-rule": ("user-group-psp", {"supplemental_groups": {"rule": "Sometimes"}}, {}),
    "bad-ug-overwrite-may-run-as": ("user-group-psp", {"run_as_group": {**UG_RANGE, "rule": "MayRunAs",
                                                                        "overwrite": True}}, {}),
    "bad-ug-overwrite-non-root": ("user-group-psp", {"run_as_user": {"rule": "MustRunAsNonRoot", "overwrite": True}},
                                  {}),
    "bad-ug-group-range": ("user-group-psp", {"run_as_group": {"rule": "MustRunAs"}}, {}),
    "bad-ug-supplemental-range": ("user-group-psp", {"supplemental_groups": {"rule": "MayRunAs",
                                                                             "ranges": [{"min": 5, "max": 1}]}}, {}),
    "bad-ug-validate-only-overwrite": ("user-group-psp", settings_file(
        UG_E2E + "settings_must_run_as_overwrite_validate_only.json"), {}),
    **{f"bad-ug-validate-only-overwrite-{key}": (
        "user-group-psp", {"validate_only": True, key: {**UG_RANGE, "overwrite": True}}, {})
       for key in ("run_as_user", "run_as_group", "supplemental_groups")},
    # A rule error comes first, as upstream.
    "bad-ug-validate-only-overwrite-run-as-any": ("user-group-psp", {
        "validate_only": True, "run_as_group": {"rule": "RunAsAny", "overwrite": True}}, {}),
    "bad-ug-image-configuration": ("user-group-psp", settings_file(
        UG_E2E + "settings_invalid_container_image_verification.json"), {}),
    "bad-safe-labels": ("safe-labels", {"constrained_labels": {"cost-center": "cc-[a+"}}, {}),
    "bad-safe-labels-conflict": ("safe-labels", {"denied_labels": ["foo", "owner"], "mandatory_labels": ["owner"],
                                                 "constrained_labels": {"foo": ".*"}}, {}),
    "bad-deprecated": ("deprecated-api-versions", {}, {}),
    "bad-deprecated-version": ("deprecated-api-versions", {"kubernetes_version": "0.0.1"}, {}),
    "bad-deprecated-pre-release": ("deprecated-api-versions", {"kubernetes_version": "1.25.0-01"}, {}),
    "bad-safe-labels-constrained-denied": ("safe-labels", {"denied_labels": ["foo", "cc-center"],
                                                           "constrained_labels": {"cc-center": r"^cc-\d+$"}}, {}),
    "bad-safe-labels-mandatory-denied": ("safe-labels", {"denied_labels": ["foo", "cc-center"],
                                                         "mandatory_labels": ["cc-center"]}, {}),
}


@pytest.fixture(scope="module", params=["files", "registry"])
def server(request, tmp_path_factory, compile_cache):
    """The library from its files, then the same tests with every module pulled from a registry."""
    directory = tmp_path_factory.mktemp("library")
    env = {"KUBEWARDEN_CONTINUE_ON_ERRORS": "true"}
    source, registry = module, None
    if request.param == "registry":
        registry = start_registry(directory / "registry")
        sources = directory / "sources.yml"
        sources.write_text(yaml.safe_dump({"insecure_sources": [registry.host]}))
        references = push_library(registry, DIST, sources, directory)
        source = references.__getitem__
        env.update(KUBEWARDEN_SOURCES_PATH=str(sources), KUBEWARDEN_POLICIES_DOWNLOAD_DIR=str(directory / "dl"))
    config = {name: {"module": source(mod), "settings": settings, **extra}
              for name, (mod, settings, extra) in POLICIES.items()}
    server = start_server(directory, config, compile_cache, env=env)
    yield server
    stop_server(server)
    if registry is not None:
        registry.stop()


def review(server, policy: str, request: dict[str, Any]) -> dict[str, Any]:
    reply = server.post(f"/validate/{policy}", {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                                 "request": request})
    assert reply.status_code == 200, reply.text
    response = reply.json()["response"]
    assert response["uid"] == request["uid"]
    return response


def assert_accepted(response: dict[str, Any]) -> None:
    assert response["allowed"] is True, response
    assert "status" not in response and "patch" not in response, response


def assert_rejected(response: dict[str, Any], message: str, code: int | None = None) -> None:
    assert response["allowed"] is False, response
    assert "patch" not in response
    expected = {"message": message} if code is None else {"message": message, "code": code}
    assert response["status"] == expected


def patched(request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True, response
    assert "status" not in response
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(request["object"], patch)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The Pod spec of a Pod or of a workload (fixtures do not always carry `kind`)."""
    spec = obj["spec"]
    if "jobTemplate" in spec:
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"] if "template" in spec else spec


def expect(request: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The request's object after `change(pod_spec)`."""
    expected = copy.deepcopy(request["object"])
    change(pod_spec(expected))
    return expected


# --- pod-privileged ------------------------------------------------------------------------------

PP = "pod-privileged-policy/test_data/"


@pytest.mark.parametrize("policy,path,message", [
    ("pod-privileged", "privileged_container.json", "Privileged container is not allowed"),
    ("pod-privileged", "privileged_init_container.json", "Privileged init container is not allowed"),
    ("pod-privileged", "privileged_ephemeral_container.json", "Privileged ephemeral container is not allowed"),
    ("pod-privileged", "deployment_with_privileged_containers.json", "Privileged container is not allowed"),
    ("pod-privileged", "statefulset_with_privileged_container.json", "Privileged container is not allowed"),
    ("pod-privileged-skip", "privileged_container.json", "Privileged container is not allowed"),
    ("pod-privileged", "no_privileged_containers.json", None),
    ("pod-privileged-skip", "privileged_init_container.json", None),
    ("pod-privileged-skip", "privileged_ephemeral_container.json", None),
])
def test_pod_privileged(server, policy, path, message):
    response = review(server, policy, fixture(PP + path))
    if message is None:
        assert_accepted(response)
    else:
        assert_rejected(response, message)


def test_pod_privileged_ignores_other_kinds(server):
    assert_accepted(review(server, "pod-privileged", fixture("safe-labels-policy/test_data/ingress.json")))


# --- allow-privilege-escalation-psp -----------------------------------------------------------------

APE = "allow-privilege-escalation-psp-policy/test_data/"


@pytest.mark.parametrize("policy,path,message", [
    ("ape", "req_pod_with_container_with_security_context_and_allowPrivilegeEscalation.json",
     "one of the containers has privilege escalation enabled"),
    ("ape", "req_pod_with_init_container_with_security_context_and_allowPrivilegeEscalation.json",
     "one of the init containers has privilege escalation enabled"),
    ("ape-default-false", "deployment_with_allow_privileged_escalation.json",
     "one of the containers has privilege escalation enabled"),
    ("ape", "req_pod_without_security_context.json", None),
    ("ape", "req_pod_with_allowPrivilegeEscalation_disabled.json", None),
    ("ape-default-false", "req_pod_with_allowPrivilegeEscalation_disabled.json", None),
])
def test_allow_privilege_escalation(server, policy, path, message):
    response = review(server, policy, fixture(APE + path))
    if message is None:
        assert_accepted(response)
    else:
        assert_rejected(response, message)


def test_allow_privilege_escalation_both_lists_escalate(server):
    request = fixture(APE + "req_pod_with_init_container_with_security_context_and_allowPrivilegeEscalation.json")
    request = copy.deepcopy(request)
    request["object"]["spec"]["containers"][0]["securityContext"] = {"allowPrivilegeEscalation": True}
    assert_rejected(review(server, "ape", request), "one of the init containers has privilege escalation enabled, "
                                                    "one of the containers has privilege escalation enabled")


def test_allow_privilege_escalation_mutates(server):
    request = fixture(APE + "req_pod_without_security_context.json")

    def change(spec):
        for container in spec["containers"]:
            container["securityContext"] = {"allowPrivilegeEscalation": False}

    assert patched(request, review(server, "ape-default-false", request)) == expect(request, change)


def test_allow_privilege_escalation_mutates_deployment_keeping_other_fields(server):
    request = copy.deepcopy(fixture(APE + "deployment_with_allow_privileged_escalation.json"))
    spec = pod_spec(request["object"])
    spec["containers"][0]["securityContext"] = {"runAsNonRoot": True}
    spec["initContainers"] = [{"name": "init", "image": "busybox",
                               "securityContext": {"allowPrivilegeEscalation": False}}]

    def change(spec):
        spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = False

    assert patched(request, review(server, "ape-default-false", request)) == expect(request, change)


# --- capabilities-psp --------------------------------------------------------------------------------

CAPS = "capabilities-psp-policy/test_data/"


@pytest.mark.parametrize("policy,path,message", [
    ("caps-none-allowed", "req_pod_with_container_with_capabilities_added.json",
     'PSP capabilities policies doesn\'t allow these capabilities to be added: {"NET_ADMIN", "SYS_TIME"}'),
    ("caps-none-allowed", "req_pod_with_container_with_capabilities_added_for_deployment.json",
     'PSP capabilities policies doesn\'t allow these capabilities to be added: {"NET_ADMIN", "SYS_TIME"}'),
    ("caps-must-drop", "req_pod_with_container_with_capabilities_added.json",
     "PSP capabilities policies doesn't allow these capabilities to be added because they are on the "
     '`required_drop_capabilities` list: {"NET_ADMIN", "SYS_TIME"}'),
    ("caps", "req_pod_with_allowed_capabilities_reject.json",
     'PSP capabilities policies doesn\'t allow these capabilities to be added: {"BPF"}'),
    ("caps", "req_pod_with_container_with_capabilities_added.json", None),
])
def test_capabilities(server, policy, path, message):
    response = review(server, policy, fixture(CAPS + path))
    if message is None:
        assert_accepted(response)
    else:
        assert_rejected(response, message)


def test_capabilities_mutates_containers_that_lack_defaults(server):
    request = fixture(CAPS + "req_pod_with_container_with_capabilities_added_and_sidecar.json")

    def change(spec):
        # the first container already adds both; only the sidecar is completed
        spec["containers"][1]["securityContext"] = {"capabilities": {"add": ["NET_ADMIN", "SYS_TIME"], "drop": []}}

    assert patched(request, review(server, "caps-default-add", request)) == expect(request, change)


def test_capabilities_mutates_deployment(server):
    request = fixture(CAPS + "req_pod_with_mutate_capabilities_for_deployment.json")

    def change(spec):
        spec["containers"][0]["securityContext"]["capabilities"] = {"add": ["KILL", "NET_ADMIN", "SYS_TIME"],
                                                                    "drop": []}

    assert patched(request, review(server, "caps-default-add", request)) == expect(request, change)


def test_capabilities_drop_all_keeps_other_security_settings(server):
    request = fixture(CAPS + "panic.json")

    def change(spec):
        for container in spec["containers"]:
            container["securityContext"] = {**(container.get("securityContext") or {}),
                                            "capabilities": {"add": [], "drop": ["ALL"]}}

    expected = expect(request, change)
    assert pod_spec(expected)["containers"][1]["securityContext"]["allowPrivilegeEscalation"] is False
    assert patched(request, review(server, "caps-drop-all", request)) == expected


# --- host-namespaces-psp --------------------------------------------------------------------------

HN = "host-namespaces-psp-policy/test_data/"


def host_namespaces_request(**spec_fields: Any) -> dict[str, Any]:
    request = copy.deepcopy(fixture(HN + "pod_request.json"))
    spec = request["object"]["spec"]
    for key in ("hostIPC", "hostNetwork", "hostPID"):
        spec[key] = False
    spec.update(spec_fields)
    return request


@pytest.mark.parametrize("policy,request_,message", [
    ("host-namespaces", fixture(HN + "pod_request.json"), "Pod has IPC enabled, but this is not allowed"),
    ("host-namespaces-upstream", fixture(HN + "deployment_request.json"),
     "Pod has IPC enabled, but this is not allowed"),
    ("host-namespaces", host_namespaces_request(hostNetwork=True),
     "Pod has host network enabled, but this is not allowed"),
    ("host-namespaces", host_namespaces_request(hostPID=True), "Pod has host PID enabled, but this is not allowed"),
    ("host-namespaces", host_namespaces_request(), "Pod is using unallowed host ports in containers"),
    ("host-namespaces-no-ports", fixture(HN + "deployment_request.json"),
     "Pod is using unallowed host ports in containers"),
    ("host-namespaces-open", host_namespaces_request(initContainers=[
        {"name": "init", "image": "busybox", "ports": [{"containerPort": 80, "hostPort": 80}]}]),
     "Pod is using unallowed host ports in init containers"),
    ("host-namespaces-open", fixture(HN + "pod_request.json"), None),
    ("host-namespaces-open", fixture(HN + "deployment_request.json"), None),
])
def test_host_namespaces(server, policy, request_, message):
    response = review(server, policy, request_)
    if message is None:
        assert_accepted(response)
    else:
        assert_rejected(response, message)


# --- hostpaths-psp --------------------------------------------------------------------------------

HP = "hostpaths-psp-policy/test_data/"
SEVERAL_ERRORS = "\n".join([
    "hostPath '/data' mounted as 'test-data' should be readOnly 'false'",
    "hostPath '/var' mounted as 'test-var' is not in the AllowedHostPaths list",
    "hostPath '/var' mounted as 'test-var' is not in the AllowedHostPaths list",
    "hostPath '/var/local/aaa' mounted as 'test-var-local-aaa' should be readOnly 'true'",
    "hostPath '/var/local/aaa' mounted as 'test-var-local-aaa' should be readOnly 'true'",
])


@pytest.mark.parametrize("policy,path,message,code", [
    ("hostpaths", "request-pod-hostpaths.json", SEVERAL_ERRORS, None),
    ("hostpaths-not-listed", "request-pod-hostpaths.json",
     "hostPath '/data' mounted as 'test-data' is not in the AllowedHostPaths list", None),
    ("hostpaths-precedence", "request-pod-precedence-least.json",
     "hostPath '/var/local/aaa' mounted as 'test-var-local-aaa' should be readOnly 'true'", None),
    ("hostpaths", "../../safe-labels-policy/test_data/ingress.json", "object should be one of these kinds: "
     "Deployment, ReplicaSet, StatefulSet, DaemonSet, ReplicationController, Job, CronJob, Pod", 400),
    ("hostpaths-precedence", "request-pod-precedence.json", None, None),
    ("hostpaths-precedence", "request-pod-multiple-containers.json", None, None),
    ("hostpaths", "request-pod-no-hostpaths.json", None, None),
    ("hostpaths-empty", "request-pod-hostpaths.json", None, None),
])
def test_hostpaths(server, policy, path, message, code):
    response = review(server, policy, fixture(HP + path))
    if message is None:
        assert_accepted(response)
    else:
        assert_rejected(response, message, code)


def test_hostpaths_workloads(server):
    pod = fixture(HP + "request-pod-hostpaths.json")
    request = copy.deepcopy(fixture("user-group-psp-policy/test_data/job_with_no_securitycontext.json"))
    request["object"]["spec"]["template"]["spec"] = copy.deepcopy(pod["object"]["spec"])
    assert_rejected(review(server, "hostpaths", request), SEVERAL_ERRORS)


# --- apparmor-psp ---------------------------------------------------------------------------------

AA = "apparmor-psp-policy/test_data/"


@pytest.mark.parametrize("policy,path,message", [
    ("apparmor", "pod_invalid.json", 'These AppArmor profiles are not allowed: ["unconfined"]'),
    ("apparmor", "req_pod_with_custom_apparmor_profile.json",
     'These AppArmor profiles are not allowed: ["localhost/cognac-cointreau-lemon"]'),
    ("apparmor", "pod_valid.json", None),
    ("apparmor", "pod_no_profile.json", None),
    ("apparmor", "req_pod_without_apparmor_profile.json", None),
    ("apparmor-custom", "req_pod_with_custom_apparmor_profile.json", None),
])
def test_apparmor(server, policy, path, message):
    response = review(server, policy, fixture(AA + path))
    if message is None:
        assert_accepted(response)
    else:
        assert_rejected(response, message)


# --- echo -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("operation", ["create", "update", "delete"])
def test_echo(server, operation):
    assert_accepted(review(server, "echo", fixture(f"echo/test_data/{operation}_accept.json")))
    request = fixture(f"echo/test_data/{operation}_reject.json")
    response = review(server, "echo", request)
    assert response["allowed"] is False
    assert response["status"]["code"] == 418
    message = response["status"]["message"]
    echoed = json.loads(message)
    # The AdmissionRequest the server sent, as compact JSON with sorted keys.
    assert message == json.dumps(echoed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for key in ("uid", "kind", "resource", "operation", "userInfo", "object", "oldObject"):
        if request.get(key) is not None:
            assert echoed[key] == request[key], key


def test_echo_raw_requests_are_accepted(server):
    reply = server.post("/validate_raw/echo", {"request": {"user": "tonio", "action": "eats"}})
    assert reply.status_code == 200
    assert reply.json()["response"]["allowed"] is True


# --- user-group-psp -------------------------------------------------------------------------------

@pytest.mark.parametrize("policy,path,message", [
    ("ug-must-run-as", UG_E2E + "invalid_user_id.json", "User ID outside defined ranges"),
    ("ug-must-run-as", UG_E2E + "invalid_group_id.json", "Group ID is outside defined ranges"),
    ("ug-must-run-as", UG_E2E + "invalid_supplemental_group_.json", "Group ID is outside defined ranges"),
    ("ug-may-run-as", UG_E2E + "invalid_group_id.json", "Group ID is outside defined ranges"),
    ("ug-may-run-as", UG_E2E + "invalid_supplemental_group_.json", "Group ID is outside defined ranges"),
    ("ug-non-root", UG_E2E + "zero_as_user_id.json", "Invalid user ID: cannot run container with root ID (0)"),
    ("ug-validate-only", UG_E2E + "empty_security_context_pod.json", "Missing user ID"),
    ("ug-non-root-validate-only", UG_E2E + "empty_security_context_pod.json", "RunAsNonRoot should be set to true"),
    ("ug-must-run-as-100-200", UG_E2E + "pod_user_150.json", None),
    ("ug-may-run-as", UG_E2E + "empty_security_context_pod.json", None),
    ("ug-validate-only", UG_E2E + "invalid_container_image_user_id.json", None),
    ("ug-non-root-validate-only", UG_E2E + "pod_user_150.json", None),
])
def test_user_group(server, policy, path, message):
    response = review(server, policy, fixture(path))
    if message is None:
        assert_accepted(response)
    else:
        assert_rejected(response, message)


@pytest.mark.parametrize("kind", ["cronjob", "daemonset", "deployment", "job", "replicaset",
                                  "replicationcontroller", "statefulset"])
def test_user_group_workloads(server, kind):
    assert_rejected(review(server, "ug-non-root", fixture(f"{UG}{kind}_root_user.json")),
                    "Invalid user ID: cannot run container with root ID (0)")
    request = fixture(f"{UG}{kind}_with_no_securitycontext.json")

    def change(spec):
        spec["containers"][0]["securityContext"] = {"runAsNonRoot": True}
        spec["securityContext"] = {**(spec.get("securityContext") or {}), "runAsNonRoot": True}

    assert patched(request, review(server, "ug-non-root", request)) == expect(request, change)


def test_user_group_must_run_as_fills_in_defaults(server):
    request = fixture(UG_E2E + "empty_security_context_pod.json")

    def change(spec):
        for container in spec.get("initContainers", []) + spec["containers"]:
            container["securityContext"] = {**(container.get("securityContext") or {}),
                                            "runAsUser": 1000, "runAsGroup": 1000}
        spec["securityContext"].update({"runAsUser": 1000, "runAsGroup": 1000, "supplementalGroups": [1000]})

    assert patched(request, review(server, "ug-must-run-as", request)) == expect(request, change)


def test_user_group_overwrite(server):
    request = fixture(UG_E2E + "valid_security_context.json")

    def change(spec):
        for container in spec.get("initContainers", []) + spec["containers"]:
            container["securityContext"] = {**(container.get("securityContext") or {}),
                                            "runAsUser": 1000, "runAsGroup": 1000}
        spec["securityContext"].update({"runAsUser": 1000, "runAsGroup": 1000, "supplementalGroups": [1000]})

    assert patched(request, review(server, "ug-overwrite", request)) == expect(request, change)


def test_user_group_rejection_ignores_allowed_to_mutate(server):
    assert_rejected(review(server, "ug-non-root-not-allowed-to-mutate", fixture(UG_E2E + "zero_as_user_id.json")),
                    "Invalid user ID: cannot run container with root ID (0)")


def test_user_group_image_configuration_needs_the_oci_capability(server):
    # kwserver has no OCI host capability: the policy reports the failed host call.
    request = fixture(UG_E2E + "empty_security_context_pod.json")
    response = review(server, "ug-image", request)
    assert response["allowed"] is False
    assert response["status"]["message"].startswith("Cannot fetch the manifest and configuration of image ")


# --- safe-labels ----------------------------------------------------------------------------------

def test_safe_labels(server):
    request = fixture("safe-labels-policy/test_data/ingress.json")
    assert_rejected(review(server, "safe-labels", request),
                    "The following labels are denied: owner. The following labels are violating user constraints: "
                    "cc-center. The following mandatory labels are missing: app")
    assert_accepted(review(server, "safe-labels-ok", request))


# --- deprecated-api-versions ----------------------------------------------------------------------

DEPRECATED = "deprecated-api-versions-policy/test_data/"
INGRESS_MESSAGE = ("extensions/v1beta1 Ingress cannot be used. It has been deprecated starting from 1.14.0. "
                   "It has been removed starting from 1.22.0. It has been replaced by networking.k8s.io/v1.")


@pytest.mark.parametrize("policy,path,message", [
    ("deprecated", "ingress_creation.json", INGRESS_MESSAGE),
    ("deprecated-strict", "deprecated_ingress.json", INGRESS_MESSAGE),
    ("deprecated-lenient", "ingress_creation.json", None),
    ("deprecated", "valid_ingress.json", None),
])
def test_deprecated_api_versions(server, policy, path, message):
    response = review(server, policy, fixture(DEPRECATED + path))
    if message is None:
        assert_accepted(response)
    else:
        assert_rejected(response, message)


# --- invalid settings -----------------------------------------------------------------------------

def decode_error(field: str | None, error: str) -> str:
    """Settings the guest could not decode, as the server reports it: the field and serde's reason."""
    where = f"field `{field}`: " if field else ""
    guest = f"Error decoding validation payload: {where}{error}".replace('"', '\\"')
    return f'Error invoking settings validation callback: GuestCallFailure("{guest}")'


@pytest.mark.parametrize("policy,error", [
    ("bad-pod-privileged", decode_error("skip_init_containers",
                                        'invalid type: string "yes", expected a boolean at line 1 column 29')),
    ("bad-ape", decode_error("default_allow_privilege_escalation",
                             "invalid type: integer `1`, expected a boolean at line 1 column 39")),
    ("bad-caps", 'These capabilities cannot be allowed because they are also required to be dropped: {"KILL"}'),
    ("bad-caps-default",
     'These capabilities cannot be added by default because they are not allowed: {"KILL", "NET_ADMIN"}'),
    ("bad-caps-default-dropped",
     'These capabilities cannot be added by default because they are also required to be dropped: '
     '{"KILL", "NET_RAW"}'),
    ("bad-host-namespaces", "port min 443 cannot be greater than max 80"),
    ("bad-hostpaths", "pathPrefix key is missing; readOnly key for pathPrefix '/foo' is missing"),
    ("bad-apparmor", decode_error("allowed_profiles",
                                  'invalid type: string "runtime/default", expected a sequence at line 1 column 37')),
    ("bad-ug", "Invalid run_as_user settings: Missing user ID range"),
    ("bad-ug-range", "Invalid run_as_user settings: Invalid ID range: [IDRange { min: 11, max: 10 }]"),
    ("bad-ug-rule", "Invalid run_as_user settings: invalid rule."),
    ("bad-ug-overwrite", "Cannot set overwrite field with RunAsAny"),
    ("bad-ug-overwrite-may-run-as", "Cannot set overwrite field with MayRunAs"),
    ("bad-ug-overwrite-non-root", "Cannot set overwrite field with MustRunAsNonRoot"),
    ("bad-ug-group-range", "Invalid run_as_group settings: missing ID range"),
    ("bad-ug-supplemental-range",
     "Invalid supplemental_groups settings: Invalid ID range: [IDRange { min: 5, max: 1 }]"),
    ("bad-ug-validate-only-overwrite", "validate_only cannot be true when overwrite is true"),
    ("bad-ug-validate-only-overwrite-run_as_user", "validate_only cannot be true when overwrite is true"),
    ("bad-ug-validate-only-overwrite-run_as_group", "validate_only cannot be true when overwrite is true"),
    ("bad-ug-validate-only-overwrite-supplemental_groups", "validate_only cannot be true when overwrite is true"),
    ("bad-ug-validate-only-overwrite-run-as-any", "Cannot set overwrite field with RunAsAny"),
    # policies.yml is written with sorted keys; the server passes the settings on in that order
    ("bad-ug-image-configuration", decode_error(
        "validate_container_image_configuration",
        "invalid type: integer `1`, expected a boolean at line 1 column 335")),
    ("bad-ug-unknown-rule", decode_error(
        "supplemental_groups.rule",
        "unknown variant `Sometimes`, expected one of `MustRunAs`, `MayRunAs`, `RunAsAny`, `MustRunAsNonRoot` "
        "at line 1 column 42")),
    ("bad-safe-labels", "Provided settings are not valid: error parsing regexp: missing closing ]: `[a+`"),
    ("bad-safe-labels-conflict", "Provided settings are not valid: These labels cannot be constrained and denied at "
                                 "the same time: foo; These labels cannot be mandatory and denied at the same time: "
                                 "owner"),
    ("bad-deprecated", decode_error(None, "missing field `kubernetes_version` at line 1 column 2")),
    ("bad-deprecated-version", "Please provide a kubernetes version"),
    # serde_json places errors raised by a type's own parser at the end of the enclosing object.
    ("bad-deprecated-pre-release", decode_error(None,
                                                "invalid leading zero in pre-release identifier "
                                                "at line 1 column 34")),
    ("bad-safe-labels-constrained-denied",
     "Provided settings are not valid: These labels cannot be constrained and denied at the same time: cc-center"),
    ("bad-safe-labels-mandatory-denied",
     "Provided settings are not valid: These labels cannot be mandatory and denied at the same time: cc-center"),
])
def test_invalid_settings(server, policy, error):
    request = fixture(PP + "no_privileged_containers.json")
    assert_rejected(review(server, policy, request), f"Policy settings are invalid: {error}", 500)


# --- mutating policies and the server's mutation rules ---------------------------------------------

@pytest.mark.parametrize("not_allowed,monitor,path", [
    ("ape-not-allowed-to-mutate", "ape-monitor", APE + "req_pod_without_security_context.json"),
    ("caps-drop-all-not-allowed-to-mutate", "caps-drop-all-monitor", CAPS + "req_pod_without_security_context.json"),
    ("ug-non-root-not-allowed-to-mutate", "ug-non-root-monitor", UG_E2E + "empty_security_context_pod.json"),
])
def test_mutation_rules(server, not_allowed, monitor, path):
    request = fixture(path)
    assert_rejected(review(server, not_allowed, request),
                    f"Request rejected by policy {not_allowed}. The policy attempted to mutate the request, "
                    "but it is currently configured to not allow mutations.")
    # monitor mode: accepted, and the patch is dropped
    assert_accepted(review(server, monitor, request))


# --- requests without a usable Pod spec -----------------------------------------------------------

@pytest.mark.parametrize("policy", ["pod-privileged", "ape-default-false", "caps-drop-all", "host-namespaces",
                                    "hostpaths", "apparmor", "ug-must-run-as", "deprecated"])
def test_delete_requests_are_accepted(server, policy):
    request = copy.deepcopy(fixture(PP + "privileged_container.json"))
    request.update(operation="DELETE", oldObject=request.pop("object"))
    assert_accepted(review(server, policy, request))


@pytest.mark.parametrize("policy", ["pod-privileged", "ape", "ug-must-run-as"])
def test_malformed_pod_spec(server, policy):
    request = copy.deepcopy(fixture(PP + "privileged_container.json"))
    request["object"]["spec"]["containers"] = "not a list"
    assert_rejected(review(server, policy, request), "Cannot parse validation request")


# --- the library as shipped -----------------------------------------------------------------------

def test_catalog_matches_the_modules():
    catalog = json.loads((LIBRARY / "catalog.json").read_text())
    entries = {entry["name"]: entry for entry in catalog["policies"]}
    assert sorted(entries) == NAMES
    for name, entry in entries.items():
        wasm = (LIBRARY / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(wasm).hexdigest(), name
        assert entry["size"] == len(wasm), name
        metadata = yaml.safe_load((LIBRARY / name / "metadata.yml").read_text())
        assert entry["mutating"] == metadata["mutating"], name
        assert entry["rules"] == metadata["rules"], name
        assert entry["version"] == metadata["annotations"]["io.kubewarden.policy.version"], name
        assert entry["protocol_version"] == "v1" and entry["execution_mode"] == "kubewarden-wapc"
    markdown = (LIBRARY / "CATALOG.md").read_text()
    for entry in entries.values():
        assert entry["sha256"] in markdown


def test_mutating_policies_are_annotated_as_such():
    for name in NAMES:
        inspected = subprocess.run([sys.executable, "-m", "kwserver", "inspect", str(DIST / f"{name}.wasm")],
                                   capture_output=True, text=True, check=True)
        metadata = json.loads(inspected.stdout)
        assert metadata["mutating"] is (name in {"allow-privilege-escalation-psp", "capabilities-psp",
                                                 "user-group-psp"}), name
        assert metadata["protocolVersion"] == "v1"


@pytest.mark.parametrize("config,count", [("policies.yml", 10), ("policies-61.yml", 61)])
def test_example_configurations_pass_check(config, count, tmp_path, compile_cache):
    path = REPO / "deploy" / "examples" / config
    assert len(yaml.safe_load(path.read_text())) == count
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBEWARDEN_", "KWSERVER_"))}
    result = subprocess.run([sys.executable, "-m", "kwserver", "check", "--policies", str(path)],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**env, "KWSERVER_COMPILE_CACHE_DIR": str(compile_cache)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{count} entries" in result.stdout and "0 error(s)" in result.stdout


def test_policies_61_is_generated():
    generated = subprocess.run([sys.executable, str(REPO / "deploy" / "examples" / "gen_policies_61.py")],
                               capture_output=True, text=True, check=True).stdout
    assert generated == (REPO / "deploy" / "examples" / "policies-61.yml").read_text()
