"""What the load consists of: policy configurations, request fixtures and the mixes built from them.

Configurations: the ten- and 61-policy examples of the policy library (deploy/examples/policies.yml and
policies-61.yml) by default. While those do not exist, the bench generates *fallback* configurations of
the same sizes over the modules that do (tests/policies/*.wasm and the TinyGo conformance policy);
every report says which one it measured.

Mixes: each object (a Pod, Deployment or Service AdmissionReview, or a raw request) is sent to every
policy whose metadata rules match it, as the API server fans an object out to the webhooks that match
it. Objects that no policy of the config matches are sent to every Kubernetes policy (as to a webhook
registered for `*`), so that the mix always has Services in it.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kwserver.config import PolicyGroupSpec, load_policies
from kwserver.evaluation.modes import read_metadata
from kwserver.metadata import MetadataError, WasmFormatError
from kwserver.sources import SourceError, resolve_local_path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BENCH_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "conformance" / "fixtures"
SERVER_FIXTURES = FIXTURES / "kubewarden-policy-server"
TEST_POLICIES = REPO / "tests" / "policies"
TINYGO_POLICY = SHARED / "conformance" / "wasm" / "kubewarden-wapc" / "go-policy-template-tinygo-2022.wasm"

DEFAULT_CONFIG_10 = REPO / "deploy" / "examples" / "policies.yml"
DEFAULT_CONFIG_61 = REPO / "deploy" / "examples" / "policies-61.yml"

# The ~5 KB pods of the reference server's tests: the request of the ceiling scenario.
POD_PRIVILEGED = SERVER_FIXTURES / "pod_with_privileged_containers.json"  # rejected by pod-privileged
POD_UNPRIVILEGED = SERVER_FIXTURES / "pod_without_privileged_containers.json"  # accepted


# --- request fixtures ----------------------------------------------------------------------------

def as_review(doc: dict[str, Any]) -> dict[str, Any]:
    """Wrap a bare AdmissionRequest fixture in an AdmissionReview envelope."""
    if "request" in doc:
        return doc
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": doc}


# Kinds of the mix: (API group, resource). Some upstream fixtures omit fields the API server always sends.
_RESOURCES = {"Pod": ("", "pods"), "Service": ("", "services"), "Deployment": ("apps", "deployments"),
              "ReplicaSet": ("apps", "replicasets"), "StatefulSet": ("apps", "statefulsets"),
              "DaemonSet": ("apps", "daemonsets"), "Job": ("batch", "jobs"), "CronJob": ("batch", "cronjobs"),
              "ReplicationController": ("", "replicationcontrollers")}


def complete_request(request: dict[str, Any]) -> dict[str, Any]:
    """Fill in what the API server always sends and some fixtures leave out (resource, name, namespace)."""
    kind = request.get("kind") or {}
    group, resource = _RESOURCES.get(kind.get("kind", ""), (kind.get("group", ""), kind.get("kind", "").lower() + "s"))
    for gvk in (kind, request.get("requestKind") or {}):
        gvk.setdefault("group", group)
    gvr = {"group": kind.get("group", group), "version": kind.get("version", "v1"), "resource": resource}
    request.setdefault("resource", gvr)
    request.setdefault("requestResource", request["resource"])
    metadata = (request.get("object") or {}).get("metadata") or {}
    if "name" in metadata:
        request.setdefault("name", metadata["name"])
    if kind.get("kind") != "Namespace":
        request.setdefault("namespace", metadata.get("namespace", "default"))
    return request


@dataclass(frozen=True)
class RequestObject:
    """One request body of a mix."""

    name: str
    category: str  # pod, deployment, service, raw
    source: Path
    weight: float  # share of the category's weight
    raw: bool = False
    verbatim: bool = False  # send the file's bytes as they are (it must be a complete AdmissionReview)

    def review(self) -> dict[str, Any]:
        doc = json.loads(_read(self.source))
        if self.raw:
            return doc if "request" in doc else {"request": doc}
        review = as_review(doc)
        complete_request(review["request"])
        return review

    def body(self) -> bytes:
        if self.verbatim:
            return self.source.read_bytes()
        return json.dumps(self.review(), separators=(",", ":")).encode()

    @property
    def resource(self) -> tuple[str, str, str]:
        request = self.review()["request"]
        res = request.get("resource") or {}
        return res.get("group", ""), res.get("version", ""), res.get("resource", "")

    @property
    def operation(self) -> str:
        return self.review()["request"].get("operation", "CREATE")


@functools.lru_cache(maxsize=256)
def _read(path: Path) -> str:
    return path.read_text()


# Category weights of the realistic mix: most admission traffic is Pods (created by controllers),
# then the workloads that own them, then Services. Raw requests only matter when the config has raw
# policies (only the fallback config does).
CATEGORY_WEIGHTS = {"pod": 60.0, "deployment": 25.0, "service": 15.0, "raw": 5.0}

_MIX_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("pod-unprivileged-5k", "pod", "kubewarden-policy-server/pod_without_privileged_containers.json"),
    ("pod-privileged-5k", "pod", "kubewarden-policy-server/pod_with_privileged_containers.json"),
    ("pod-go-template", "pod", "go-policy-template/pod.json"),
    ("pod-capabilities-added", "pod",
     "kubewarden-policies/capabilities-psp-policy/test_data/req_pod_with_container_with_capabilities_added.json"),
    ("pod-mutate-capabilities", "pod",
     "kubewarden-policies/capabilities-psp-policy/test_data/req_pod_with_mutate_capabilities.json"),
    ("pod-privilege-escalation", "pod",
     "kubewarden-policies/allow-privilege-escalation-psp-policy/test_data/"
     "req_pod_with_container_with_security_context_and_allowPrivilegeEscalation.json"),
    ("pod-hostpaths", "pod", "kubewarden-policies/hostpaths-psp-policy/test_data/request-pod-hostpaths.json"),
    ("pod-host-namespaces", "pod", "kubewarden-policies/host-namespaces-psp-policy/test_data/pod_request.json"),
    ("pod-apparmor-custom", "pod",
     "kubewarden-policies/apparmor-psp-policy/test_data/req_pod_with_custom_apparmor_profile.json"),
    ("pod-user-group-invalid", "pod",
     "kubewarden-policies/user-group-psp-policy/test_data/pod_creation_must_run_as_with_invalid_value.json"),
    ("deployment-plain", "deployment", "kubewarden-policy-server/deployment_admission_review.json"),
    ("deployment-privileged", "deployment",
     "kubewarden-policies/pod-privileged-policy/test_data/deployment_with_privileged_containers.json"),
    ("deployment-root-user", "deployment",
     "kubewarden-policies/user-group-psp-policy/test_data/deployment_root_user.json"),
    ("deployment-mutate-capabilities", "deployment",
     "kubewarden-policies/capabilities-psp-policy/test_data/req_pod_with_mutate_capabilities_for_deployment.json"),
    ("service-clusterip", "service",
     "kubewarden-policies/disallow-service-loadbalancer-policy/test_data/service-clusterip.json"),
    ("service-loadbalancer", "service",
     "kubewarden-policies/disallow-service-loadbalancer-policy/test_data/service_loadbalancer.json"),
    ("service-nodeport", "service",
     "kubewarden-policies/disallow-service-nodeport-policy/test_data/service_nodeport.json"),
    ("raw-valid", "raw", "kubewarden-policies/raw-validation-policy/test_data/valid.json"),
    ("raw-invalid", "raw", "kubewarden-policies/raw-validation-policy/test_data/invalid.json"),
    ("raw-mutate", "raw", "kubewarden-policies/raw-mutation-policy/test_data/mutate.json"),
)


def mix_objects(fixtures: Path = FIXTURES) -> list[RequestObject]:
    """The objects of the realistic mix that exist on this machine, with their weights."""
    present = [(n, c, fixtures / rel) for n, c, rel in _MIX_SOURCES if (fixtures / rel).is_file()]
    per_category = Counter(c for _, c, _ in present)
    return [
        RequestObject(name, category, path, CATEGORY_WEIGHTS[category] / per_category[category],
                      raw=category == "raw")
        for name, category, path in present
    ]


# --- configurations ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PolicyInfo:
    """What the mix needs to know about one top-level entry of a config."""

    name: str
    group: bool
    raw: bool
    rules: tuple[dict[str, Any], ...]  # empty: matches nothing by rules
    wildcard: bool = False  # no metadata: treated as matching every Kubernetes object


def _module_metadata(reference: str, base_dir: Path) -> Any:
    try:
        path = resolve_local_path(reference, base_dir)
        return read_metadata(path.read_bytes())
    except (OSError, SourceError, MetadataError, WasmFormatError):
        return None


def describe_config(config: Path) -> list[PolicyInfo]:
    entries = load_policies(config)
    base_dir = Path(config).resolve().parent
    infos = []
    for name, entry in entries.items():
        specs = list(entry.members.values()) if isinstance(entry, PolicyGroupSpec) else [entry]
        metas = [_module_metadata(spec.module, base_dir) for spec in specs]
        raw = any(m is not None and m.policy_type == "raw" for m in metas)
        rules = tuple(r for m in metas if m is not None for r in m.rules)
        wildcard = any(m is None for m in metas)
        infos.append(PolicyInfo(name, isinstance(entry, PolicyGroupSpec), raw, rules, wildcard))
    return infos


def _matches(patterns: Iterable[str], value: str) -> bool:
    return any(p == "*" or p == value for p in patterns)


def rule_matches(rule: dict[str, Any], group: str, version: str, resource: str, operation: str) -> bool:
    resources = [r.split("/", 1)[0] if r != "*/*" else "*" for r in rule.get("resources", [])]
    operations = rule.get("operations", ["*"])
    return (_matches(rule.get("apiGroups", []), group) and _matches(rule.get("apiVersions", []), version)
            and _matches(resources, resource) and _matches(operations, operation))


def policy_matches(policy: PolicyInfo, obj: RequestObject) -> bool:
    if policy.raw != obj.raw:
        return False
    if obj.raw or policy.wildcard:
        return True
    group, version, resource = obj.resource
    return any(rule_matches(rule, group, version, resource, obj.operation) for rule in policy.rules)


@dataclass(frozen=True)
class MixEntry:
    policy: str
    obj: RequestObject

    @property
    def path(self) -> str:
        return f"/{'validate_raw' if self.obj.raw else 'validate'}/{self.policy}"


def route(policies: Sequence[PolicyInfo], objects: Sequence[RequestObject]) -> dict[str, list[str]]:
    """Object name -> the policies it is sent to."""
    routes = {}
    kubernetes = [p.name for p in policies if not p.raw]
    for obj in objects:
        matched = [p.name for p in policies if policy_matches(p, obj)]
        if not matched and not obj.raw:
            matched = kubernetes
        if matched:
            routes[obj.name] = matched
    return routes


def build_mix(policies: Sequence[PolicyInfo], objects: Sequence[RequestObject], length: int = 400) -> list[MixEntry]:
    """A deterministic sequence of objects drawn by weight (smooth weighted round robin), each fanned
    out to the policies it matches. `length` counts objects, not requests."""
    routes = route(policies, objects)
    candidates = [o for o in objects if o.name in routes]
    if not candidates:
        raise ValueError("no object of the mix matches any policy of the config")
    total = sum(o.weight for o in candidates)
    current = {o.name: 0.0 for o in candidates}
    entries: list[MixEntry] = []
    for _ in range(length):
        for o in candidates:
            current[o.name] += o.weight
        chosen = max(candidates, key=lambda o: current[o.name])
        current[chosen.name] -= total
        entries.extend(MixEntry(policy, chosen) for policy in routes[chosen.name])
    return entries


def mix_composition(entries: Sequence[MixEntry]) -> dict[str, Any]:
    return {
        "requests": len(entries),
        "by_category": dict(Counter(e.obj.category for e in entries)),
        "by_policy": dict(Counter(e.policy for e in entries)),
        "by_object": dict(Counter(e.obj.name for e in entries)),
    }


# --- fallback configurations ---------------------------------------------------------------------

def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def fallback_entries(count: int) -> dict[str, Any]:
    """`count` policies over the modules available without the policy library, with varied settings
    and modes (the first ten are the fallback ten-policy config)."""
    pp, tinygo = "pod-privileged", "tinygo"
    ten: list[tuple[str, str, dict[str, Any]]] = [
        ("no-privileged-pod", pp, {"settings": {}}),
        ("no-privileged-pod-skip-init", pp, {"settings": {"skip_init_containers": True}}),
        ("no-privileged-pod-monitor", pp, {"settings": {}, "policyMode": "monitor"}),
        ("deny-pod-names", tinygo, {"settings": {"denied_names": ["nginx", "forbidden"]}}),
        ("deny-other-names", tinygo, {"settings": {"denied_names": ["foo", "bar"]}}),
        ("deny-pod-names-monitor", tinygo, {"settings": {"denied_names": ["nginx"]}, "policyMode": "monitor"}),
        ("sleeping-no-annotation", "sleeping", {"settings": {"sleepMilliseconds": 0}}),
        ("raw-validation", "raw-validation", {"settings": {
            "validUsers": ["wanda", "oscar"], "validActions": ["eats", "likes"], "validResources": ["hay", "banana"]}}),
        ("raw-mutation", "raw-mutation", {"allowedToMutate": True, "settings": {
            "forbiddenResources": ["banana", "apple"], "defaultResource": "hay"}}),
        ("raw-mutation-not-allowed", "raw-mutation", {"allowedToMutate": False, "settings": {
            "forbiddenResources": ["banana"], "defaultResource": "hay"}}),
    ]
    out: dict[str, Any] = {}
    for name, module, extra in ten[:count]:
        out[name] = {"module": module, **extra}
    i = 0
    while len(out) < count:
        kind = i % 6
        if kind == 0:
            out[f"no-privileged-pod-{i}"] = {"module": pp, "settings": {
                "skip_init_containers": i % 4 == 0, "skip_ephemeral_containers": i % 3 == 0}}
        elif kind == 1:
            names = [f"app-{i}-{j}" for j in range(i % 7 + 1)]
            out[f"deny-names-{i}"] = {"module": tinygo, "settings": {"denied_names": names}}
        elif kind == 2:
            out[f"raw-validation-{i}"] = {"module": "raw-validation", "settings": {
                "validUsers": [f"user{j}" for j in range(i % 5 + 1)] + ["wanda"],
                "validActions": ["eats"], "validResources": ["hay", f"res{i}"]}}
        elif kind == 3:
            out[f"raw-mutation-{i}"] = {"module": "raw-mutation", "allowedToMutate": i % 2 == 1, "settings": {
                "forbiddenResources": ["banana", f"fruit{i}"], "defaultResource": "hay"}}
        elif kind == 4:
            out[f"sleeping-{i}"] = {"module": "sleeping", "settings": {"sleepMilliseconds": i}}
        else:
            out[f"no-privileged-pod-monitor-{i}"] = {"module": pp, "settings": {}, "policyMode": "monitor"}
        i += 1
    return out


def write_fallback_config(path: Path, count: int) -> Path:
    """Write a fallback config of `count` policies with module paths relative to the file."""
    modules = {
        "pod-privileged": TEST_POLICIES / "pod-privileged.wasm",
        "raw-mutation": TEST_POLICIES / "raw-mutation.wasm",
        "raw-validation": TEST_POLICIES / "raw-validation.wasm",
        "sleeping": TEST_POLICIES / "sleeping.wasm",
        "tinygo": TINYGO_POLICY,
    }
    missing = [str(p) for p in modules.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"modules of the fallback config are missing: {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = fallback_entries(count)
    for entry in doc.values():
        entry["module"] = _rel(modules[entry["module"]], path.parent)
    header = (f"# FALLBACK {count}-policy configuration generated by `python -m bench` because the policy\n"
              f"# library's example config is missing. Modules: tests/policies/*.wasm and the TinyGo\n"
              f"# conformance policy. Not the production configuration.\n")
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return path


def single_policy_config(path: Path) -> Path:
    """pod-privileged alone (the ceiling scenario's policy), from tests/policies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _rel(TEST_POLICIES / "pod-privileged.wasm", path.parent)
    path.write_text(yaml.safe_dump({"pod-privileged": {"module": module, "settings": {}}}))
    return path


@dataclass(frozen=True)
class ConfigChoice:
    path: Path
    label: str
    fallback: bool
    policies: int

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "label": self.label, "fallback": self.fallback, "policies": self.policies}


def choose_config(requested: str | None, default: Path, count: int, fallback_dir: Path) -> ConfigChoice:
    """The config to measure: the one asked for, else the library's example, else a fallback."""
    if requested:
        path = Path(requested).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"config {requested} does not exist")
        return ConfigChoice(path, f"{_display(path)}", False, len(load_policies(path)))
    if default.is_file():
        return ConfigChoice(default, f"{_display(default)} (policy library)", False, len(load_policies(default)))
    path = write_fallback_config(fallback_dir / f"policies-fallback-{count}.yml", count)
    return ConfigChoice(path, f"FALLBACK {count}-policy config generated by bench ({_display(default)} is missing)",
                        True, count)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# --- workloads on disk (what wrk reads) ----------------------------------------------------------

@dataclass
class Workload:
    name: str
    description: str
    entries: list[tuple[str, str]]  # (url path, object name)
    manifest: Path
    composition: dict[str, Any] = field(default_factory=dict)
    expected: dict[str, str] = field(default_factory=dict)  # url path -> outcome, filled by preflight

    @property
    def size(self) -> int:
        return len(self.entries)


def write_workload(directory: Path, name: str, description: str, requests: Sequence[tuple[str, RequestObject]],
                   composition: dict[str, Any] | None = None) -> Workload:
    """Bodies (compact JSON, one file per object) and the wrk manifest of one workload."""
    from bench.wrk import write_manifest

    bodies = directory / "bodies"
    bodies.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for _, obj in requests:
        if obj.name not in files:
            files[obj.name] = bodies / f"{obj.name}.json"
            files[obj.name].write_bytes(obj.body())
    manifest = write_manifest(directory / f"{name}.manifest", [(path, files[obj.name]) for path, obj in requests])
    return Workload(name, description, [(path, obj.name) for path, obj in requests], manifest, composition or {})


def single_request(directory: Path, name: str, policy: str, source: Path, description: str) -> Workload:
    obj = RequestObject(source.stem, "pod", source, 1.0, verbatim=True)
    return write_workload(directory, name, description, [(f"/validate/{policy}", obj)])


MAX_MIX_REQUESTS = 3000


def mix_workload(directory: Path, name: str, config: Path, description: str, *, length: int = 400,
                 only: set[str] | None = None) -> Workload:
    policies = [p for p in describe_config(config) if only is None or p.name in only]
    objects = mix_objects()
    # Keep the manifest small for wrk (every thread holds all requests): at most ~MAX_MIX_REQUESTS.
    routes = route(policies, objects)
    fanout = sum(len(r) for r in routes.values()) / max(1, len(routes))
    length = max(2 * len(routes), min(length, int(MAX_MIX_REQUESTS / max(1.0, fanout))))
    entries = build_mix(policies, objects, length)
    return write_workload(directory, name, description, [(e.path, e.obj) for e in entries],
                          mix_composition(entries))


def classify(status: int, body: bytes) -> str:
    """accept, reject, mutate, or error-<detail> for one answer of the server."""
    if status != 200:
        return f"error-http-{status}"
    try:
        response = json.loads(body)["response"]
    except (ValueError, KeyError, TypeError):
        return "error-body"
    code = (response.get("status") or {}).get("code")
    if code is not None and code >= 500:
        return "error-500"
    if response.get("patch"):
        return "mutate"
    return "accept" if response.get("allowed") else "reject"
