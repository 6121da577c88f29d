"""`kwserver manifests`: the Kubernetes objects that run kwserver without the Kubewarden controller.

From `policies.yml` and each module's metadata (rules, mutating): webhook configurations that send
each policy's requests to its URL, and the Deployment, Service, ConfigMap, PodDisruptionBudget,
HorizontalPodAutoscaler, NetworkPolicy, ServiceAccount and RBAC that serve them. The pod is shaped
as the controller shapes a policy server's (read-only root filesystem, non-root, an emptyDir on /tmp).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from kwserver.config import (
    ConfigError,
    ContextAwareResource,
    PolicyGroupSpec,
    PolicySpec,
    ServerSettings,
    add_setting_arguments,
    load_policies,
    settings_from_args,
)
from kwserver.evaluation.modes import read_metadata
from kwserver.metadata import MetadataError, PolicyMetadata, WasmFormatError
from kwserver.sources import SourceError
from kwserver.sources.references import LocalReference, parse_reference

IMAGE_MODULE_DIR = "/opt/kwserver/policies/dist"  # where deploy/build-image.sh puts the policy library
CONFIG_DIR, PKI_DIR, STORE_DIR = "/config", "/pki", "/tmp"
# Kinds whose plural is not the lower-cased kind plus "s" (RBAC names resources by plural).
IRREGULAR_PLURALS = {"endpoints": "endpoints", "ingress": "ingresses", "networkpolicy": "networkpolicies",
                     "podsecuritypolicy": "podsecuritypolicies", "priorityclass": "priorityclasses",
                     "storageclass": "storageclasses", "ingressclass": "ingressclasses",
                     "runtimeclass": "runtimeclasses"}


def resource_of(kind: str) -> str:
    lower = kind.lower()
    if lower in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[lower]
    if lower.endswith("y") and lower[-2:-1] not in "aeiou":
        return lower[:-1] + "ies"
    if lower.endswith(("s", "x", "ch", "sh")):
        return lower + "es"
    return lower + "s"


def webhook_name(policy: str, domain: str) -> str:
    """A DNS name per policy: webhook names must be fully qualified and lower case."""
    label = re.sub(r"[^a-z0-9-]+", "-", policy.lower()).strip("-")[:63].strip("-") or "policy"
    return f"{label}.{domain}"


def _metadata(spec: PolicySpec, base_dir: Path, settings: ServerSettings) -> PolicyMetadata:
    from kwserver.sources.fetcher import ModuleFetcher

    fetched = ModuleFetcher.from_settings(settings, base_dir).fetch(spec.module)
    metadata = read_metadata(fetched.wasm)
    if metadata is None or not metadata.rules:
        raise MetadataError(f"{spec.module} has no metadata rules: annotate it (`kwserver annotate`)")
    return metadata


def _rules(metadata: PolicyMetadata) -> list[dict[str, Any]]:
    keys = ("apiGroups", "apiVersions", "resources", "operations")
    return [{key: list(rule[key]) for key in keys if key in rule} | ({"scope": rule["scope"]} if "scope" in rule
                                                                      else {}) for rule in metadata.rules]


def _members(entry: PolicySpec | PolicyGroupSpec) -> list[PolicySpec]:
    return list(entry.members.values()) if isinstance(entry, PolicyGroupSpec) else [entry]


def _webhook(policy: str, rules: list[dict[str, Any]], args: argparse.Namespace, ca_bundle: str | None,
             mutating: bool) -> dict[str, Any]:
    client: dict[str, Any] = {"service": {"name": args.name, "namespace": args.namespace,
                                          "path": f"/validate/{quote(policy, safe='')}", "port": 443}}
    if ca_bundle:
        client["caBundle"] = ca_bundle
    webhook = {
        "name": webhook_name(policy, args.webhook_domain),
        "clientConfig": client,
        "rules": rules,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": args.failure_policy,
        "matchPolicy": "Equivalent",
        "timeoutSeconds": args.webhook_timeout_seconds,
        # Never the server's own namespace: a webhook that gates its own pods can lock itself out.
        "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                                    "values": sorted({args.namespace, *args.exclude_namespace})}]},
    }
    if mutating:
        webhook["reinvocationPolicy"] = "Never"
    return webhook


def webhook_configurations(entries: dict[str, PolicySpec | PolicyGroupSpec], base_dir: Path,
                           settings: ServerSettings, args: argparse.Namespace) -> list[dict[str, Any]]:
    ca_bundle = base64.b64encode(Path(args.ca_bundle).read_bytes()).decode() if args.ca_bundle else None
    validating, mutating = [], []
    for name, entry in entries.items():
        metadatas = [_metadata(member, base_dir, settings) for member in _members(entry)]
        rules = []
        for metadata in metadatas:  # a group answers for every member's resources
            rules += [rule for rule in _rules(metadata) if rule not in rules]
        # As the controller decides: a policy mutates when its module can and policies.yml allows it.
        mutates = isinstance(entry, PolicySpec) and entry.allowed_to_mutate and metadatas[0].mutating
        (mutating if mutates else validating).append(_webhook(name, rules, args, ca_bundle, mutates))
    objects = []
    annotations = {} if ca_bundle else {"cert-manager.io/inject-ca-from": f"{args.namespace}/{args.name}"}
    for kind, webhooks in (("ValidatingWebhookConfiguration", validating), ("MutatingWebhookConfiguration", mutating)):
        if webhooks:
            objects.append({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
                            "metadata": {"name": args.name, "labels": labels(args), "annotations": annotations},
                            "webhooks": webhooks})
    return objects


def labels(args: argparse.Namespace) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kwserver", "app.kubernetes.io/instance": args.name}


def _meta(args: argparse.Namespace, name: str | None = None) -> dict[str, Any]:
    return {"name": name or args.name, "namespace": args.namespace, "labels": labels(args)}


def config_map_policies(entries_text: str, base_dir: Path, module_dir: str) -> str:
    """policies.yml for the pod: local modules are looked up in the image (`--module-dir`)."""
    doc = yaml.safe_load(entries_text) or {}

    def relocate(entry: dict[str, Any]) -> None:
        if isinstance(entry.get("module"), str) and isinstance(parse_reference(entry["module"], base_dir),
                                                               LocalReference):
            entry["module"] = f"{module_dir.rstrip('/')}/{Path(parse_reference(entry['module'], base_dir).path).name}"
        for member in (entry.get("policies") or {}).values():
            if isinstance(member, dict):
                relocate(member)

    for entry in doc.values():
        if isinstance(entry, dict):
            relocate(entry)
    return yaml.safe_dump(doc, sort_keys=False)


def deployment(args: argparse.Namespace, settings: ServerSettings, config_data: dict[str, str], *,
               reads_cluster: bool = False) -> dict[str, Any]:
    env = [
        {"name": "KUBEWARDEN_POLICIES", "value": f"{CONFIG_DIR}/policies.yml"},
        {"name": "KUBEWARDEN_CERT_FILE", "value": f"{PKI_DIR}/tls.crt"},
        {"name": "KUBEWARDEN_KEY_FILE", "value": f"{PKI_DIR}/tls.key"},
        {"name": "KUBEWARDEN_PORT", "value": str(settings.port)},
        {"name": "KUBEWARDEN_READINESS_PROBE_PORT", "value": str(settings.readiness_probe_port)},
        {"name": "KUBEWARDEN_POLICIES_DOWNLOAD_DIR", "value": STORE_DIR},
        {"name": "KUBEWARDEN_LOG_FMT", "value": settings.log_fmt},
        {"name": "KUBEWARDEN_LOG_LEVEL", "value": settings.log_level},
    ]
    if "sources.yml" in config_data:
        env.append({"name": "KUBEWARDEN_SOURCES_PATH", "value": f"{CONFIG_DIR}/sources.yml"})
    if "verification.yml" in config_data:
        env.append({"name": "KUBEWARDEN_VERIFICATION_CONFIG_PATH", "value": f"{CONFIG_DIR}/verification.yml"})
    if "sigstore-trust-config.json" in config_data:
        env.append({"name": "KUBEWARDEN_SIGSTORE_TRUST_CONFIG_PATH",
                    "value": f"{CONFIG_DIR}/sigstore-trust-config.json"})
    if settings.workers:
        env.append({"name": "KUBEWARDEN_WORKERS", "value": str(settings.workers)})
    ports = [{"name": "https", "containerPort": settings.port},
             {"name": "readiness", "containerPort": settings.readiness_probe_port}]
    if settings.metrics_port:  # else /metrics is on the readiness port
        env.append({"name": "KWSERVER_METRICS_PORT", "value": str(settings.metrics_port)})
        ports.append({"name": "metrics", "containerPort": settings.metrics_port})
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "certs", "mountPath": PKI_DIR, "readOnly": True},
              {"name": "store", "mountPath": STORE_DIR}]
    volumes = [{"name": "config", "configMap": {"name": args.name}},
               {"name": "certs", "secret": {"secretName": args.tls_secret}},
               {"name": "store", "emptyDir": {}}]
    if args.image_pull_secret:
        env.append({"name": "KUBEWARDEN_DOCKER_CONFIG_JSON_PATH", "value": "/docker"})
        mounts.append({"name": "docker-config", "mountPath": "/docker", "readOnly": True})
        volumes.append({"name": "docker-config", "secret": {
            "secretName": args.image_pull_secret, "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}})
    probe = {"httpGet": {"path": "/readiness", "port": "readiness", "scheme": "HTTP"}}
    container = {
        "name": "kwserver",
        "image": args.image,
        "env": env,
        "ports": ports,
        "readinessProbe": probe,
        "livenessProbe": {**probe, "failureThreshold": 6, "periodSeconds": 10},
        "resources": {"requests": {"cpu": args.cpu_request, "memory": args.memory_request},
                      "limits": {"memory": args.memory_limit}},
        "volumeMounts": mounts,
        "securityContext": {"readOnlyRootFilesystem": True, "runAsNonRoot": True, "privileged": False,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    # kwserver reads policies.yml at start and on SIGHUP; a changed ConfigMap rolls the pods instead.
    checksum = hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in sorted(config_data.items())).encode()).hexdigest()
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(args),
        "spec": {
            "replicas": args.replicas,
            "selector": {"matchLabels": labels(args)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels(args), "annotations": {
                    "kwserver.io/config-checksum": checksum,
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(settings.metrics_listener_port)}},
                "spec": {
                    "serviceAccountName": args.name,
                    # The service account's token is how context-aware policies read the cluster.
                    "automountServiceAccountToken": reads_cluster,
                    # Workers get 30 s to finish their requests after SIGTERM.
                    "terminationGracePeriodSeconds": 40,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def service(args: argparse.Namespace, settings: ServerSettings) -> dict[str, Any]:
    metrics_target = "metrics" if settings.metrics_port else "readiness"
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(args),
            "spec": {"selector": labels(args), "ports": [
                {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"},
                {"name": "metrics", "port": args.service_metrics_port, "targetPort": metrics_target,
                 "protocol": "TCP"}]}}


def pod_disruption_budget(args: argparse.Namespace) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(args),
            "spec": {"minAvailable": args.pdb_min_available, "selector": {"matchLabels": labels(args)}}}


def horizontal_pod_autoscaler(args: argparse.Namespace) -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(args),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": args.name},
                     "minReplicas": args.replicas, "maxReplicas": max(args.replicas, args.max_replicas),
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": args.cpu_utilization}}}]}}


def network_policy(args: argparse.Namespace, settings: ServerSettings) -> dict[str, Any]:
    """The webhook port only from the API server's addresses (ipBlocks; pods are not in them on CNIs
    that give pods identities, and `--api-server-cidr` narrows it further); metrics (on the readiness
    port unless they have their own) from anywhere in the cluster; readiness from the kubelet (node
    addresses, as the API server's)."""
    api_server = [{"ipBlock": {"cidr": cidr, **({"except": args.pod_cidr} if args.pod_cidr else {})}}
                  for cidr in args.api_server_cidr]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(args),
            "spec": {"podSelector": {"matchLabels": labels(args)}, "policyTypes": ["Ingress"], "ingress": [
                {"from": api_server, "ports": [{"protocol": "TCP", "port": settings.port},
                                               {"protocol": "TCP", "port": settings.readiness_probe_port}]},
                {"from": [{"namespaceSelector": {}}],
                 "ports": [{"protocol": "TCP", "port": settings.metrics_listener_port}]},
            ]}}


def _reads_cluster(entries: dict[str, PolicySpec | PolicyGroupSpec]) -> bool:
    return any(member.context_aware_resources for entry in entries.values() for member in _members(entry))


def rbac(args: argparse.Namespace, entries: dict[str, PolicySpec | PolicyGroupSpec]) -> list[dict[str, Any]]:
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(args)}
    resources: set[ContextAwareResource] = {r for entry in entries.values() for member in _members(entry)
                                            for r in member.context_aware_resources}
    if not resources:
        return [account]
    by_group: dict[str, set[str]] = {}
    for resource in resources:
        group = resource.api_version.rpartition("/")[0]
        by_group.setdefault(group, set()).add(resource_of(resource.kind))
    rules = [{"apiGroups": [group], "resources": sorted(names), "verbs": ["get", "list", "watch"]}
             for group, names in sorted(by_group.items())]
    role_meta = {"name": f"{args.namespace}-{args.name}-context-aware", "labels": labels(args)}
    return [account,
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": role_meta,
             "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": role_meta,
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_meta["name"]},
             "subjects": [{"kind": "ServiceAccount", "name": args.name, "namespace": args.namespace}]}]


def build(args: argparse.Namespace) -> list[dict[str, Any]]:
    settings = settings_from_args(args)
    if args.port is None:  # the controller's default webhook port, not the reference's 3000
        settings = ServerSettings(**{**settings.__dict__, "port": 8443})
    policies_path = Path(settings.policies)
    base_dir = policies_path.resolve().parent
    entries = load_policies(policies_path)
    config_data = {"policies.yml": config_map_policies(policies_path.read_text(), base_dir, args.module_dir)}
    for key, path in (("sources.yml", settings.sources_path), ("verification.yml", settings.verification_path),
                      ("sigstore-trust-config.json", settings.sigstore_trust_config)):
        if path:
            config_data[key] = Path(path).read_text()
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(args), "data": config_data},
        *rbac(args, entries),
        deployment(args, settings, config_data, reads_cluster=_reads_cluster(entries)),
        service(args, settings),
        pod_disruption_budget(args),
        horizontal_pod_autoscaler(args),
        network_policy(args, settings),
        *webhook_configurations(entries, base_dir, settings, args),
    ]


def cmd_manifests(args: argparse.Namespace) -> int:
    try:
        objects = build(args)
    except (ConfigError, MetadataError, WasmFormatError, SourceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    yaml.dump_all(objects, sys.stdout, Dumper=_Dumper, sort_keys=False)
    return 0


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's files) as literal blocks, readable in the output."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def add_parser(commands: Any) -> None:
    """Register `manifests` on the `kwserver` subcommands."""
    parser = commands.add_parser("manifests", help="print the Kubernetes objects that run kwserver on policies.yml")
    add_setting_arguments(parser)  # --policies, --port, sources and credentials for fetching the modules
    parser.add_argument("--name", default="kwserver", help="name of every object (default: kwserver)")
    parser.add_argument("--namespace", default="kwserver", help="namespace of the server (default: kwserver)")
    parser.add_argument("--image", default="kwserver:latest", help="container image (default: kwserver:latest)")
    parser.add_argument("--module-dir", default=IMAGE_MODULE_DIR,
                        help=f"where local modules are found in the image (default: {IMAGE_MODULE_DIR})")
    parser.add_argument("--replicas", type=int, default=2, help="replicas, and the autoscaler's minimum (default: 2)")
    parser.add_argument("--max-replicas", type=int, default=5, help="the autoscaler's maximum (default: 5)")
    parser.add_argument("--cpu-utilization", type=int, default=75,
                        help="average CPU use, in percent of requests, the autoscaler aims at (default: 75)")
    parser.add_argument("--pdb-min-available", type=int, default=1, help="PodDisruptionBudget minAvailable (1)")
    parser.add_argument("--cpu-request", default="500m", help="CPU request (default: 500m)")
    parser.add_argument("--memory-request", default="256Mi", help="memory request (default: 256Mi)")
    parser.add_argument("--memory-limit", default="1Gi", help="memory limit (default: 1Gi)")
    parser.add_argument("--tls-secret", default="kwserver-tls",
                        help="kubernetes.io/tls Secret of the server certificate (default: kwserver-tls)")
    parser.add_argument("--ca-bundle", metavar="PEM",
                        help="CA of the server certificate, for the webhooks' caBundle (default: injected by "
                             "cert-manager from the Certificate named like the server)")
    parser.add_argument("--image-pull-secret", metavar="SECRET",
                        help="docker-registry Secret whose credentials pull the policy modules")
    parser.add_argument("--failure-policy", default="Fail", choices=("Fail", "Ignore"),
                        help="what the API server does when kwserver cannot answer (default: Fail)")
    parser.add_argument("--webhook-timeout-seconds", type=int, default=10, help="webhook timeout (default: 10)")
    parser.add_argument("--webhook-domain", default="kwserver.admission",
                        help="suffix of the webhook names (default: kwserver.admission)")
    parser.add_argument("--exclude-namespace", action="append", default=["kube-system"],
                        help="namespaces the webhooks never see, besides the server's own (default: kube-system)")
    parser.add_argument("--api-server-cidr", action="append", default=None,
                        help="addresses the API server calls from; repeatable (default: 0.0.0.0/0)")
    parser.add_argument("--pod-cidr", action="append", default=[],
                        help="the cluster's pod network, excluded from the API server's addresses; repeatable")
    parser.add_argument("--service-metrics-port", type=int, default=9090, help="the Service's metrics port (9090)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    args.api_server_cidr = args.api_server_cidr or ["0.0.0.0/0"]
    return cmd_manifests(args)
