"""Host capabilities: what a guest can ask the server for through `__host_call`.

One dispatcher per policy, so every call knows which policy made it and what that policy may access.
This build implements `kubewarden/tracing/log` and `kubewarden/net/v1/dns_lookup_host`; the Kubernetes
callbacks answer as the reference server does when it has no cluster connection, and every other name gets
the reference's "unknown" errors.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import orjson

from kwserver.config import ContextAwareResource

log = logging.getLogger(__name__)
policy_log = logging.getLogger("policy_log")

NO_KUBERNETES_CLIENT = "kube::Client was not initialized properly"

_LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
    "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR,
}
_KUBERNETES_OPERATIONS = {"list_resources_by_namespace", "list_resources_all", "get_resource", "can_i"}
_LEGACY_KUBERNETES_NAMESPACES = {"namespaces", "services", "ingresses"}


class HostCallError(Exception):
    """A failed host call; its text is the error the guest reads."""


def dns_lookup_host(payload: bytes) -> bytes:
    """`net/v1/dns_lookup_host`: a JSON string naming a host -> `{"ips": [...]}` (IPv4 and IPv6)."""
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


@dataclass(frozen=True)
class Capabilities:
    policy_id: str
    allowed_resources: tuple[ContextAwareResource, ...] = ()

    def __call__(self, binding: str, namespace: str, operation: str, payload: bytes) -> bytes:
        if binding == "kubewarden":
            if namespace == "tracing":
                if operation != "log":
                    raise HostCallError(f"unknown operation: {operation}")
                self._log(payload)
                return b""
            if namespace == "kubernetes":
                if operation not in _KUBERNETES_OPERATIONS:
                    raise HostCallError(f"unknown operation: {operation}")
                raise HostCallError(NO_KUBERNETES_CLIENT)
            if namespace == "net":
                if operation != "v1/dns_lookup_host":
                    raise HostCallError(f"unknown operation: {operation}")
                return dns_lookup_host(payload)
            raise HostCallError(f"unknown namespace: {namespace}")
        if binding == "kubernetes":
            if namespace in _LEGACY_KUBERNETES_NAMESPACES:
                log.warning("policy %s uses the deprecated `kubernetes` host binding", self.policy_id)
                raise HostCallError(NO_KUBERNETES_CLIENT)
            raise HostCallError(f"unknown namespace: {namespace}")
        raise HostCallError(f"unknown binding: {binding}")

    def _log(self, payload: bytes) -> None:
        """Policy log lines never fail the guest; a malformed one is only reported here."""
        try:
            entry = orjson.loads(payload)
            if not isinstance(entry, dict):
                raise ValueError("expected a JSON object")
        except ValueError as exc:
            log.warning("policy %s sent a malformed log entry: %s", self.policy_id, exc)
            return
        level = _LEVELS.get(str(entry.pop("level", "info")).lower(), logging.INFO)
        message = entry.pop("message", "")
        data = orjson.dumps(entry).decode() if entry else ""
        policy_log.log(level, "%s", message, extra={"policy_id": self.policy_id, "data": data})
