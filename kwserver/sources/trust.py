"""sources.yml (`--sources-path`): which hosts are insecure, which CAs a host is checked against.

```yaml
insecure_sources: ["registry.dev.example.com", "localhost:5000"]       # host[:port]
source_authorities:
  "registry.pre.example.com":
    - {type: Path, path: /path/to/ca.pem}          # PEM or DER
    - {type: Data, data: "-----BEGIN CERTIFICATE-----..."}
```

The CAs of a host replace the system store for that host. An insecure source is tried with TLS,
then with TLS without verification, then over plain HTTP, as the reference does.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from kwserver.config import ConfigError

_KEYS = {"insecure_sources", "source_authorities"}
NOT_A_CERTIFICATE = "Raw certificate is not in PEM nor in DER encoding"


@dataclass(frozen=True)
class Sources:
    insecure_sources: frozenset[str] = frozenset()
    # host[:port] -> path of a PEM bundle holding that host's CAs (and nothing else)
    ca_bundles: dict[str, str] = field(default_factory=dict)

    def is_insecure(self, host: str) -> bool:
        return host in self.insecure_sources

    def verify_for(self, host: str) -> bool | str:
        """`verify` for requests: the host's own CA bundle, or True for the system store."""
        return self.ca_bundles.get(host, True)


def certificate_pem(data: bytes) -> str:
    """One CA certificate, PEM or DER, as PEM text."""
    try:
        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.PEM).decode()
    except ValueError:
        pass
    try:
        return x509.load_der_x509_certificate(data).public_bytes(Encoding.PEM).decode()
    except ValueError:
        raise ConfigError(NOT_A_CERTIFICATE) from None


def _authority_bytes(host: str, entry: Any, base_dir: Path) -> bytes:
    if not isinstance(entry, dict) or entry.get("type") not in ("Path", "Data"):
        raise ConfigError(f"source_authorities.{host}: each entry needs `type: Path` or `type: Data`")
    kind = entry["type"]
    key = kind.lower()
    unknown = sorted(map(str, set(entry) - {"type", key}))
    if unknown or key not in entry:
        raise ConfigError(f"source_authorities.{host}: a `{kind}` entry has exactly the key `{key}` "
                          f"(found {sorted(map(str, entry))})")
    if kind == "Data":
        data = entry["data"]
        if isinstance(data, list):  # DER bytes written as a list of integers
            if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in data):
                raise ConfigError(f"source_authorities.{host}: `data` as a list holds the bytes of a DER "
                                  "certificate: integers from 0 to 255")
            return bytes(data)
        return str(data).encode()
    path = Path(str(entry["path"]))
    path = path if path.is_absolute() else base_dir / path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read certificate from file: {path}: {exc.strerror or exc}") from exc


def parse_sources(doc: Any, base_dir: Path, bundle_dir: Path | None = None) -> Sources:
    if doc is None:
        return Sources()
    if not isinstance(doc, dict):
        raise ConfigError("the top level must be a map with `insecure_sources` and/or `source_authorities`")
    unknown = sorted(map(str, set(doc) - _KEYS))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown}, expected `insecure_sources` or `source_authorities`")
    insecure = doc.get("insecure_sources") or []
    if not isinstance(insecure, list) or not all(isinstance(h, str) for h in insecure):
        raise ConfigError("insecure_sources must be a list of host[:port] strings")
    authorities = doc.get("source_authorities") or {}
    if not isinstance(authorities, dict):
        raise ConfigError("source_authorities must be a map from host[:port] to a list of certificates")
    bundles = {}
    for host, entries in authorities.items():
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"source_authorities.{host}: must be a non-empty list of certificates")
        pems = []
        for entry in entries:
            try:
                pems.append(certificate_pem(_authority_bytes(str(host), entry, base_dir)))
            except ConfigError as exc:
                raise ConfigError(f"source_authorities.{host}: Invalid certificate: {exc}") from None
        directory = bundle_dir or Path(tempfile.mkdtemp(prefix="kwserver-cas-"))
        bundle = directory / f"{len(bundles)}.pem"
        bundle.write_text("".join(pems))
        bundles[str(host)] = str(bundle)
    return Sources(frozenset(insecure), bundles)


def load_sources(path: str | None) -> Sources:
    if not path:
        return Sources()
    try:
        doc = yaml.safe_load(Path(path).read_text())
        return parse_sources(doc, Path(path).resolve().parent)
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"cannot load sources from {path!r}: {exc}") from exc

