"""verification.yml (`--verification-path`): cosign signatures a policy must carry before it is used.

Signatures are found as cosign stores them: beside the artifact, under the tag
`sha256-<manifest hex>.sig`, an OCI manifest whose layers are simple-signing payloads
(`application/vnd.dev.cosign.simplesigning.v1+json`) with the base64 signature in the layer
annotation `dev.cosignproject.cosign/signature`. A payload counts for a module only when its
`docker-manifest-digest` is the module's manifest digest; its `optional` map holds the annotations
that `pubKey` entries can require. Signatures are checked with `cryptography` (ECDSA, RSA, Ed25519).

Keyless entries (`genericIssuer`, `githubAction`) need Fulcio certificates checked against the
sigstore trust root and Rekor's transparency log; this build cannot do that offline, so a
configuration with such entries is refused at startup rather than half-checked.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from kwserver.config import ConfigError
from kwserver.sources.errors import ChecksumError, VerificationError
from kwserver.sources.oci import OciClient, sha256_digest, wasm_layer
from kwserver.sources.references import ImageReference

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
KEYLESS_KINDS = ("genericIssuer", "githubAction")
_SIGNATURE_KEYS = {"pubKey": ({"key"}, {"owner", "annotations"}),
                   "genericIssuer": ({"issuer", "subject"}, {"annotations"}),
                   "githubAction": ({"owner"}, {"repo", "annotations"})}


@dataclass(frozen=True)
class PubKey:
    key_pem: str
    key: Any
    owner: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        doc: dict[str, Any] = {"kind": "pubKey", "owner": self.owner, "key": self.key_pem,
                               "annotations": self.annotations or None}
        return yaml.safe_dump(doc, sort_keys=False)

    def satisfied_by(self, layer: SignedPayload) -> bool:
        if any(layer.annotations.get(k) != v for k, v in self.annotations.items()):
            return False
        return verify_signature(self.key, layer.signature, layer.payload)


@dataclass(frozen=True)
class VerificationConfig:
    all_of: tuple[PubKey, ...] = ()
    any_of: tuple[PubKey, ...] = ()
    minimum_matches: int = 1
    has_any_of: bool = False


@dataclass(frozen=True)
class SignedPayload:
    payload: bytes
    signature: bytes
    annotations: dict[str, str]


def verify_signature(key: Any, signature: bytes, payload: bytes) -> bool:
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


# --- verification.yml ----------------------------------------------------------------------------

def _annotations(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{where}: annotations must be a map of strings")
    return {str(k): v for k, v in value.items()}


def _signature(doc: Any, where: str) -> PubKey:
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str) or doc["kind"] not in _SIGNATURE_KEYS:
        raise ConfigError(f"{where}: unknown variant, expected `kind` to be one of pubKey, genericIssuer, githubAction")
    kind = doc["kind"]
    required, optional = _SIGNATURE_KEYS[kind]
    unknown = sorted(map(str, set(doc) - required - optional - {"kind"}))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} in a `{kind}` entry")
    missing = sorted(required - set(doc))
    if missing:
        raise ConfigError(f"{where}: missing field `{missing[0]}`")
    if kind in KEYLESS_KINDS:
        raise ConfigError(
            f"{where}: keyless signatures (`{kind}`) are not supported by this build: checking them needs the "
            "sigstore trust root (Fulcio certificates, Rekor transparency log), which kwserver cannot verify "
            "offline; use `pubKey` entries")
    if not isinstance(doc["key"], str):
        raise ConfigError(f"{where}: `key` must be a PEM public key")
    try:
        key = serialization.load_pem_public_key(doc["key"].encode())
    except ValueError as exc:
        raise ConfigError(f"{where}: `key` is not a valid PEM public key: {exc}") from None
    owner = doc.get("owner")
    return PubKey(doc["key"], key, str(owner) if owner is not None else None,
                  _annotations(doc.get("annotations"), where))


def parse_verification(doc: Any) -> VerificationConfig:
    if not isinstance(doc, dict):
        raise ConfigError("Not a valid configuration file: the top level must be a map")
    if doc.get("apiVersion") != "v1":
        raise ConfigError(f"Not a supported configuration version: {doc.get('apiVersion')!r}")
    unknown = sorted(map(str, set(doc) - {"apiVersion", "allOf", "anyOf"}))
    if unknown:
        raise ConfigError(f"Not a valid configuration file: unknown field(s) {unknown}")
    all_of, any_of = doc.get("allOf"), doc.get("anyOf")
    if all_of is None and any_of is None:
        raise ConfigError("config is missing signatures in both allOf and anyOff list")
    if all_of is not None and not isinstance(all_of, list):
        raise ConfigError("Not a valid configuration file: allOf must be a list of signatures")
    minimum, any_signatures = 1, []
    if any_of is not None:
        if not isinstance(any_of, dict) or not isinstance(any_of.get("signatures"), list):
            raise ConfigError("Not a valid configuration file: anyOf needs a `signatures` list")
        extra = sorted(map(str, set(any_of) - {"signatures", "minimumMatches"}))
        if extra:
            raise ConfigError(f"Not a valid configuration file: unknown field(s) {extra} in anyOf")
        minimum = any_of.get("minimumMatches", 1)
        if isinstance(minimum, bool) or not isinstance(minimum, int) or not 0 <= minimum <= 255:
            raise ConfigError("Not a valid configuration file: minimumMatches must be an integer from 0 to 255")
        any_signatures = any_of["signatures"]
    return VerificationConfig(
        all_of=tuple(_signature(s, f"allOf[{i}]") for i, s in enumerate(all_of or [])),
        any_of=tuple(_signature(s, f"anyOf.signatures[{i}]") for i, s in enumerate(any_signatures)),
        minimum_matches=minimum, has_any_of=any_of is not None,
    )


def load_verification(path: str | None) -> VerificationConfig | None:
    if not path:
        return None
    try:
        return parse_verification(yaml.safe_load(Path(path).read_text()))
    except OSError as exc:
        raise ConfigError(f"failed to read verification file: {path}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"invalid verification file {path}: {exc}") from exc


# --- checking a module ---------------------------------------------------------------------------

def signature_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".sig"


def signed_payloads(client: OciClient, reference: ImageReference, digest: str) -> list[SignedPayload]:
    """The simple-signing payloads stored for `digest` that name it as the signed manifest."""
    tag_reference = ImageReference(reference.registry, reference.repository, signature_tag(digest), None,
                                   f"{reference.registry}/{reference.repository}:{signature_tag(digest)}")
    manifest = client.manifest_or_none(tag_reference)
    if manifest is None:
        raise VerificationError(f"no signatures found for image: {reference}")
    payloads = []
    for layer in manifest.layers:
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLE_SIGNING:
            continue
        encoded = (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION)
        if not isinstance(encoded, str) or not isinstance(layer.get("digest"), str):
            continue
        try:
            signature = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            continue
        payload = client.blob(tag_reference, layer["digest"], layer.get("size"))
        try:
            document = json.loads(payload)
            signed_digest = document["critical"]["image"]["docker-manifest-digest"]
            annotations = document.get("optional") or {}
        except (ValueError, KeyError, TypeError):
            continue
        if signed_digest == digest and isinstance(annotations, dict):
            payloads.append(SignedPayload(payload, signature, {str(k): str(v) for k, v in annotations.items()}))
    return payloads


def check_constraints(config: VerificationConfig, payloads: list[SignedPayload]) -> None:
    def satisfied(constraint: PubKey) -> bool:
        return any(constraint.satisfied_by(p) for p in payloads)

    missing = [c for c in config.all_of if not satisfied(c)]
    if missing:
        raise VerificationError("Image verification failed: missing signatures\n"
                                "The following constraints were not satisfied:\n"
                                + "".join(c.describe() for c in missing))
    if config.has_any_of:
        unsatisfied = [c for c in config.any_of if not satisfied(c)]
        matched = len(config.any_of) - len(unsatisfied)
        if matched < config.minimum_matches:
            raise VerificationError(
                f"Image verification failed: minimum number of signatures not reached: needed "
                f"{config.minimum_matches}, got {matched}\nThe following constraints were not satisfied:\n"
                + "".join(c.describe() for c in unsatisfied))


def verify(client: OciClient, reference: ImageReference, config: VerificationConfig) -> str:
    """Check the signatures of `reference` against `config`; returns the verified manifest digest."""
    digest = client.manifest(reference).digest
    check_constraints(config, signed_payloads(client, reference, digest))
    return digest


def check_checksum(client: OciClient, reference: ImageReference, digest: str, wasm: bytes) -> None:
    """The module bytes must be the layer of the signed manifest."""
    layer = wasm_layer(client.manifest(reference.with_digest(digest)), reference)
    actual = sha256_digest(wasm)
    if actual != layer["digest"]:
        raise ChecksumError(
            "The digest of the local file doesn't match with the one reported inside of the signed manifest. "
            f"Got {actual.removeprefix('sha256:')} instead of {layer['digest'].removeprefix('sha256:')}")
