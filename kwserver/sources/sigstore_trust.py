"""The Sigstore trust root keyless signatures are checked against: Fulcio's CAs, Rekor's and the CT logs' keys.

Read from `--sigstore-trust-config` (a ClientTrustConfig, as the reference takes, or a bare TrustedRoot,
both in sigstore's protobuf-specs JSON), else from the public-good root shipped with kwserver
(`data/sigstore_trusted_root.json`): nothing is fetched at start. `refresh` brings the shipped file up to
date through Sigstore's TUF repository (python-tuf, starting from the shipped `data/sigstore_tuf_root.json`);
`kwserver sigstore-trust-root --refresh` runs it.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kwserver.sources.errors import VerificationError

DATA = Path(__file__).parent / "data"
SHIPPED_TRUSTED_ROOT = DATA / "sigstore_trusted_root.json"
SHIPPED_TUF_ROOT = DATA / "sigstore_tuf_root.json"
PUBLIC_GOOD_TUF_URL = "https://tuf-repo-cdn.sigstore.dev"
TRUSTED_ROOT_MEDIA_TYPE = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"


class TrustRootError(VerificationError):
    """The trust root cannot be read or used: every keyless check reports it."""


@dataclass(frozen=True)
class TimeRange:
    start: datetime.datetime | None = None
    end: datetime.datetime | None = None

    def contains(self, at: datetime.datetime) -> bool:
        return (self.start is None or self.start <= at) and (self.end is None or at <= self.end)


@dataclass(frozen=True)
class CertificateAuthority:
    uri: str
    certificates: tuple[x509.Certificate, ...]
    valid_for: TimeRange


@dataclass(frozen=True)
class LogKey:
    """A transparency log (Rekor) or certificate transparency log's key, by its log id (hex)."""
    base_url: str
    log_id: str
    key: Any
    valid_for: TimeRange


@dataclass(frozen=True)
class TrustRoot:
    source: str  # the file it was read from, for messages
    authorities: tuple[CertificateAuthority, ...]
    rekor_logs: dict[str, LogKey]
    ct_logs: dict[str, LogKey]

    def fulcio_certificates(self, at: datetime.datetime) -> list[x509.Certificate]:
        """The CA certificates of the authorities that were issuing at `at`."""
        return [cert for ca in self.authorities if ca.valid_for.contains(at) for cert in ca.certificates]


# --- reading -------------------------------------------------------------------------------------

def _field(doc: dict[str, Any], camel: str) -> Any:
    """A protobuf JSON field, by its JSON name or its original (snake_case) name."""
    if camel in doc:
        return doc[camel]
    return doc.get("".join(f"_{c.lower()}" if c.isupper() else c for c in camel))


def _bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError(f"{where} is not base64") from None


def _time(value: Any, where: str) -> datetime.datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{where} is not an RFC 3339 time: {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _range(doc: Any, where: str) -> TimeRange:
    if not isinstance(doc, dict):
        return TimeRange()
    return TimeRange(_time(doc.get("start"), f"{where}.start"), _time(doc.get("end"), f"{where}.end"))


def _authority(doc: Any, where: str) -> CertificateAuthority:
    chain = _field(doc, "certChain") if isinstance(doc, dict) else None
    entries = chain.get("certificates") if isinstance(chain, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}.certChain has no certificates")
    certificates = []
    for i, entry in enumerate(entries):
        raw = _bytes(_field(entry, "rawBytes") if isinstance(entry, dict) else None,
                     f"{where}.certChain.certificates[{i}].rawBytes")
        try:
            certificates.append(x509.load_der_x509_certificate(raw))
        except ValueError as exc:
            raise ValueError(f"{where}.certChain.certificates[{i}] is not a DER certificate: {exc}") from None
    return CertificateAuthority(str(doc.get("uri", "")), tuple(certificates),
                                _range(_field(doc, "validFor"), f"{where}.validFor"))


def _log(doc: Any, where: str) -> LogKey:
    if not isinstance(doc, dict) or not isinstance(_field(doc, "publicKey"), dict):
        raise ValueError(f"{where} has no publicKey")
    public_key = _field(doc, "publicKey")
    raw = _bytes(_field(public_key, "rawBytes"), f"{where}.publicKey.rawBytes")
    try:
        key = serialization.load_der_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}.publicKey is not a DER public key: {exc}") from None
    log_id = _field(doc, "logId")
    key_id = _bytes(_field(log_id, "keyId") if isinstance(log_id, dict) else None, f"{where}.logId.keyId")
    return LogKey(str(_field(doc, "baseUrl") or ""), key_id.hex(), key,
                  _range(_field(public_key, "validFor"), f"{where}.publicKey.validFor"))


def parse_trust_root(doc: Any, source: str) -> TrustRoot:
    """A ClientTrustConfig or a TrustedRoot document; ValueError says what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError("the top level is not a JSON object")
    inner = _field(doc, "trustedRoot")
    if inner is not None or "clienttrustconfig" in str(doc.get("mediaType", "")):
        if not isinstance(inner, dict):
            raise ValueError("the ClientTrustConfig has no trustedRoot")
        doc = inner
    authorities = _field(doc, "certificateAuthorities") or []
    tlogs, ctlogs = doc.get("tlogs") or [], doc.get("ctlogs") or []
    if not all(isinstance(x, list) for x in (authorities, tlogs, ctlogs)):
        raise ValueError("certificateAuthorities, tlogs and ctlogs must be lists")
    if not authorities:
        raise ValueError("it has no Fulcio certificate authority (certificateAuthorities is empty)")
    if not tlogs:
        raise ValueError("it has no Rekor transparency log (tlogs is empty)")
    rekor = [_log(t, f"tlogs[{i}]") for i, t in enumerate(tlogs)]
    ct = [_log(t, f"ctlogs[{i}]") for i, t in enumerate(ctlogs)]
    return TrustRoot(source, tuple(_authority(a, f"certificateAuthorities[{i}]") for i, a in enumerate(authorities)),
                     {log.log_id: log for log in rekor}, {log.log_id: log for log in ct})


def load_trust_root(path: str | None) -> TrustRoot:
    """The trust root at `path`, else the shipped public-good one; TrustRootError names the file."""
    file = Path(path) if path else SHIPPED_TRUSTED_ROOT
    try:
        doc = json.loads(file.read_bytes())
    except OSError as exc:
        raise TrustRootError(f"cannot read the Sigstore trust root {file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise TrustRootError(f"the Sigstore trust root {file} is not valid JSON: {exc}") from None
    try:
        return parse_trust_root(doc, str(file))
    except ValueError as exc:
        raise TrustRootError(f"the Sigstore trust root {file} cannot be used: {exc}") from None


class LazyTrustRoot:
    """`load_trust_root(path)` on first call, kept (or its error, raised again on every call). Thread-safe."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._loaded: TrustRoot | TrustRootError | None = None

    def __call__(self) -> TrustRoot:
        with self._lock:
            if self._loaded is None:
                try:
                    self._loaded = load_trust_root(self.path)
                except TrustRootError as exc:
                    self._loaded = exc
            loaded = self._loaded
        if isinstance(loaded, TrustRootError):
            raise TrustRootError(str(loaded))
        return loaded


def describe(root: TrustRoot) -> str:
    """What a trust root holds, for `kwserver sigstore-trust-root`."""
    def window(valid: TimeRange) -> str:
        return f"{valid.start:%Y-%m-%d} .. {f'{valid.end:%Y-%m-%d}' if valid.end else 'now'}" if valid.start \
            else "always"

    lines = [f"Sigstore trust root: {root.source}"]
    for ca in root.authorities:
        names = ", ".join(c.subject.rfc4514_string() for c in ca.certificates)
        lines.append(f"  Fulcio CA {ca.uri or '(no uri)'} [{window(ca.valid_for)}]: {names}")
    for kind, logs in (("Rekor log", root.rekor_logs), ("CT log", root.ct_logs)):
        lines += [f"  {kind} {log.base_url or '(no url)'} [{window(log.valid_for)}]: {log.log_id}"
                  for log in logs.values()]
    return "\n".join(lines)


# --- refreshing the shipped file -----------------------------------------------------------------

def refresh(tuf_url: str = PUBLIC_GOOD_TUF_URL, tuf_root: Path = SHIPPED_TUF_ROOT,
            output: Path = SHIPPED_TRUSTED_ROOT) -> TrustRoot:
    """Download `trusted_root.json` from a Sigstore TUF repository, verified by TUF from `tuf_root`
    (which is rotated forward to the repository's current root), check that it parses, and write it."""
    try:
        from tuf.ngclient import Updater
    except ImportError:
        raise TrustRootError("refreshing the trust root needs python-tuf: pip install 'kwserver[sigstore]'") \
            from None
    with tempfile.TemporaryDirectory(prefix="kwserver-tuf-") as work:
        metadata, targets = Path(work, "metadata"), Path(work, "targets")
        metadata.mkdir()
        targets.mkdir()
        try:
            updater = Updater(metadata_dir=str(metadata), metadata_base_url=tuf_url,
                              target_base_url=f"{tuf_url.rstrip('/')}/targets/", target_dir=str(targets),
                              bootstrap=tuf_root.read_bytes())
            updater.refresh()
            info = updater.get_targetinfo("trusted_root.json")
            if info is None:
                raise TrustRootError(f"the TUF repository {tuf_url} has no trusted_root.json target")
            data = Path(updater.download_target(info)).read_bytes()
            new_root = metadata / "root.json"
        except TrustRootError:
            raise
        except Exception as exc:  # python-tuf's errors: network, expired or badly signed metadata
            raise TrustRootError(f"TUF update from {tuf_url} failed: {type(exc).__name__}: {exc}") from None
        try:
            root = parse_trust_root(json.loads(data), str(output))
        except ValueError as exc:
            raise TrustRootError(f"the trusted_root.json served by {tuf_url} cannot be used: {exc}") from None
        output.write_bytes(data)
        if tuf_root.resolve() != new_root.resolve():
            tuf_root.write_bytes(new_root.read_bytes())  # the next refresh starts from the current root
    return root
