"""verification.yml (`--verification-path`): cosign signatures a policy must carry before it is used.

Signatures are found as cosign stores them: beside the artifact, under the tag
`sha256-<manifest hex>.sig`, an OCI manifest whose layers are simple-signing payloads
(`application/vnd.dev.cosign.simplesigning.v1+json`) with the base64 signature in the layer
annotation `dev.cosignproject.cosign/signature`. A payload counts for a module only when its
`docker-manifest-digest` is the module's manifest digest; its `optional` map holds the annotations
that entries can require.

`pubKey` entries are satisfied by a payload whose signature verifies with their key. Keyless entries
(`genericIssuer`, `githubAction`) by a payload whose Fulcio certificate and Rekor bundle hold against the
Sigstore trust root (`kwserver.sources.keyless`) and whose certificate names the entry's identity, with
the reference's matching rules. Unsatisfied entries are reported with the reference's messages; the
keyless signatures that could not be trusted, and why, are listed after them.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from cryptography.hazmat.primitives import serialization

from kwserver.config import ConfigError
from kwserver.sources import keyless
from kwserver.sources.errors import ChecksumError, VerificationError
from kwserver.sources.keyless import Identity, verify_signature
from kwserver.sources.oci import OciClient, sha256_digest, wasm_layer
from kwserver.sources.references import ImageReference
from kwserver.sources.sigstore_trust import TrustRoot

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
GITHUB_ACTIONS_ISSUER = "https://token.actions.githubusercontent.com"
_SIGNATURE_KEYS = {"pubKey": ({"key"}, {"owner", "annotations"}),
                   "genericIssuer": ({"issuer", "subject"}, {"annotations"}),
                   "githubAction": ({"owner"}, {"repo", "annotations"})}


@dataclass(frozen=True)
class SignedPayload:
    payload: bytes
    signature: bytes
    annotations: dict[str, str]  # the payload's `optional` map
    layer: str = ""  # the layer's digest, for messages
    certificate: str | None = None  # keyless: the Fulcio certificate (PEM) and the Rekor bundle (JSON)
    bundle: str | None = None
    identity: Identity | None = None  # set by `trust_keyless` when the certificate and bundle hold


def _yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, width=float("inf"))


def _scalar(value: str) -> str:
    return yaml.safe_dump(value, width=float("inf")).removesuffix("\n...\n").rstrip("\n")


def _has_annotations(wanted: dict[str, str], layer: SignedPayload) -> bool:
    return all(layer.annotations.get(k) == v for k, v in wanted.items())


@dataclass(frozen=True)
class PubKey:
    key_pem: str
    key: Any
    owner: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return _yaml({"kind": "pubKey", "owner": self.owner, "key": self.key_pem,
                      "annotations": self.annotations or None})

    def satisfied_by(self, layer: SignedPayload) -> bool:
        return _has_annotations(self.annotations, layer) and verify_signature(self.key, layer.signature,
                                                                               layer.payload)


@dataclass(frozen=True)
class GenericIssuer:
    """An OIDC issuer and a subject: equal to `subject`, or starting with the URL `subject` (url_prefix)."""
    issuer: str
    subject: str
    url_prefix: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    shown_subject: str | None = None  # the subject as the reference prints it, when not `subject`

    def describe(self) -> str:
        tag = "urlPrefix" if self.url_prefix else "equal"
        subject = _scalar(self.shown_subject or self.subject)
        return (f"kind: genericIssuer\nissuer: {_scalar(self.issuer)}\nsubject: !{tag} {subject}\n"
                + _yaml({"annotations": self.annotations or None}))

    def satisfied_by(self, layer: SignedPayload) -> bool:
        found = layer.identity
        if found is None or found.issuer != self.issuer or not _has_annotations(self.annotations, layer):
            return False
        return found.subject.startswith(self.subject) if self.url_prefix else found.subject == self.subject


@dataclass(frozen=True)
class GithubAction:
    """A GitHub Actions workflow of `owner`'s repositories (or of `owner/repo`)."""
    owner: str
    repo: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return _yaml({"kind": "githubAction", "owner": self.owner, "repo": self.repo,
                      "annotations": self.annotations or None})

    def satisfied_by(self, layer: SignedPayload) -> bool:
        found = layer.identity
        if found is None or found.issuer != GITHUB_ACTIONS_ISSUER or not found.subject_is_uri:
            return False
        # As the reference: the subject must be a GitHub URL, the repository extension says whose workflow.
        if _github_repository(found.subject) is None or found.github_repository is None:
            return False
        repository = _github_repository(f"https://github.com/{found.github_repository}")
        if repository is None or repository[0] != self.owner:
            return False
        return (self.repo is None or repository[1] == self.repo) and _has_annotations(self.annotations, layer)


def _github_repository(url: str) -> tuple[str, str] | None:
    """(owner, repo) of a github.com URL with at least two path segments."""
    parts = urlsplit(url)
    segments = parts.path.split("/")[1:]
    if parts.scheme not in ("http", "https") or parts.hostname != "github.com" or len(segments) < 2:
        return None
    return segments[0], segments[1]


Constraint = PubKey | GenericIssuer | GithubAction


@dataclass(frozen=True)
class VerificationConfig:
    all_of: tuple[Constraint, ...] = ()
    any_of: tuple[Constraint, ...] = ()
    minimum_matches: int = 1
    has_any_of: bool = False

    @property
    def keyless(self) -> bool:
        return any(not isinstance(c, PubKey) for c in (*self.all_of, *self.any_of))


# --- verification.yml ----------------------------------------------------------------------------

def _annotations(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{where}: annotations must be a map of strings")
    return {str(k): v for k, v in value.items()}


def url_prefix(text: str, *, slash: bool = True) -> str:
    """A subject URL prefix as the reference normalizes it: an absolute URL whose path ends with `/`
    (`https://github.com/kubewarden` must not match `https://github.com/kubewarden-malicious/...`).
    Without `slash`, only parsed (`https://github.com` is `https://github.com/`), as the callbacks print it."""
    parts = urlsplit(text.strip())
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"{text!r} is not an absolute URL")
    path = parts.path or "/"
    if slash and not path.endswith("/"):
        path += "/"
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, parts.fragment))


def _string(doc: dict[str, Any], key: str, where: str) -> str:
    if not isinstance(doc[key], str):
        raise ConfigError(f"{where}: `{key}` must be a string")
    return doc[key]


def _generic_issuer(doc: dict[str, Any], where: str, annotations: dict[str, str]) -> GenericIssuer:
    subject = doc["subject"]
    if not isinstance(subject, dict) or len(subject) != 1 or not set(subject) <= {"equal", "urlPrefix"}:
        raise ConfigError(f"{where}: `subject` must be one of `equal: <subject>` or `urlPrefix: <url>`")
    (kind, value), = subject.items()
    if not isinstance(value, str):
        raise ConfigError(f"{where}: `subject.{kind}` must be a string")
    if kind == "urlPrefix":
        try:
            value = url_prefix(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: `subject.urlPrefix`: {exc}") from None
    return GenericIssuer(_string(doc, "issuer", where), value, kind == "urlPrefix", annotations)


def _signature(doc: Any, where: str) -> Constraint:
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
    annotations = _annotations(doc.get("annotations"), where)
    if kind == "genericIssuer":
        return _generic_issuer(doc, where, annotations)
    if kind == "githubAction":
        repo = doc.get("repo")
        if repo is not None and not isinstance(repo, str):
            raise ConfigError(f"{where}: `repo` must be a string")
        return GithubAction(_string(doc, "owner", where), repo, annotations)
    try:
        key = serialization.load_pem_public_key(_string(doc, "key", where).encode())
    except ValueError as exc:
        raise ConfigError(f"{where}: `key` is not a valid PEM public key: {exc}") from None
    owner = doc.get("owner")
    return PubKey(doc["key"], key, str(owner) if owner is not None else None, annotations)


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
        layer_annotations = layer.get("annotations") or {}
        encoded = layer_annotations.get(SIGNATURE_ANNOTATION)
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
            certificate, bundle = (layer_annotations.get(k) for k in (keyless.CERTIFICATE_ANNOTATION,
                                                                       keyless.BUNDLE_ANNOTATION))
            payloads.append(SignedPayload(
                payload, signature, {str(k): str(v) for k, v in annotations.items()}, layer["digest"],
                certificate if isinstance(certificate, str) else None, bundle if isinstance(bundle, str) else None))
    return payloads


@dataclass(frozen=True)
class Rejected:
    layer: str
    reason: str


def trust_keyless(payloads: list[SignedPayload], root: TrustRoot) -> tuple[list[SignedPayload], list[Rejected]]:
    """The payloads, those whose keyless signature holds with their signer's identity; and why the others
    carrying a certificate do not."""
    checked, rejected = [], []
    for payload in payloads:
        if payload.certificate is None:
            checked.append(payload)
            continue
        try:
            found = keyless.check(payload.payload, payload.signature, payload.certificate, payload.bundle, root)
        except keyless.KeylessError as exc:
            rejected.append(Rejected(payload.layer, str(exc)))
            checked.append(payload)
        else:
            checked.append(replace(payload, identity=found))
    return checked, rejected


def _untrusted(rejected: list[Rejected]) -> str:
    if not rejected:
        return ""
    return "Keyless signatures that could not be trusted:\n" + "".join(
        f"- {r.layer}: {r.reason}\n" for r in rejected)


def check_constraints(config: VerificationConfig, payloads: list[SignedPayload],
                      rejected: list[Rejected] | None = None) -> None:
    def satisfied(constraint: Constraint) -> bool:
        return any(constraint.satisfied_by(p) for p in payloads)

    def reasons(unsatisfied: list[Constraint]) -> str:
        return _untrusted(rejected or []) if any(not isinstance(c, PubKey) for c in unsatisfied) else ""

    missing = [c for c in config.all_of if not satisfied(c)]
    if missing:
        raise VerificationError("Image verification failed: missing signatures\n"
                                "The following constraints were not satisfied:\n"
                                + "".join(c.describe() for c in missing) + reasons(missing))
    if config.has_any_of:
        unsatisfied = [c for c in config.any_of if not satisfied(c)]
        matched = len(config.any_of) - len(unsatisfied)
        if matched < config.minimum_matches:
            raise VerificationError(
                f"Image verification failed: minimum number of signatures not reached: needed "
                f"{config.minimum_matches}, got {matched}\nThe following constraints were not satisfied:\n"
                + "".join(c.describe() for c in unsatisfied) + reasons(unsatisfied))


TrustRootSource = Callable[[], TrustRoot]  # loads (once) the trust root, or raises TrustRootError


def verify(client: OciClient, reference: ImageReference, config: VerificationConfig,
           trust_root: TrustRootSource | None = None) -> str:
    """Check the signatures of `reference` against `config`; returns the verified manifest digest.
    Keyless entries need `trust_root`; its errors are this image's verification error."""
    digest = client.manifest(reference).digest
    payloads = signed_payloads(client, reference, digest)
    rejected: list[Rejected] = []
    if config.keyless:
        if trust_root is None:
            raise VerificationError("keyless signatures cannot be checked: no Sigstore trust root")
        payloads, rejected = trust_keyless(payloads, trust_root())
    check_constraints(config, payloads, rejected)
    return digest


def check_checksum(client: OciClient, reference: ImageReference, digest: str, wasm: bytes) -> None:
    """The module bytes must be the layer of the signed manifest."""
    layer = wasm_layer(client.manifest(reference.with_digest(digest)), reference)
    actual = sha256_digest(wasm)
    if actual != layer["digest"]:
        raise ChecksumError(
            "The digest of the local file doesn't match with the one reported inside of the signed manifest. "
            f"Got {actual.removeprefix('sha256:')} instead of {layer['digest'].removeprefix('sha256:')}")
