"""Keyless cosign signatures: a Fulcio certificate and a Rekor bundle beside a simple-signing payload.

`cosign sign` without a key stores, on each signature layer, the certificate Fulcio issued for the signer's
OIDC identity (`dev.sigstore.cosign/certificate`, PEM) and the Rekor log's promise to include the signature
(`dev.sigstore.cosign/bundle`: the entry body, its integrated time and index, the log id and the signed entry
timestamp, SET). `check` trusts such a signature, against a `TrustRoot`, as cosign verifies it:

- the SET verifies with the key of the Rekor log the bundle names (a log of the trust root, whose key was
  valid at the integrated time), and the entry it covers is this signature: a `hashedrekord` (or `rekord`)
  of the payload's sha256, this signature and this certificate;
- the certificate chains to a Fulcio CA of the trust root that was issuing at the certificate's start (the
  chain is checked at that instant, as cosign and the reference do), has the digital signature and code
  signing usages, and was valid at the integrated time;
- its embedded SCT verifies with a CT log key of the trust root, when the trust root lists CT logs;
- the signature verifies with the certificate's key over the payload.

The signer's identity is then the certificate's first email or URI name, its OIDC issuer and, for GitHub
Actions, the workflow's repository. Everything uses `cryptography` (its RFC 5280 path validation, SCT
parsing and signatures): the checks cost no import beyond what the signature callbacks already load.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.certificate_transparency import LogEntryType
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from kwserver.sources.sigstore_trust import TrustRoot

CERTIFICATE_ANNOTATION = "dev.sigstore.cosign/certificate"
BUNDLE_ANNOTATION = "dev.sigstore.cosign/bundle"
ISSUER_OID = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")  # raw UTF-8, the one the reference reads
ISSUER_V2_OID = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")  # DER UTF8String, Fulcio's newer form
GITHUB_REPOSITORY_OID = ObjectIdentifier("1.3.6.1.4.1.57264.1.5")  # raw UTF-8 "owner/repo"
SOURCE_REPOSITORY_URI_OID = ObjectIdentifier("1.3.6.1.4.1.57264.1.12")  # DER UTF8String
NO_BUNDLE = f"no Rekor bundle ({BUNDLE_ANNOTATION}): the signature is not in the transparency log"


class KeylessError(Exception):
    """Why a keyless signature cannot be trusted."""


@dataclass(frozen=True)
class Identity:
    subject: str  # the certificate's first email or URI name
    subject_is_uri: bool
    issuer: str | None  # the OIDC issuer
    github_repository: str | None  # "owner/repo" of the workflow, for GitHub Actions identities


def verify_signature(key: Any, signature: bytes, payload: bytes) -> bool:
    """Whether `signature` over `payload` verifies with `key` (ECDSA with its curve's hash, RSA PKCS#1 v1.5
    or PSS with SHA-256, Ed25519): cosign's signature schemes."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            digest = hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256()
            key.verify(signature, payload, ec.ECDSA(digest))
        elif isinstance(key, rsa.RSAPublicKey):
            try:
                key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                key.verify(signature, payload, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO),
                           hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, payload)
        else:
            return False
    except InvalidSignature:
        return False
    return True


# --- the Rekor bundle ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RekorBundle:
    body: str  # base64 of the entry's JSON, as logged
    integrated_time: int
    log_index: int
    log_id: str  # hex
    signed_entry_timestamp: bytes

    @property
    def canonical_payload(self) -> bytes:
        """What the SET signs: the payload as RFC 8785 canonical JSON (sorted keys, no spaces)."""
        return json.dumps({"body": self.body, "integratedTime": self.integrated_time, "logID": self.log_id,
                           "logIndex": self.log_index}, sort_keys=True, separators=(",", ":")).encode()

    @property
    def integrated_at(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.integrated_time, datetime.UTC)


def parse_bundle(text: str) -> RekorBundle:
    try:
        doc = json.loads(text)
        payload = doc["Payload"]
        fields = (payload["body"], payload["integratedTime"], payload["logIndex"], payload["logID"])
        set_text = doc["SignedEntryTimestamp"]
    except (ValueError, KeyError, TypeError) as exc:
        raise KeylessError(f"the Rekor bundle is not valid: {type(exc).__name__}: {exc}") from None
    body, integrated_time, log_index, log_id = fields
    if not (isinstance(body, str) and isinstance(log_id, str) and isinstance(set_text, str)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in (integrated_time, log_index))):
        raise KeylessError("the Rekor bundle is not valid: a field has the wrong type")
    return RekorBundle(body, integrated_time, log_index, log_id, _b64(set_text, "the signed entry timestamp"))


def check_bundle(bundle: RekorBundle, root: TrustRoot) -> None:
    log = root.rekor_logs.get(bundle.log_id)
    if log is None:
        raise KeylessError(f"the Rekor bundle is signed by log {bundle.log_id}, which is not a Rekor log of the "
                           f"trust root {root.source}")
    if not log.valid_for.contains(bundle.integrated_at):
        raise KeylessError(f"the key of Rekor log {log.base_url or log.log_id} was not in use at the integrated "
                           f"time {bundle.integrated_at:%Y-%m-%dT%H:%M:%SZ}")
    if not verify_signature(log.key, bundle.signed_entry_timestamp, bundle.canonical_payload):
        raise KeylessError(f"the Rekor bundle's signed entry timestamp does not verify with the key of log "
                           f"{log.base_url or log.log_id}")


def check_entry(bundle: RekorBundle, payload: bytes, signature: bytes, certificate: x509.Certificate) -> None:
    """The logged entry must be this very signature (a bundle cannot be moved to another signature)."""
    try:
        entry = json.loads(base64.b64decode(bundle.body, validate=True))
        kind, spec = entry["kind"], entry["spec"]
        digest = spec["data"]["hash"]
        logged_signature = spec["signature"]["content"]
        logged_key = spec["signature"]["publicKey"]["content"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise KeylessError("the Rekor entry in the bundle is not a hashedrekord or rekord entry") from None
    if kind not in ("hashedrekord", "rekord"):
        raise KeylessError(f"the Rekor entry is a `{kind}` entry, not a signature (hashedrekord)")
    if digest != {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()}:
        raise KeylessError("the Rekor entry is for another payload (its sha256 differs)")
    if _b64(logged_signature, "the logged signature") != signature:
        raise KeylessError("the Rekor entry is for another signature")
    logged = _b64(logged_key, "the logged certificate")
    try:
        same = x509.load_pem_x509_certificate(logged) == certificate
    except ValueError:
        try:
            same = serialization.load_pem_public_key(logged) == certificate.public_key()
        except ValueError:
            same = False
    if not same:
        raise KeylessError("the Rekor entry is for another certificate")


# --- the certificate -----------------------------------------------------------------------------

def _path_to_fulcio(certificate: x509.Certificate, root: TrustRoot) -> list[x509.Certificate]:
    """The chain from `certificate` to a Fulcio CA, checked at the certificate's start."""
    at = certificate.not_valid_before_utc
    anchors = root.fulcio_certificates(at)
    if not anchors:
        raise KeylessError(f"no Fulcio CA of the trust root {root.source} was issuing at "
                           f"{at:%Y-%m-%dT%H:%M:%SZ}, when the certificate was issued")
    # Fulcio's leaves carry code signing, not client auth: any EKU passes here, code signing is checked below.
    ca_policy = ExtensionPolicy.webpki_defaults_ca().may_be_present(x509.ExtendedKeyUsage,
                                                                   Criticality.NON_CRITICAL, None)
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(x509.ExtendedKeyUsage,
                                                                   Criticality.NON_CRITICAL, None)
    verifier = (PolicyBuilder().store(Store(anchors)).time(at)
                .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy).build_client_verifier())
    try:
        return verifier.verify(certificate, []).chain
    except (VerificationError, x509.UnsupportedGeneralNameType, ValueError) as exc:
        raise KeylessError(f"the certificate (issued by {certificate.issuer.rfc4514_string()}) does not chain to "
                           f"a Fulcio CA of the trust root {root.source}: {exc}") from None


def _check_usages(certificate: x509.Certificate) -> None:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        extended = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise KeylessError("the certificate has no key usage or no extended key usage") from None
    if not usage.digital_signature:
        raise KeylessError("the certificate's key usage is not digital signature")
    if ExtendedKeyUsageOID.CODE_SIGNING not in extended:
        raise KeylessError("the certificate's extended key usage is not code signing")


def _sct_signed_data(sct: Any, certificate: x509.Certificate, issuer_key_hash: bytes) -> bytes:
    """RFC 6962 §3.2: what a CT log signs for a precertificate entry."""
    tbs = certificate.tbs_precertificate_bytes
    timestamp = int(sct.timestamp.replace(tzinfo=datetime.UTC).timestamp() * 1000)
    return (struct.pack("!BBQH", sct.version.value, 0, timestamp, LogEntryType.PRE_CERTIFICATE.value)
            + issuer_key_hash + len(tbs).to_bytes(3, "big") + tbs
            + struct.pack("!H", len(sct.extension_bytes)) + sct.extension_bytes)


def _check_sct(certificate: x509.Certificate, issuer: x509.Certificate, root: TrustRoot) -> None:
    try:
        scts = certificate.extensions.get_extension_for_class(x509.PrecertificateSignedCertificateTimestamps).value
    except x509.ExtensionNotFound:
        raise KeylessError("the certificate has no embedded SCT (certificate transparency proof)") from None
    issuer_key_hash = hashlib.sha256(issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()
    problems = []
    for sct in scts:
        log = root.ct_logs.get(sct.log_id.hex())
        if log is None:
            problems.append(f"log {sct.log_id.hex()} is not a CT log of the trust root")
        elif sct.entry_type != LogEntryType.PRE_CERTIFICATE:
            problems.append(f"the SCT of log {log.base_url or log.log_id} is not for a precertificate")
        elif not verify_signature(log.key, sct.signature, _sct_signed_data(sct, certificate, issuer_key_hash)):
            problems.append(f"the SCT of log {log.base_url or log.log_id} does not verify")
        else:
            return
    raise KeylessError(f"the certificate's SCT cannot be trusted: {'; '.join(problems) or 'none'}")


def _der_utf8(value: bytes) -> str | None:
    """The text of a DER UTF8String (short or long length form)."""
    if len(value) < 2 or value[0] != 0x0C:
        return None
    length, start = value[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, start = int.from_bytes(value[2:2 + count], "big"), 2 + count
    return value[start:start + length].decode("utf-8", "replace")


def _extension(certificate: x509.Certificate, oid: ObjectIdentifier) -> bytes | None:
    try:
        return certificate.extensions.get_extension_for_oid(oid).value.value
    except x509.ExtensionNotFound:
        return None


def identity(certificate: x509.Certificate) -> Identity:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise KeylessError("the certificate has no subject alternative name") from None
    subject = next(((n.value, isinstance(n, x509.UniformResourceIdentifier)) for n in names
                    if isinstance(n, (x509.RFC822Name, x509.UniformResourceIdentifier))), None)
    if subject is None:
        raise KeylessError("the certificate names no email or URI subject")
    legacy_issuer = _extension(certificate, ISSUER_OID)
    issuer_v2 = _extension(certificate, ISSUER_V2_OID)
    issuer = legacy_issuer.decode("utf-8", "replace") if legacy_issuer is not None else \
        _der_utf8(issuer_v2) if issuer_v2 is not None else None
    repository = _extension(certificate, GITHUB_REPOSITORY_OID)
    source_uri = _extension(certificate, SOURCE_REPOSITORY_URI_OID)
    github_repository = repository.decode("utf-8", "replace") if repository is not None else None
    if github_repository is None and source_uri is not None:
        uri = _der_utf8(source_uri) or ""
        if uri.startswith("https://github.com/"):
            github_repository = uri.removeprefix("https://github.com/")
    return Identity(subject[0], subject[1], issuer, github_repository)


# --- one signature -------------------------------------------------------------------------------

def check_logged(payload: bytes, signature: bytes, certificate: x509.Certificate, bundle_text: str | None,
                 root: TrustRoot) -> RekorBundle:
    """The Rekor bundle of this signature, verified, logged while `certificate` was valid."""
    if bundle_text is None:
        raise KeylessError(NO_BUNDLE)
    bundle = parse_bundle(bundle_text)
    check_bundle(bundle, root)
    check_entry(bundle, payload, signature, certificate)
    if not certificate.not_valid_before_utc <= bundle.integrated_at <= certificate.not_valid_after_utc:
        raise KeylessError(
            f"the certificate was not valid when the signature was logged: integrated time "
            f"{bundle.integrated_at:%Y-%m-%dT%H:%M:%SZ}, certificate valid from "
            f"{certificate.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
            f"{certificate.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    return bundle


def check(payload: bytes, signature: bytes, certificate_pem: str, bundle_text: str | None,
          root: TrustRoot) -> Identity:
    """The signer's identity when the keyless signature holds against `root`, else KeylessError."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError as exc:
        raise KeylessError(f"the certificate is not a valid PEM certificate: {exc}") from None
    chain = _path_to_fulcio(certificate, root)
    _check_usages(certificate)
    check_logged(payload, signature, certificate, bundle_text, root)
    if root.ct_logs:
        _check_sct(certificate, chain[1], root)
    if not verify_signature(certificate.public_key(), signature, payload):
        raise KeylessError("the signature does not verify with the certificate's key")
    return identity(certificate)


def _b64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise KeylessError(f"{what} is not base64") from None
