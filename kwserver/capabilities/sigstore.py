"""`kubewarden/oci/v1/verify` and `v2/verify`: cosign signatures of an image, checked as verification.yml's
are (kwserver.sources.verification: the `sha256-<digest>.sig` simple-signing payloads, ECDSA / RSA /
Ed25519 keys, annotations), through the same registry settings as the OCI callbacks.

Public-key requests become one `allOf` constraint per key, as the reference maps them. Keyless requests
(issuer/subject, URL prefix, GitHub Actions) need Fulcio certificates and Rekor's log from the sigstore
trust root, which this build does not fetch: like the reference without a trust root, their signatures
cannot count, so such a request fails with the reference's "missing signatures" error naming the
constraints. Certificate requests are checked offline: the certificate against its chain (as
`crypto/v1/is_certificate_trusted` checks, now), the signatures with its public key; one that requires a
Rekor bundle fails, as there is no Rekor key to check it with. Only successes are cached, 60 s.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from typing import Any

import orjson
import yaml
from cryptography.hazmat.primitives import serialization

from kwserver.capabilities import crypto
from kwserver.capabilities.callback_requests import HostCallError, HostRequest, _json_type
from kwserver.capabilities.oci import image_reference
from kwserver.capabilities.registry_access import RegistryAccess
from kwserver.capabilities.waiting import CALLBACK_FAILURE, until_deadline
from kwserver.sources import verification
from kwserver.sources.errors import SourceError
from kwserver.sources.references import ImageReference

KEYLESS_KINDS = ("SigstoreKeylessVerify", "SigstoreKeylessPrefixVerify", "SigstoreGithubActionsVerify")
Check = Callable[[ImageReference], bytes]  # verifies one image; its answer, or a SourceError


def _failure(text: str) -> HostCallError:
    return HostCallError(CALLBACK_FAILURE.format(text))


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list):
        raise HostCallError(f"invalid type: {_json_type(value)}, expected a sequence")
    if not all(isinstance(item, str) for item in value):
        raise HostCallError(f"invalid type: {what} must be strings")
    return value


def _annotations(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise HostCallError(f"invalid type: {_json_type(value)}, expected a map of strings")
    return dict(sorted(value.items()))


def _public_keys(pems: list[str], annotations: dict[str, str]) -> tuple[verification.PubKey, ...]:
    if not pems:
        raise _failure("Must provide at least one pub key")
    keys = []
    for pem in pems:
        try:
            key = serialization.load_pem_public_key(pem.encode())
        except ValueError as exc:
            raise _failure(f"the public key is not a valid PEM public key: {exc}") from None
        keys.append(verification.PubKey(pem, key, None, annotations))
    return tuple(keys)


def _keyless_constraints(request: HostRequest, annotations: dict[str, str]) -> list[dict[str, Any]]:
    """The verification.yml entries the reference builds from a keyless request (for its error text)."""
    extra = {"annotations": annotations or None}
    fields = request.fields
    if request.kind == "SigstoreGithubActionsVerify":
        if not isinstance(fields["owner"], str) or not fields["owner"]:
            raise _failure("Must provide owner info")
        return [{"kind": "githubAction", "owner": fields["owner"], "repo": fields.get("repo"), **extra}]
    prefix = request.kind == "SigstoreKeylessPrefixVerify"
    entries = fields["keyless_prefix" if prefix else "keyless"]
    if not isinstance(entries, list):
        raise HostCallError(f"invalid type: {_json_type(entries)}, expected a sequence")
    if not entries:
        raise _failure("Must provide keyless info")
    constraints = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("issuer"), str):
            raise HostCallError("missing field `issuer`")
        subject_key = "url_prefix" if prefix else "subject"
        if not isinstance(entry.get(subject_key), str):
            raise HostCallError(f"missing field `{subject_key}`")
        subject = {"urlPrefix": entry[subject_key]} if prefix else {"equal": entry[subject_key]}
        constraints.append({"kind": "genericIssuer", "issuer": entry["issuer"], "subject": subject, **extra})
    return constraints


def _certificate_check(request: HostRequest, access: RegistryAccess, annotations: dict[str, str],
                       deadline: float | None) -> Check:
    fields = request.fields
    certificate = crypto.load_certificate(crypto.certificate_data({"encoding": "Pem", "data": fields["certificate"]}))
    chain_data = fields.get("certificate_chain")
    if chain_data is not None:
        if not isinstance(chain_data, list):
            raise HostCallError(f"invalid type: {_json_type(chain_data)}, expected a sequence")
        chain = [crypto.load_certificate(crypto.certificate_data({"encoding": "Pem", "data": item}))
                 for item in chain_data]
        now = datetime.datetime.now(datetime.UTC)
        problem = crypto.validity_problem(certificate, now) or crypto.chain_problem(certificate, chain[:-1],
                                                                                      chain[-1:], now)
        if problem is not None:
            raise _failure(f"verification failed: the certificate is not trusted: {problem}")
    constraint = verification.PubKey("", certificate.public_key(), None, annotations)

    def check(reference: ImageReference) -> bytes:
        client = access.client(reference, deadline)
        digest = client.manifest(reference).digest
        payloads = verification.signed_payloads(client, reference, digest)
        if fields["require_rekor_bundle"]:
            raise verification.VerificationError(
                "verification failed: a Rekor bundle is required, and this build has no Rekor public key to "
                "check one with (no sigstore trust root)")
        if not any(constraint.satisfied_by(payload) for payload in payloads):
            raise verification.VerificationError(
                "verification failed: no signature of the image is made by the certificate's key"
                + (" with the requested annotations" if annotations else ""))
        return orjson.dumps({"is_trusted": True, "digest": digest})
    return check


def _cache_key(request: HostRequest) -> str:
    """The image and every parameter, hashed (certificates are long)."""
    text = orjson.dumps([request.kind, request.normalized().fields], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(text).hexdigest()


def _pub_key_check(request: HostRequest, access: RegistryAccess, annotations: dict[str, str],
                   deadline: float | None) -> Check:
    keys = _public_keys(_strings(request.fields["pub_keys"], "pub_keys"), annotations)

    def check(reference: ImageReference) -> bytes:
        client = access.client(reference, deadline)
        digest = verification.verify(client, reference, verification.VerificationConfig(all_of=keys))
        return orjson.dumps({"is_trusted": True, "digest": digest})
    return check


def _keyless_check(request: HostRequest, access: RegistryAccess, annotations: dict[str, str],
                   deadline: float | None) -> Check:
    constraints = _keyless_constraints(request, annotations)

    def check(reference: ImageReference) -> bytes:
        client = access.client(reference, deadline)
        digest = client.manifest(reference).digest
        verification.signed_payloads(client, reference, digest)  # its errors come first, as the reference's
        raise verification.VerificationError(
            "Image verification failed: missing signatures\nThe following constraints were not satisfied:\n"
            + "".join(yaml.safe_dump(c, sort_keys=False) for c in constraints))
    return check


def answer(request: HostRequest, access: RegistryAccess, deadline: float | None = None) -> bytes:
    """This build's answer to a decoded sigstore request; `deadline` (monotonic) bounds the wait."""
    annotations = _annotations(request.fields.get("annotations"))
    make_check = {"SigstoreCertificateVerify": _certificate_check,
                  "SigstorePubKeyVerify": _pub_key_check}.get(request.kind, _keyless_check)
    check = make_check(request, access, annotations, deadline)
    image = request.fields["image"]
    reference = image_reference(image)

    def verify() -> bytes:
        try:
            return until_deadline(deadline, lambda: check(reference), f"verify {image}")
        except SourceError as exc:
            raise _failure(str(exc)) from exc
    return access.answers.cached(_cache_key(request), verify)
