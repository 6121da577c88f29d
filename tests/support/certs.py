"""Throwaway certificate authorities and certificates, made with the openssl CLI."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str) -> CertPair:
    """A throwaway certificate authority (EC P-256, valid for a day)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}", cwd=directory)
    return CertPair(cert, key)


def make_cert(directory: Path, name: str, ca: CertPair, san: str = "DNS:localhost,IP:127.0.0.1") -> CertPair:
    """A certificate signed by `ca`, usable as a server (with `san`) or client certificate."""
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", f"/CN={name}", cwd=directory)
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
            "-out", str(cert), "-days", "1", "-extfile", str(ext), cwd=directory)
    return CertPair(cert, key)


def pem_block(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode()


def as_controller_v132_wrote_it(key_pem: bytes) -> bytes:
    """An EC key as the Kubewarden controller wrote it up to v1.32: SEC1 DER under `RSA PRIVATE KEY`
    (internal/certs/certs.go before commit 4e58aa50)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem, None)
    return pem_block("RSA PRIVATE KEY", key.private_bytes(serialization.Encoding.DER,
                                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))


_KEYS: dict[str, Any] = {}


def reencoded_key(kind: str, encoding: str, label: str) -> bytes:
    """A private key (`ec` P-256, `rsa` 2048, `ed25519`) as `encoding` (`pkcs8` or `traditional`: PKCS#1
    for RSA, SEC1 for EC) DER under the PEM `label`, whatever the label should be. The same key per kind
    (for the whole run), so a certificate made for one encoding fits every other."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if kind not in _KEYS:
        _KEYS[kind] = {"ec": lambda: ec.generate_private_key(ec.SECP256R1()),
                       "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
                       "ed25519": ed25519.Ed25519PrivateKey.generate}[kind]()
    form = {"pkcs8": serialization.PrivateFormat.PKCS8,
            "traditional": serialization.PrivateFormat.TraditionalOpenSSL}[encoding]
    der = _KEYS[kind].private_bytes(serialization.Encoding.DER, form, serialization.NoEncryption())
    return pem_block(label, der)
