"""sources.yml (`--sources-path`): which hosts are insecure, which CAs a host is checked against, which
proxies requests go through.

```yaml
insecure_sources: ["registry.dev.example.com", "localhost:5000"]       # host[:port]
source_authorities:
  "registry.pre.example.com":
    - {type: Path, path: /path/to/ca.pem}          # PEM or DER
    - {type: Data, data: "-----BEGIN CERTIFICATE-----..."}
proxies:                                           # policy-fetcher 1.33
  http_proxy: http://proxy.corp:3128
  https_proxy: http://proxy.corp:3128
  no_proxy: localhost,127.0.0.1,.corp
```

The CAs of a host replace the system store for that host. An insecure source is tried with TLS,
then with TLS without verification, then over plain HTTP, as the reference does. A `proxies` block is
the whole proxy configuration, as policy-fetcher takes it (a field it leaves out: no proxy for that
scheme); without one, the HTTP(S)_PROXY and NO_PROXY variables apply.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from requests.utils import should_bypass_proxies

from kwserver.config import ConfigError

_KEYS = {"insecure_sources", "source_authorities", "proxies"}
_PROXY_KEYS = ("http_proxy", "https_proxy", "no_proxy")
NOT_A_CERTIFICATE = "Raw certificate is not in PEM nor in DER encoding"


@dataclass(frozen=True)
class Proxies:
    """sources.yml's `proxies`: the proxy of each scheme (None: direct) and the hosts that bypass them."""

    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = None  # comma-separated hosts, domains (`.corp`), IPs or CIDRs; `*`: every host

    def for_url(self, url: str) -> dict[str, str | None]:
        """requests' `proxies` for `url`: always its scheme's entry, so the environment never adds one."""
        scheme = urlsplit(url).scheme
        proxy = self.https_proxy if scheme == "https" else self.http_proxy
        if proxy and self.no_proxy and should_bypass_proxies(url, no_proxy=self.no_proxy):
            proxy = None
        return {scheme: proxy}


def parse_proxies(doc: Any) -> Proxies | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ConfigError(f"proxies must be a map with {', '.join(_PROXY_KEYS)}, found {type(doc).__name__}")
    unknown = sorted(str(key) for key in set(doc) - set(_PROXY_KEYS))
    if unknown:
        raise ConfigError(f"proxies: unknown field(s) {unknown}, expected {', '.join(_PROXY_KEYS)}")
    for key, value in doc.items():
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"proxies.{key} must be a string, found {type(value).__name__}")
    for key in ("http_proxy", "https_proxy"):
        url = doc.get(key)
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise ConfigError(f"proxies.{key}: {url!r} is not a proxy URL (http://host:port or https://host:port)")
    return Proxies(**{key: doc.get(key) or None for key in _PROXY_KEYS})


@dataclass(frozen=True)
class Sources:
    insecure_sources: frozenset[str] = frozenset()
    # host[:port] -> path of a PEM bundle holding that host's CAs (and nothing else)
    ca_bundles: dict[str, str] = field(default_factory=dict)
    proxies: Proxies | None = None  # None: the environment's (HTTP_PROXY, HTTPS_PROXY, NO_PROXY)

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
        raise ConfigError(f"unknown field(s) {unknown}, expected `insecure_sources`, `source_authorities` or "
                          "`proxies`")
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
    return Sources(frozenset(insecure), bundles, parse_proxies(doc.get("proxies")))


def load_sources(path: str | None) -> Sources:
    if not path:
        return Sources()
    try:
        doc = yaml.safe_load(Path(path).read_text())
        return parse_sources(doc, Path(path).resolve().parent)
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"cannot load sources from {path!r}: {exc}") from exc

