"""`kubewarden/crypto/v1/is_certificate_trusted`: is a certificate valid at an instant and issued by a
chain the policy names (or by the Mozilla root set, `certifi`'s, when it names none)?

The chain is built with `cryptography`: from the certificate up through the given intermediates to the
trust anchor (the chain's last certificate), each link checked by name and signature, intermediates
required to be CAs. Leaf and intermediate validity are checked at the verification instant (`not_after`,
else now); the anchor's is not, and any extended key usage is accepted, as the reference does. Results
and errors use the reference's words.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import threading
from dataclasses import dataclass
from typing import Any

import certifi
import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from kwserver.capabilities.callback_requests import HostCallError, _json_type
from kwserver.capabilities.waiting import CALLBACK_FAILURE

TRUSTED = ""
EXPIRED = "Certificate is being used after its expiration date"
NOT_YET_VALID = "Certificate is being used before its validity date"
UNKNOWN_ISSUER = "Certificate is not trusted by the provided cert chain"
OTHER_FAILURE = "Certificate not trusted: {}"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_MAX_DEPTH = 8  # intermediates on one path, as webpki bounds path building


def _failure(text: str) -> HostCallError:
    return HostCallError(CALLBACK_FAILURE.format(text))


# --- the request -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CertificateData:
    encoding: str  # "Pem" or "Der"
    data: bytes


def certificate_data(value: Any) -> CertificateData:
    if not isinstance(value, dict):
        raise HostCallError(f"invalid type: {_json_type(value)}, expected struct Certificate")
    for name in ("encoding", "data"):
        if value.get(name) is None:
            raise HostCallError(f"missing field `{name}`")
    if value["encoding"] not in ("Pem", "Der"):
        raise HostCallError(f"unknown variant `{value['encoding']}`, expected `Pem` or `Der`")
    data = value["data"]
    if not isinstance(data, list) or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255
                                             for b in data):
        raise HostCallError("invalid type: `data` must be a sequence of bytes (integers 0-255)")
    return CertificateData(value["encoding"], bytes(data))


def verification_time(not_after: Any) -> datetime.datetime:
    """The instant to check at: `not_after` (RFC 3339), or now when it is null or empty."""
    if not_after is None or not_after == "":
        return datetime.datetime.now(datetime.UTC)
    if not isinstance(not_after, str) or not _RFC3339.match(not_after):
        raise _failure("Timestamp not_after is not in RFC3339 format")
    try:
        moment = datetime.datetime.fromisoformat(not_after.upper().replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        raise _failure("Timestamp not_after is not in RFC3339 format") from None
    return moment.astimezone(datetime.UTC)


def certificate_der(certificate: CertificateData) -> bytes:
    if certificate.encoding == "Der":
        return certificate.data
    block = _PEM_BLOCK.search(certificate.data)
    if block is None:
        raise _failure("Certificate PEM data is not valid: no PEM block found")
    if block.group(1) != b"CERTIFICATE":
        raise _failure(f"Certificate PEM data is not valid: the PEM block is a {block.group(1).decode()}, "
                       "not a CERTIFICATE")
    try:
        return base64.b64decode(b"".join(block.group(2).split()), validate=True)
    except binascii.Error as exc:
        raise _failure(f"Certificate PEM data is not valid: {exc}") from None


def load_certificate(certificate: CertificateData) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(certificate_der(certificate))
    except ValueError as exc:
        raise _failure(f"Certificate is not a valid end-entity certificate: {exc}") from None


# --- the check -------------------------------------------------------------------------------------

def validity_problem(certificate: x509.Certificate, at: datetime.datetime) -> str | None:
    if at > certificate.not_valid_after_utc:
        return EXPIRED
    if at < certificate.not_valid_before_utc:
        return NOT_YET_VALID
    return None


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    if child.issuer != issuer.subject:
        return False
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def chain_problem(leaf: x509.Certificate, intermediates: list[x509.Certificate],
                  anchors: list[x509.Certificate], at: datetime.datetime) -> str | None:
    """None when a path from `leaf` to one of `anchors` exists at `at`, else the reason there is none.
    Problems found on a path whose signatures hold (an expired intermediate, an end entity used as a
    CA) are more telling than an unknown issuer, so they are the reason given."""
    problems: list[str] = []

    def reaches_anchor(certificate: x509.Certificate, used: tuple[x509.Certificate, ...]) -> bool:
        if any(_issued_by(certificate, anchor) for anchor in anchors):
            return True
        if len(used) >= _MAX_DEPTH:
            problems.append(OTHER_FAILURE.format("MaximumPathDepthExceeded"))
            return False
        for issuer in intermediates:
            if issuer in used or not _issued_by(certificate, issuer):
                continue
            if not _is_ca(issuer):
                problems.append(OTHER_FAILURE.format("EndEntityUsedAsCa"))
                continue
            validity = validity_problem(issuer, at)
            if validity is not None:
                problems.append(validity)
                continue
            if reaches_anchor(issuer, (*used, issuer)):
                return True
        return False

    if reaches_anchor(leaf, ()):
        return None
    return problems[0] if problems else UNKNOWN_ISSUER


class _MozillaRoots:
    """The Mozilla root set as certifi ships it, read on first use."""

    def __init__(self) -> None:
        self.roots: list[x509.Certificate] | None = None
        self.lock = threading.Lock()

    def get(self) -> list[x509.Certificate]:
        with self.lock:
            if self.roots is None:
                with open(certifi.where(), "rb") as bundle:
                    self.roots = x509.load_pem_x509_certificates(bundle.read())
            return self.roots


_mozilla_roots = _MozillaRoots()


def is_certificate_trusted(request: dict[str, Any]) -> dict[str, Any]:
    """`{"trusted": bool, "reason": str}` for a CertificateVerificationRequest; host errors as the reference."""
    if request.get("cert") is None:
        raise HostCallError("missing field `cert`")
    leaf_data = certificate_data(request["cert"])
    chain_data = request.get("cert_chain")
    if chain_data is not None and not isinstance(chain_data, list):
        raise HostCallError(f"invalid type: {_json_type(chain_data)}, expected a sequence")
    chain_data = [certificate_data(item) for item in chain_data] if chain_data is not None else None
    leaf = load_certificate(leaf_data)
    at = verification_time(request.get("not_after"))
    if chain_data is not None:  # an empty chain has no anchor: nothing is trusted
        chain = [load_certificate(item) for item in chain_data]
        intermediates, anchors = chain[:-1], chain[-1:]
    else:
        intermediates, anchors = [], _mozilla_roots.get()
    if _is_ca(leaf):
        return {"trusted": False, "reason": OTHER_FAILURE.format("CaUsedAsEndEntity")}
    problem = validity_problem(leaf, at) or chain_problem(leaf, intermediates, anchors, at)
    return {"trusted": problem is None, "reason": problem or TRUSTED}


def answer(request: dict[str, Any]) -> bytes:
    return orjson.dumps(is_certificate_trusted(request))
