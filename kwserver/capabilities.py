"""Host capabilities: what a guest can ask the server for through `__host_call`.

One dispatcher per policy, so every call knows which policy made it and what that policy may access.
This build implements `kubewarden/tracing/log` and `kubewarden/net/v1/dns_lookup_host`; the Kubernetes
callbacks answer as the reference server does when it has no cluster connection, and every other name gets
the reference's "unknown" errors.

A dispatcher may be given a `HostHandler` (`kwserver run` does): then every call the reference hands to its
asynchronous callback handler is first decoded into a `HostRequest` — the reference's callback request, by
variant name and fields — checked against the policy's Kubernetes allow-list, and answered by the handler,
which may replay recorded answers or record this build's own (`kwserver.host_sessions`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from kwserver.config import ContextAwareResource

log = logging.getLogger(__name__)
policy_log = logging.getLogger("policy_log")

NO_KUBERNETES_CLIENT = "kube::Client was not initialized properly"

_LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
    "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR,
}
_KUBERNETES_OPERATIONS = {"list_resources_by_namespace", "list_resources_all", "get_resource", "can_i"}
_LEGACY_KUBERNETES_NAMESPACES = {"namespaces", "services", "ingresses"}


class HostCallError(Exception):
    """A failed host call; its text is the error the guest reads."""


def dns_lookup_host(payload: bytes) -> bytes:
    """`net/v1/dns_lookup_host`: a JSON string naming a host -> `{"ips": [...]}` (IPv4 and IPv6)."""
    try:
        host = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise HostCallError(str(exc)) from exc
    if not isinstance(host, str):
        raise HostCallError("invalid type: expected a string naming a host")
    try:
        answers = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostCallError(f"cannot resolve {host}: {exc}") from exc
    ips = list(dict.fromkeys(info[4][0] for info in answers))
    return orjson.dumps({"ips": ips})


# --- the reference's callback requests -------------------------------------------------------------

# How a field of a request is read from the guest's JSON payload.
STRING, BOOL, VALUE, OPTIONAL = "string", "bool", "value", "optional"

# Every request variant with its fields in the reference's order (session files are written in it).
REQUEST_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "OciManifestDigest": (("image", STRING),),
    "OciManifest": (("image", STRING),),
    "OciManifestAndConfig": (("image", STRING),),
    "SigstorePubKeyVerify": (("image", STRING), ("pub_keys", VALUE), ("annotations", OPTIONAL)),
    "SigstoreKeylessVerify": (("image", STRING), ("keyless", VALUE), ("annotations", OPTIONAL)),
    "SigstoreKeylessPrefixVerify": (("image", STRING), ("keyless_prefix", VALUE), ("annotations", OPTIONAL)),
    "SigstoreGithubActionsVerify": (("image", STRING), ("owner", STRING), ("repo", OPTIONAL),
                                    ("annotations", OPTIONAL)),
    "SigstoreCertificateVerify": (("image", STRING), ("certificate", VALUE), ("certificate_chain", OPTIONAL),
                                  ("require_rekor_bundle", BOOL), ("annotations", OPTIONAL)),
    "DNSLookupHost": (("host", STRING),),
    "KubernetesListResourceNamespace": (("api_version", STRING), ("kind", STRING), ("namespace", STRING),
                                        ("label_selector", OPTIONAL), ("field_selector", OPTIONAL)),
    "KubernetesListResourceAll": (("api_version", STRING), ("kind", STRING), ("label_selector", OPTIONAL),
                                  ("field_selector", OPTIONAL)),
    "KubernetesGetResource": (("api_version", STRING), ("kind", STRING), ("name", STRING),
                              ("namespace", OPTIONAL), ("disable_cache", BOOL)),
    "KubernetesCanI": (("request", VALUE), ("disable_cache", BOOL)),
    "CryptoIsCertificateTrusted": (("request", VALUE),),
}
_SIGSTORE_V1 = ("SigstorePubKeyVerify", "SigstoreKeylessVerify")
_SIGSTORE_V2 = tuple(kind for kind in REQUEST_FIELDS if kind.startswith("Sigstore"))
_OCI_IMAGE_OPERATIONS = {"v1/manifest_digest": "OciManifestDigest", "v1/oci_manifest": "OciManifest",
                         "v1/oci_manifest_config": "OciManifestAndConfig"}
# operation -> (request variant, the guest's payload struct)
_KUBERNETES_REQUESTS = {
    "list_resources_by_namespace": ("KubernetesListResourceNamespace", "ListResourcesByNamespaceRequest"),
    "list_resources_all": ("KubernetesListResourceAll", "ListAllResourcesRequest"),
    "get_resource": ("KubernetesGetResource", "GetResourceRequest"),
}
_ACCESS_CHECKED = {kind for kind, _ in _KUBERNETES_REQUESTS.values()}
_LEGACY_KUBERNETES_LISTS = {"namespaces": ("v1", "Namespace"), "services": ("v1", "Service"),
                            "ingresses": ("networking.k8s.io/v1", "Ingress")}


@dataclass(frozen=True)
class HostRequest:
    """One call for the host to answer: a variant of the reference's callback request and its fields."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def normalized(self) -> HostRequest:
        """Only the variant's fields, absent optional ones as null: how the reference compares requests."""
        names = REQUEST_FIELDS.get(self.kind)
        if names is None:
            return self
        return HostRequest(self.kind, {name: self.fields.get(name) for name, _ in names})


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    return {list: "sequence", dict: "map"}.get(type(value), "null")


def _request(kind: str, doc: Any, struct: str | None = None) -> HostRequest:
    """The request `kind` read from a decoded payload object (the guest's `struct`), with serde's wording
    for what is wrong."""
    if not isinstance(doc, dict):
        raise HostCallError(f"invalid type: {_json_type(doc)}, expected struct {struct or kind}")
    fields: dict[str, Any] = {}
    for name, rule in REQUEST_FIELDS[kind]:
        value = doc.get(name)
        if rule == OPTIONAL:
            fields[name] = value
            continue
        if value is None:
            raise HostCallError(f"missing field `{name}`")
        if rule == STRING and not isinstance(value, str):
            raise HostCallError(f"invalid type: {_json_type(value)}, expected a string")
        if rule == BOOL and not isinstance(value, bool):
            raise HostCallError(f"invalid type: {_json_type(value)}, expected a boolean")
        fields[name] = value
    return HostRequest(kind, fields)


def _payload(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise HostCallError(str(exc)) from exc


def _image_request(kind: str, payload: bytes) -> HostRequest:
    image = _payload(payload)
    if not isinstance(image, str):
        raise HostCallError(f"invalid type: {_json_type(image)}, expected a string")
    return HostRequest(kind, {"image": image})


def _tagged_request(doc: Any, variants: tuple[str, ...], *, internally: bool) -> HostRequest:
    """`v1/verify` payloads are externally tagged (`{"Variant": {...}}`), `v2/verify` ones by `type`."""
    if internally and isinstance(doc, dict) and doc.get("type") in variants:
        return _request(doc["type"], doc)
    if not internally and isinstance(doc, dict) and len(doc) == 1 and next(iter(doc)) in variants:
        kind, body = next(iter(doc.items()))
        return _request(kind, body)
    raise HostCallError(f"unknown variant, expected one of {', '.join(f'`{v}`' for v in variants)}")


def host_request(binding: str, namespace: str, operation: str, payload: bytes) -> HostRequest | None:
    """The request the reference hands to its callback handler for this call; None for the calls it
    answers itself (logging) or refuses by name. Raises HostCallError for an undecodable payload."""
    if binding == "kubernetes":
        if namespace not in _LEGACY_KUBERNETES_LISTS:
            return None
        api_version, kind = _LEGACY_KUBERNETES_LISTS[namespace]
        return HostRequest("KubernetesListResourceAll", {
            "api_version": api_version, "kind": kind, "label_selector": None, "field_selector": None})
    if binding != "kubewarden":
        return None
    if namespace == "oci":
        if operation in _OCI_IMAGE_OPERATIONS:
            return _image_request(_OCI_IMAGE_OPERATIONS[operation], payload)
        if operation == "v1/verify":
            return _tagged_request(_payload(payload), _SIGSTORE_V1, internally=False)
        if operation == "v2/verify":
            return _tagged_request(_payload(payload), _SIGSTORE_V2, internally=True)
    elif namespace == "net" and operation == "v1/dns_lookup_host":
        host = _payload(payload)
        if not isinstance(host, str):
            raise HostCallError(f"invalid type: {_json_type(host)}, expected a string")
        return HostRequest("DNSLookupHost", {"host": host})
    elif namespace == "crypto" and operation == "v1/is_certificate_trusted":
        request = _payload(payload)
        if not isinstance(request, dict):
            raise HostCallError(f"invalid type: {_json_type(request)}, expected struct CertificateVerificationRequest")
        return HostRequest("CryptoIsCertificateTrusted", {"request": request})
    elif namespace == "kubernetes":
        if operation in _KUBERNETES_REQUESTS:
            kind, struct = _KUBERNETES_REQUESTS[operation]
            return _request(kind, _payload(payload), struct)
        if operation == "can_i":
            doc = _payload(payload)
            if not isinstance(doc, dict):
                raise HostCallError(f"invalid type: {_json_type(doc)}, expected struct CanIRequest")
            if doc.get("subject_access_review") is None:
                raise HostCallError("missing field `subject_access_review`")
            return _request("KubernetesCanI", {"request": doc["subject_access_review"],
                                               "disable_cache": doc.get("disable_cache")}, "CanIRequest")
    return None


def access_denied_message(api_version: str, kind: str) -> str:
    return (f"Policy has not been granted access to Kubernetes {api_version}/{kind} resources. "
            "The violation has been reported.")


class HostHandler(Protocol):
    """Answers decoded host requests. `direct` computes this build's own answer to the call."""

    def answer(self, request: HostRequest, direct: Callable[[], bytes]) -> bytes: ...

    def finish(self) -> None:
        """The evaluation is over (a recording is written now)."""


class DirectHandler:
    """This build's own answers, behind the reference's decoding and allow-list checks."""

    def answer(self, request: HostRequest, direct: Callable[[], bytes]) -> bytes:
        return direct()

    def finish(self) -> None:
        pass


@dataclass(frozen=True)
class Capabilities:
    policy_id: str
    allowed_resources: tuple[ContextAwareResource, ...] = ()
    # None: the server's answers as they are; a handler also gets the reference's decoding and checks.
    handler: HostHandler | None = None

    def __call__(self, binding: str, namespace: str, operation: str, payload: bytes) -> bytes:
        if self.handler is not None:
            request = host_request(binding, namespace, operation, payload)
            if request is not None:
                if binding == "kubewarden":  # the legacy `kubernetes` binding is not checked (reference QUIRK)
                    self._check_access(request)
                return self.handler.answer(request, lambda: self._direct(binding, namespace, operation, payload))
        return self._direct(binding, namespace, operation, payload)

    def _check_access(self, request: HostRequest) -> None:
        if request.kind not in _ACCESS_CHECKED:
            return  # can_i is not restricted
        api_version, kind = request.fields["api_version"], request.fields["kind"]
        if ContextAwareResource(api_version, kind) not in self.allowed_resources:
            log.error("policy %s tried to access Kubernetes %s/%s resources it has not been granted (allowed: %s)",
                      self.policy_id, api_version, kind,
                      ", ".join(f"{r.api_version}/{r.kind}" for r in self.allowed_resources) or "none")
            raise HostCallError(access_denied_message(api_version, kind))

    def _direct(self, binding: str, namespace: str, operation: str, payload: bytes) -> bytes:
        if binding == "kubewarden":
            if namespace == "tracing":
                if operation != "log":
                    raise HostCallError(f"unknown operation: {operation}")
                self._log(payload)
                return b""
            if namespace == "kubernetes":
                if operation not in _KUBERNETES_OPERATIONS:
                    raise HostCallError(f"unknown operation: {operation}")
                raise HostCallError(NO_KUBERNETES_CLIENT)
            if namespace == "net":
                if operation != "v1/dns_lookup_host":
                    raise HostCallError(f"unknown operation: {operation}")
                return dns_lookup_host(payload)
            raise HostCallError(f"unknown namespace: {namespace}")
        if binding == "kubernetes":
            if namespace in _LEGACY_KUBERNETES_NAMESPACES:
                log.warning("policy %s uses the deprecated `kubernetes` host binding", self.policy_id)
                raise HostCallError(NO_KUBERNETES_CLIENT)
            raise HostCallError(f"unknown namespace: {namespace}")
        raise HostCallError(f"unknown binding: {binding}")

    def _log(self, payload: bytes) -> None:
        """Policy log lines never fail the guest; a malformed one is only reported here."""
        try:
            entry = orjson.loads(payload)
            if not isinstance(entry, dict):
                raise ValueError("expected a JSON object")
        except ValueError as exc:
            log.warning("policy %s sent a malformed log entry: %s", self.policy_id, exc)
            return
        level = _LEVELS.get(str(entry.pop("level", "info")).lower(), logging.INFO)
        message = entry.pop("message", "")
        data = orjson.dumps(entry).decode() if entry else ""
        policy_log.log(level, "%s", message, extra={"policy_id": self.policy_id, "data": data})
