"""`kubewarden/oci/v1/verify` and `v2/verify`: cosign signatures of an image, checked as verification.yml's
are (kwserver.sources.verification: the `sha256-<digest>.sig` simple-signing payloads, ECDSA / RSA /
Ed25519 keys, annotations), through the same registry settings as the OCI callbacks.

Public-key and keyless requests become `allOf` constraints (one per key, per issuer/subject or URL
prefix, or one GitHub Actions owner/repo), as the reference maps them; keyless signatures are checked
against the Sigstore trust root (`--sigstore-trust-config`, else the shipped public-good root), read on
the first keyless request. Certificate requests: the certificate against its chain (as
`crypto/v1/is_certificate_trusted` checks, now), the signatures with its public key and, when a signature
carries a Rekor bundle (required with `require_rekor_bundle`), the bundle against the trust root's Rekor
keys, logged while the certificate was valid. Only successes are cached, 60 s.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization

from kwserver.capabilities import crypto
from kwserver.capabilities.callback_requests import HostCallError, HostRequest, _json_type
from kwserver.capabilities.oci import image_reference
from kwserver.capabilities.registry_access import RegistryAccess
from kwserver.capabilities.waiting import CALLBACK_FAILURE, until_deadline
from kwserver.sources import keyless, verification
from kwserver.sources.errors import SourceError
from kwserver.sources.references import ImageReference

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


def _keyless_constraints(request: HostRequest,
                         annotations: dict[str, str]) -> list[verification.GenericIssuer | verification.GithubAction]:
    """The verification.yml entries the reference builds from a keyless request, all required."""
    fields = request.fields
    if request.kind == "SigstoreGithubActionsVerify":
        if not isinstance(fields["owner"], str) or not fields["owner"]:
            raise _failure("Must provide owner info")
        repo = fields.get("repo")
        if repo is not None and not isinstance(repo, str):
            raise HostCallError(f"invalid type: {_json_type(repo)}, expected a string")
        return [verification.GithubAction(fields["owner"], repo, annotations)]
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
        subject = entry.get(subject_key)
        if not isinstance(subject, str):
            raise HostCallError(f"missing field `{subject_key}`")
        if not prefix:
            constraints.append(verification.GenericIssuer(entry["issuer"], subject, False, annotations))
            continue
        try:
            constraints.append(verification.GenericIssuer(
                entry["issuer"], verification.url_prefix(subject), True, annotations,
                verification.url_prefix(subject, slash=False)))
        except ValueError as exc:
            raise _failure(f"Cannot build url prefix: {exc}") from None
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
    require_bundle = bool(fields["require_rekor_bundle"])

    def check(reference: ImageReference) -> bytes:
        client = access.client(reference, deadline)
        digest = client.manifest(reference).digest
        signed = [p for p in verification.signed_payloads(client, reference, digest) if constraint.satisfied_by(p)]
        rejected = []
        for payload in signed:  # as the reference: a bundle, when there is one, must hold
            try:
                if payload.bundle is not None:
                    keyless.check_logged(payload.payload, payload.signature, certificate, payload.bundle,
                                         access.trust_root())
                elif require_bundle:
                    raise keyless.KeylessError(keyless.NO_BUNDLE)
            except keyless.KeylessError as exc:
                rejected.append(f"- {payload.layer}: {exc}\n")
                continue
            return orjson.dumps({"is_trusted": True, "digest": digest})
        if rejected:
            raise verification.VerificationError(
                "verification failed: the signatures made by the certificate's key are not in the transparency "
                "log as required:\n" + "".join(rejected))
        raise verification.VerificationError(
            "verification failed: no signature of the image is made by the certificate's key"
            + (" with the requested annotations" if annotations else ""))
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
    config = verification.VerificationConfig(all_of=tuple(_keyless_constraints(request, annotations)))

    def check(reference: ImageReference) -> bytes:
        client = access.client(reference, deadline)
        digest = verification.verify(client, reference, config, access.trust_root)
        return orjson.dumps({"is_trusted": True, "digest": digest})
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
