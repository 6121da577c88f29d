"""The reference's callback requests: what a guest's host call asks for, decoded from its payload.

Every call the reference hands to its asynchronous callback handler is decoded into a `HostRequest` (the
reference's request variant by name, and its fields), with serde's wording for payloads that do not decode.
Session files (`kwserver.commands.host_sessions`) store these, and the Kubernetes callbacks are answered from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


class HostCallError(Exception):
    """A failed host call; its text is the error the guest reads."""


# How a field of a request is read from the guest's JSON payload. MASKS: an optional set of strings
# (`field_masks`), kept sorted and without repeats as the reference's BTreeSet.
STRING, BOOL, VALUE, OPTIONAL, MASKS = "string", "bool", "value", "optional", "masks"

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
                                        ("label_selector", OPTIONAL), ("field_selector", OPTIONAL),
                                        ("field_masks", MASKS)),
    "KubernetesListResourceAll": (("api_version", STRING), ("kind", STRING), ("label_selector", OPTIONAL),
                                  ("field_selector", OPTIONAL), ("field_masks", MASKS)),
    "KubernetesGetResource": (("api_version", STRING), ("kind", STRING), ("name", STRING),
                              ("namespace", OPTIONAL), ("disable_cache", BOOL), ("field_masks", MASKS)),
    "KubernetesCanI": (("request", VALUE), ("disable_cache", BOOL)),
    # Made by the host for the inventory of OPA policies, never by a guest.
    "KubernetesGetResourcePluralName": (("api_version", STRING), ("kind", STRING)),
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
        if rule == MASKS:
            fields[name] = None if value is None else _string_set(value)
            continue
        if value is None:
            raise HostCallError(f"missing field `{name}`")
        if rule == STRING and not isinstance(value, str):
            raise HostCallError(f"invalid type: {_json_type(value)}, expected a string")
        if rule == BOOL and not isinstance(value, bool):
            raise HostCallError(f"invalid type: {_json_type(value)}, expected a boolean")
        fields[name] = value
    return HostRequest(kind, fields)


def _string_set(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise HostCallError(f"invalid type: {_json_type(value)}, expected a sequence")
    for item in value:
        if not isinstance(item, str):
            raise HostCallError(f"invalid type: {_json_type(item)}, expected a string")
    return sorted(set(value))


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
