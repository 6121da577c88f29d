"""TLS for the API listener, with certificate and client-CA rotation without restart.

gunicorn asks for an SSL context on every new connection (its `ssl_context` hook); this cache answers
with the current one and rebuilds it when the files change, like the reference server:
- the certificate and key are reloaded when either file changed and the two make a pair: a
  renewal that keeps its key is picked up, and a half-rotated pair (one file new, the other not yet)
  is never used: the previous one serves until the other file changes too;
- client CA files are reloaded when any of them changes;
- a reload that fails is logged and the previous context keeps serving.
New handshakes use the new context; established connections keep theirs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Stamp = bytes | None  # digest of the file's content, None when it cannot be read


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
                raise ssl.SSLError("no usable client CA certificate")
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _initial(self) -> ssl.SSLContext:
        cert_stamp, key_stamp = _stamp(self.cert_file), _stamp(self.key_file)
        cert, key = _read(self.cert_file), _read(self.key_file)
        context = self._build(cert, key)
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
