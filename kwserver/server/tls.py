"""TLS for the API listener, with certificate and client-CA rotation without restart.

gunicorn asks for an SSL context on every new connection (its `ssl_context` hook); this cache answers
with the current one and rebuilds it when the files change, like the reference server:
- the certificate and key are reloaded when either file changed and the two make a pair: a
  renewal that keeps its key is picked up, and a half-rotated pair (one file new, the other not yet)
  is never used: the previous one serves until the other file changes too;
- client CA files are reloaded when any of them changes;
- a reload that fails is logged and the previous context keeps serving.
New handshakes use the new context; established connections keep theirs.

Keys are read as the reference reads them: the DER of a `PRIVATE KEY`, `RSA PRIVATE KEY` or
`EC PRIVATE KEY` PEM block is taken for what its structure says it is (PKCS#8, PKCS#1 or SEC1), whatever
the label says. Controllers up to v1.32 wrote their EC keys (SEC1) under `RSA PRIVATE KEY`; OpenSSL
believes the label and refuses such a file, so the key goes to OpenSSL under the label of its structure.
(Telling the three apart takes two DER headers; `cryptography` would cost the master 9 MiB.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import ssl
import tempfile
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Stamp = bytes | None  # digest of the file's content, None when it cannot be read
KEY_LABELS = ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


class TlsError(ValueError):
    """A certificate, key or client CA file that cannot be used; the message names the file."""


def _der_element(der: bytes, offset: int) -> tuple[int, int, int]:
    """The tag, content offset and end offset of the DER element at `offset`."""
    tag, first = der[offset], der[offset + 1]
    if first < 0x80:
        return tag, offset + 2, offset + 2 + first
    size = first & 0x7F
    if not 0 < size <= 4:
        raise ValueError("bad DER length")
    length = int.from_bytes(der[offset + 2:offset + 2 + size], "big")
    return tag, offset + 2 + size, offset + 2 + size + length


def key_label(der: bytes) -> str:
    """The PEM label of a DER private key, from its structure: a SEQUENCE whose version INTEGER is
    followed by an AlgorithmIdentifier SEQUENCE (PKCS#8), the modulus INTEGER (PKCS#1 RSA) or the key's
    OCTET STRING (SEC1 EC)."""
    try:
        tag, start, end = _der_element(der, 0)
        version_tag, _, after_version = _der_element(der, start)
        second = der[after_version] if after_version < end else None
    except (IndexError, ValueError):
        second = tag = version_tag = None
    labels = {0x30: "PRIVATE KEY", 0x02: "RSA PRIVATE KEY", 0x04: "EC PRIVATE KEY"}
    if tag != 0x30 or version_tag != 0x02 or second not in labels:
        raise ValueError("not a PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key")
    return labels[second]


def private_key_pem(data: bytes, path: str) -> bytes:
    """The one private key of a key file, as PEM under the label of its structure.

    Blocks of other kinds (certificates, `EC PARAMETERS`) are skipped, as the reference skips them.
    """
    blocks = [(label.decode(), body) for label, body in _PEM_BLOCK.findall(data)]
    keys = [body for label, body in blocks if label in KEY_LABELS]
    if not keys:
        encrypted = any(label == "ENCRYPTED PRIVATE KEY" for label, _ in blocks)
        raise TlsError(f"no private key in {path}" + (": encrypted keys are not supported" if encrypted else
                                                       f" (expected a PEM block labelled {' or '.join(KEY_LABELS)})"))
    if len(keys) > 1:
        raise TlsError(f"{len(keys)} private keys in {path}, expected one")
    try:
        der = base64.b64decode(b"".join(keys[0].split()), validate=True)
        label = key_label(der)
    except (binascii.Error, ValueError) as exc:
        raise TlsError(f"cannot read the private key in {path}: {exc}") from None
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n".encode()


def _stamp(path: str) -> Stamp:
    # By content, not by timestamp: robust to coarse mtimes and to Kubernetes secret volumes, which
    # swap a symlink rather than rewrite the file. The files are small and read once per new connection.
    try:
        with open(path, "rb") as stream:
            return hashlib.sha256(stream.read()).digest()
    except OSError:
        return None


def _read(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def _mismatched(exc: Exception) -> bool:
    return isinstance(exc, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(exc).upper()


@dataclass
class _Loaded:
    cert: bytes
    key: bytes
    cert_stamp: Stamp
    key_stamp: Stamp
    ca_stamps: tuple[Stamp, ...]


class TlsContextCache:
    def __init__(self, cert_file: str, key_file: str, client_ca_files: list[str],
                 factory: Callable[[], ssl.SSLContext] | None = None):
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_files = client_ca_files
        self.factory = factory or (lambda: ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._context: ssl.SSLContext | None = None
        self.reloads = 0

    def _build(self, cert: bytes, key: bytes) -> ssl.SSLContext:
        key = private_key_pem(key, self.key_file)
        context = self.factory()
        # load_cert_chain only reads files: hand it the exact bytes we validated, via a private directory.
        with tempfile.TemporaryDirectory(prefix="kwserver-tls-") as directory:
            cert_path, key_path = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
            for path, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
            context.load_cert_chain(cert_path, key_path)
        if self.client_ca_files:
            loaded = 0
            for ca_file in self.client_ca_files:
                try:
                    context.load_verify_locations(cafile=ca_file)
                    loaded += 1
                except (OSError, ssl.SSLError) as exc:
                    log.warning("skipping client CA file %s: %s", ca_file, exc)
            if not loaded:
                raise TlsError(f"no usable client CA certificate in {', '.join(self.client_ca_files)}")
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _initial(self) -> ssl.SSLContext:
        cert_stamp, key_stamp = _stamp(self.cert_file), _stamp(self.key_file)
        try:
            cert, key = _read(self.cert_file), _read(self.key_file)
            context = self._build(cert, key)
        except ssl.SSLError as exc:
            if _mismatched(exc):
                raise TlsError(f"the private key in {self.key_file} does not belong to the certificate in "
                               f"{self.cert_file}") from None
            raise TlsError(f"cannot use the certificate in {self.cert_file} with the key in {self.key_file}: "
                           f"{exc}") from None
        except OSError as exc:
            raise TlsError(f"cannot read {exc.filename}: {exc.strerror}") from None
        self._loaded = _Loaded(cert, key, cert_stamp, key_stamp, tuple(_stamp(f) for f in self.client_ca_files))
        return context

    def context(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                self._context = self._initial()
                return self._context
            loaded = self._loaded
            cert_stamp, key_stamp = _stamp(self.cert_file), _stamp(self.key_file)
            ca_stamps = tuple(_stamp(f) for f in self.client_ca_files)
            cert_changed, key_changed = cert_stamp != loaded.cert_stamp, key_stamp != loaded.key_stamp
            pair_rotated, cas_rotated = cert_changed or key_changed, ca_stamps != loaded.ca_stamps
            if not (pair_rotated or cas_rotated):
                return self._context
            # Whatever happens below, these files are not tried again until they change again.
            loaded.cert_stamp, loaded.key_stamp, loaded.ca_stamps = cert_stamp, key_stamp, ca_stamps
            context = None
            try:
                if pair_rotated:
                    cert, key = _read(self.cert_file), _read(self.key_file)
                    try:
                        context = self._build(cert, key)
                        loaded.cert, loaded.key = cert, key
                    except ssl.SSLError as exc:
                        if cert_changed == key_changed or not _mismatched(exc):
                            raise
                        log.debug("%s changed alone and does not match the %s: waiting for it",
                                  *(("the certificate", "key") if cert_changed else ("the key", "certificate")))
                        pair_rotated = False
                if context is None and cas_rotated:
                    context = self._build(loaded.cert, loaded.key)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.error("TLS reload failed, keeping the previous certificate and CAs: %s", exc)
                return self._context
            if context is None:
                return self._context
            self._context = context
            self.reloads += 1
            log.info("TLS configuration reloaded (%s)",
                     ", ".join(p for p, changed in (("certificate", pair_rotated), ("client CAs", cas_rotated))
                               if changed))
            return context
