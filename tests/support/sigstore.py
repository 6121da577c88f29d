"""A Sigstore made by the tests: a Fulcio-like CA (root and intermediate), a Rekor log key, a CT log key,
their trust root, and keyless signatures stored as `cosign sign` stores them (certificate with an embedded
SCT, Rekor bundle with a signed entry timestamp, simple-signing payload), pushed to a real registry.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from tests.support.registries import Registry, raw_push

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
ISSUER_OID = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
ISSUER_V2_OID = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
GITHUB_REPOSITORY_OID = ObjectIdentifier("1.3.6.1.4.1.57264.1.5")
SCT_LIST_OID = ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigstore.test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _der_octets(data: bytes) -> bytes:
    length = len(data)
    encoded = bytes([length]) if length < 0x80 else bytes([0x82]) + length.to_bytes(2, "big")
    return b"\x04" + encoded + data


def _der_utf8(text: str) -> bytes:
    data = text.encode()
    return bytes([0x0C, len(data)]) + data


@dataclass
class Authority:
    """A CA: its key and certificate."""
    key: Any
    certificate: x509.Certificate


def make_authority(common_name: str, issuer: Authority | None = None, *, path_length: int | None = None) -> Authority:
    key = ec.generate_private_key(ec.SECP384R1())
    signer = issuer.key if issuer else key
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(issuer.certificate.subject if issuer else _name(common_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(days=365))
               .not_valid_after(NOW + datetime.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    return Authority(key, builder.sign(signer, hashes.SHA384()))


@dataclass
class Sigstore:
    """One Sigstore instance: Fulcio (root + intermediate), Rekor and a CT log, all keys made here."""
    name: str = "test"
    root: Authority = field(init=False)
    intermediate: Authority = field(init=False)
    rekor_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    ct_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    log_index: int = 0

    def __post_init__(self) -> None:
        self.root = make_authority(f"{self.name}-fulcio-root", path_length=1)
        self.intermediate = make_authority(f"{self.name}-fulcio-intermediate", self.root, path_length=0)

    @property
    def rekor_log_id(self) -> str:
        return hashlib.sha256(_spki(self.rekor_key.public_key())).hexdigest()

    # --- the trust root ------------------------------------------------------------------------
    def trusted_root(self, *, ctlogs: bool = True, authorities: bool = True) -> dict[str, Any]:
        def log(key: Any, url: str) -> dict[str, Any]:
            return {"baseUrl": url, "hashAlgorithm": "SHA2_256",
                    "publicKey": {"rawBytes": _b64(_spki(key.public_key())), "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                                  "validFor": {"start": "2020-01-01T00:00:00Z"}},
                    "logId": {"keyId": _b64(hashlib.sha256(_spki(key.public_key())).digest())}}

        chain = [self.intermediate.certificate, self.root.certificate]
        return {
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [log(self.rekor_key, f"https://rekor.{self.name}.test")],
            "certificateAuthorities": [{
                "subject": {"organization": "sigstore.test", "commonName": f"{self.name}-fulcio"},
                "uri": f"https://fulcio.{self.name}.test",
                "certChain": {"certificates": [{"rawBytes": _b64(c.public_bytes(serialization.Encoding.DER))}
                                               for c in chain]},
                "validFor": {"start": "2020-01-01T00:00:00.000Z"}}] if authorities else [],
            "ctlogs": [log(self.ct_key, f"https://ctfe.{self.name}.test")] if ctlogs else [],
            "timestampAuthorities": [],
        }

    def write_trust_root(self, path: Path, *, client_trust_config: bool = True, **options: Any) -> Path:
        root = self.trusted_root(**options)
        doc = {"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json", "trustedRoot": root,
               "signingConfig": {"mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json"}} \
            if client_trust_config else root
        path.write_text(json.dumps(doc, indent=2))
        return path

    # --- Fulcio --------------------------------------------------------------------------------
    def certificate(self, subject: str, issuer: str | None, *, github_repository: str | None = None,
                    not_before: datetime.datetime | None = None, minutes: int = 10, sct: bool = True,
                    ca: Authority | None = None) -> tuple[x509.Certificate, Any]:
        """A short-lived code-signing certificate for `subject` (a URI when it has a scheme, else an email),
        with the OIDC issuer in both of Fulcio's extensions and an embedded SCT of this CT log."""
        ca = ca or self.intermediate
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or NOW - datetime.timedelta(minutes=1)
        name = x509.UniformResourceIdentifier(subject) if "://" in subject else x509.RFC822Name(subject)
        builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.certificate.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(start + datetime.timedelta(minutes=minutes))
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                                  critical=False)
                   .add_extension(x509.SubjectAlternativeName([name]), critical=True))
        if issuer is not None:
            builder = builder.add_extension(x509.UnrecognizedExtension(ISSUER_OID, issuer.encode()), critical=False)
            builder = builder.add_extension(x509.UnrecognizedExtension(ISSUER_V2_OID, _der_utf8(issuer)),
                                            critical=False)
        if github_repository is not None:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(GITHUB_REPOSITORY_OID, github_repository.encode()), critical=False)
        if not sct:
            return builder.sign(ca.key, hashes.SHA256()), key
        # The CT log signs the precertificate: this certificate's TBS without the SCT list (RFC 6962).
        tbs = builder.sign(ca.key, hashes.SHA256()).tbs_certificate_bytes
        issuer_key_hash = hashlib.sha256(_spki(ca.key.public_key())).digest()
        timestamp = int(start.timestamp() * 1000)
        signed = (struct.pack("!BBQH", 0, 0, timestamp, 1) + issuer_key_hash + len(tbs).to_bytes(3, "big") + tbs
                  + struct.pack("!H", 0))
        signature = self.ct_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        entry = (bytes([0]) + hashlib.sha256(_spki(self.ct_key.public_key())).digest()
                 + struct.pack("!QH", timestamp, 0) + bytes([4, 3]) + struct.pack("!H", len(signature)) + signature)
        sct_list = struct.pack("!H", len(entry) + 2) + struct.pack("!H", len(entry)) + entry
        builder = builder.add_extension(x509.UnrecognizedExtension(SCT_LIST_OID, _der_octets(sct_list)),
                                        critical=False)
        certificate = builder.sign(ca.key, hashes.SHA256())
        assert certificate.tbs_precertificate_bytes == tbs
        return certificate, key

    # --- Rekor ---------------------------------------------------------------------------------
    def bundle(self, payload: bytes, signature: bytes, certificate: x509.Certificate, *,
               integrated_time: datetime.datetime | None = None, log_key: Any = None) -> str:
        """cosign's `dev.sigstore.cosign/bundle`: the hashedrekord entry and its signed entry timestamp."""
        log_key = log_key or self.rekor_key
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        body = {"apiVersion": "0.0.1", "kind": "hashedrekord", "spec": {
            "data": {"hash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()}},
            "signature": {"content": _b64(signature), "publicKey": {"content": _b64(pem)}}}}
        self.log_index += 1
        entry = {"body": _b64(json.dumps(body, separators=(",", ":")).encode()),
                 "integratedTime": int((integrated_time or NOW).timestamp()),
                 "logID": hashlib.sha256(_spki(log_key.public_key())).hexdigest(), "logIndex": self.log_index}
        canonical = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        return json.dumps({"SignedEntryTimestamp": _b64(log_key.sign(canonical, ec.ECDSA(hashes.SHA256()))),
                           "Payload": entry})


@dataclass
class Signer:
    """How one keyless signature is made (each field a way to make it wrong)."""
    subject: str
    issuer: str | None = GITHUB_ISSUER
    github_repository: str | None = None
    sigstore: Sigstore | None = None  # whose Fulcio issues the certificate (default: the trusted one)
    log_key: Any = None  # which log signs the SET (default: the trusted Rekor)
    integrated_time: datetime.datetime | None = None
    not_before: datetime.datetime | None = None
    sct: bool = True
    tamper_payload: bool = False
    bundle: bool = True
    annotations: dict[str, str] | None = None


def github(owner_repo: str, workflow: str = "release.yml", ref: str = "refs/tags/v1.0.0", **extra: Any) -> Signer:
    """A GitHub Actions identity, as Fulcio issues it for a workflow run."""
    return Signer(f"https://github.com/{owner_repo}/.github/workflows/{workflow}@{ref}", GITHUB_ISSUER,
                  github_repository=owner_repo, **extra)


def simple_signing(registry: Registry, repository: str, digest: str, annotations: dict[str, str] | None) -> bytes:
    return json.dumps({"critical": {"identity": {"docker-reference": f"{registry.host}/{repository}"},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": "cosign container image signature"},
                       "optional": annotations}).encode()


def keyless_layer(trusted: Sigstore, payload: bytes, signer: Signer) -> tuple[str, bytes, dict[str, str]]:
    issuing = signer.sigstore or trusted
    certificate, key = issuing.certificate(signer.subject, signer.issuer, github_repository=signer.github_repository,
                                           not_before=signer.not_before, sct=signer.sct)
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    annotations = {"dev.cosignproject.cosign/signature": _b64(signature),
                   "dev.sigstore.cosign/certificate": certificate.public_bytes(serialization.Encoding.PEM).decode(),
                   "dev.sigstore.cosign/chain": "".join(
                       c.public_bytes(serialization.Encoding.PEM).decode()
                       for c in (issuing.intermediate.certificate, issuing.root.certificate))}
    if signer.bundle:
        annotations["dev.sigstore.cosign/bundle"] = trusted.bundle(
            payload, signature, certificate, integrated_time=signer.integrated_time, log_key=signer.log_key)
    if signer.tamper_payload:
        payload = payload.replace(b'"critical"', b'"critical" ', 1)
    return "application/vnd.dev.cosign.simplesigning.v1+json", payload, annotations


def cosign_sign_keyless(registry: Registry, repository: str, digest: str, trusted: Sigstore,
                        signers: list[Signer]) -> None:
    """Store keyless signatures of `digest` under `sha256-<hex>.sig`, as `cosign sign` does."""
    layers = [keyless_layer(trusted, simple_signing(registry, repository, digest, s.annotations), s) for s in signers]
    raw_push(registry, repository, digest.replace(":", "-") + ".sig", layers,
             config=("application/vnd.oci.image.config.v1+json", b'{"architecture":"","os":""}'))
