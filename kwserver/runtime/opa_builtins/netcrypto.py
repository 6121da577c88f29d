"""`net.cidr_*` (the standard library's `ipaddress`) and `crypto.*` digests and HMACs (`hashlib`)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

from kwserver.runtime.opa_builtins._common import BuiltinError, string

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# net.cidr_expand refuses to enumerate more addresses than this (OPA would try and exhaust memory).
MAX_EXPANDED_ADDRESSES = 1 << 16


def _network(name: str, index: int, value: Any) -> Network:
    text = string(name, index, value)
    if "/" not in text:
        raise BuiltinError(f"{name}: invalid CIDR address: {text}")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise BuiltinError(f"{name}: invalid CIDR address: {text}") from exc


def _network_or_ip(name: str, index: int, value: Any) -> Network:
    text = string(name, index, value)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise BuiltinError(f"{name}: invalid CIDR or IP address: {text}") from exc


def cidr_is_valid(value: Any) -> bool:
    if not isinstance(value, str) or "/" not in value:
        return False
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def cidr_contains(cidr: Any, cidr_or_ip: Any) -> bool:
    outer = _network("net.cidr_contains", 1, cidr)
    inner = _network_or_ip("net.cidr_contains", 2, cidr_or_ip)
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def cidr_intersects(first: Any, second: Any) -> bool:
    a = _network("net.cidr_intersects", 1, first)
    b = _network("net.cidr_intersects", 2, second)
    return a.version == b.version and a.overlaps(b)  # type: ignore[arg-type]


def cidr_expand(cidr: Any) -> list[str]:
    network = _network("net.cidr_expand", 1, cidr)
    if network.num_addresses > MAX_EXPANDED_ADDRESSES:
        raise BuiltinError(f"net.cidr_expand: {cidr} has more than {MAX_EXPANDED_ADDRESSES} addresses")
    return [str(address) for address in network]


def cidr_merge(addresses: Any) -> list[str]:
    items = addresses if isinstance(addresses, list) else None
    if items is None:
        raise BuiltinError("net.cidr_merge: operand 1 must be array or set of strings")
    networks = [_network_or_ip("net.cidr_merge", 1, item) for item in items]
    merged = []
    for version in (4, 6):
        same = [n for n in networks if n.version == version]
        merged.extend(str(n) for n in ipaddress.collapse_addresses(same))  # type: ignore[type-var]
    return merged


def _cidr_terms(name: str, index: int, value: Any) -> list[tuple[Any, str]]:
    """(key, cidr) pairs of a string, an array/set (key = index or the element), or an object."""
    if isinstance(value, str):
        return [(value, value)]
    if isinstance(value, list):
        return [(i, _first(name, index, item)) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return [(key, _first(name, index, item)) for key, item in value.items()]
    raise BuiltinError(f"{name}: operand {index} must be string, array, set or object")


def _first(name: str, index: int, item: Any) -> str:
    if isinstance(item, list) and item:
        item = item[0]
    return string(name, index, item)


def cidr_contains_matches(cidrs: Any, cidrs_or_ips: Any) -> list[list[Any]]:
    outer = _cidr_terms("net.cidr_contains_matches", 1, cidrs)
    inner = _cidr_terms("net.cidr_contains_matches", 2, cidrs_or_ips)
    matches = []
    for key_a, a in outer:
        network = _network("net.cidr_contains_matches", 1, a)
        for key_b, b in inner:
            candidate = _network_or_ip("net.cidr_contains_matches", 2, b)
            if candidate.version == network.version and candidate.subnet_of(network):  # type: ignore[arg-type]
                matches.append([key_a, key_b])
    return matches


def _digest(algorithm: str, name: str) -> Any:
    def digest(value: Any) -> str:
        return hashlib.new(algorithm, string(name, 1, value).encode()).hexdigest()

    return digest


def _hmac(algorithm: str, name: str) -> Any:
    def mac(value: Any, key: Any) -> str:
        data = string(name, 1, value).encode()
        return hmac.new(string(name, 2, key).encode(), data, algorithm).hexdigest()

    return mac


def hmac_equal(first: Any, second: Any) -> bool:
    return hmac.compare_digest(string("crypto.hmac.equal", 1, first).encode(),
                               string("crypto.hmac.equal", 2, second).encode())


CRYPTO = {
    "crypto.md5": _digest("md5", "crypto.md5"),
    "crypto.sha1": _digest("sha1", "crypto.sha1"),
    "crypto.sha256": _digest("sha256", "crypto.sha256"),
    "crypto.hmac.md5": _hmac("md5", "crypto.hmac.md5"),
    "crypto.hmac.sha1": _hmac("sha1", "crypto.hmac.sha1"),
    "crypto.hmac.sha256": _hmac("sha256", "crypto.hmac.sha256"),
    "crypto.hmac.sha512": _hmac("sha512", "crypto.hmac.sha512"),
    "crypto.hmac.equal": hmac_equal,
}
