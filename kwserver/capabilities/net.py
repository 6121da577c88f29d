"""`kubewarden/net/v1/dns_lookup_host`: the host's resolver, for policies that check names."""

from __future__ import annotations

import socket

import orjson

from kwserver.capabilities.callback_requests import HostCallError


def call(operation: str, payload: bytes) -> bytes:
    if operation != "v1/dns_lookup_host":
        raise HostCallError(f"unknown operation: {operation}")
    return dns_lookup_host(payload)


def dns_lookup_host(payload: bytes) -> bytes:
    """A JSON string naming a host -> `{"ips": [...]}` (IPv4 and IPv6)."""
    try:
        host = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise HostCallError(str(exc)) from exc
    if not isinstance(host, str):
        raise HostCallError("invalid type: expected a string naming a host")
    try:
        answers = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostCallError(f"cannot resolve {host}: {exc}") from exc
    ips = list(dict.fromkeys(info[4][0] for info in answers))
    return orjson.dumps({"ips": ips})
