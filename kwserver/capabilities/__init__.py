"""Host capabilities: what a guest can ask the server for through `__host_call`.

One dispatcher per policy, so every call knows which policy made it and what that policy may access. A call
first passes the policy's `hostCapabilities` allow-list (kwserver.host_capabilities: every namespace but
`tracing` is gated, as in policy-server 1.35+); a refused one is logged, counted (`DENIALS`, published by the
metrics) and fails with the reference's message. Then each callback namespace has its module: `tracing`
(policy logs), `net` (DNS), `kubernetes` (cluster reads, with the reference's `contextAwareResources` check
and caches), `oci` (image manifests: `oci`; signatures: `sigstore`, both through the server's registry
settings) and `crypto` (certificate chains). Other names get the reference's "unknown" errors; the legacy
`kubernetes` binding is gone, as from policy-server 1.33 (`unknown binding: kubernetes`).

Kubernetes calls (and, when the dispatcher has a `HostHandler`, every call the reference hands to its
asynchronous callback handler) are first decoded into a `HostRequest` — the reference's callback request,
by variant name and fields — and checked against the policy's Kubernetes allow-list. A handler
(`kwserver run`) then answers them: it may replay recorded answers or record this build's own
(`kwserver.commands.host_sessions`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kwserver.capabilities import kubernetes, net, tracing
from kwserver.capabilities.callback_requests import (
    BOOL,
    MASKS,
    OPTIONAL,
    REQUEST_FIELDS,
    STRING,
    VALUE,
    HostCallError,
    HostRequest,
    host_request,
)
from kwserver.capabilities.kubernetes import NO_KUBERNETES_CLIENT, access_denied_message
from kwserver.capabilities.registry_access import RegistryAccess
from kwserver.config import ContextAwareResource
from kwserver.host_capabilities import CAPABILITIES, DENY_ALL, UNGATED_NAMESPACE, AllowList, capability_path

__all__ = ["BOOL", "DENIALS", "MASKS", "NO_KUBERNETES_CLIENT", "OPTIONAL", "REQUEST_FIELDS", "STRING", "VALUE",
           "AllowList", "Capabilities", "DirectHandler", "HostCallError", "HostHandler", "HostRequest",
           "RegistryAccess", "access_denied_message", "capability_denied_message", "host_request"]

log = logging.getLogger(__name__)

# Refused calls of this process by (policy, capability); capabilities the host does not have count as
# `unknown`, so a guest cannot make up label values.
DENIALS: Counter[tuple[str, str]] = Counter()


def capability_denied_message(path: str) -> str:
    return f"Policy has not been granted access to the '{path}' host capability. The violation has been reported."


class HostHandler(Protocol):
    """Answers decoded host requests. `direct` computes this build's own answer to the call."""

    def answer(self, request: HostRequest, direct: Callable[[], bytes]) -> bytes: ...

    def finish(self) -> None:
        """The evaluation is over (a recording is written now)."""


class DirectHandler:
    """This build's own answers, behind the reference's decoding and allow-list checks."""

    def answer(self, request: HostRequest, direct: Callable[[], bytes]) -> bytes:
        return direct()

    def finish(self) -> None:
        pass


def _deadline() -> float | None:
    """When the running evaluation must end (monotonic), if the calling guest has a deadline."""
    from kwserver.runtime import current_guest

    try:
        guest = current_guest()
    except AttributeError:  # called outside an evaluation (tests, tools)
        return None
    return getattr(getattr(guest, "wasi", None), "deadline_at", None)


@dataclass(frozen=True)
class Capabilities:
    policy_id: str
    allowed_resources: tuple[ContextAwareResource, ...] = ()
    # None: the server's answers as they are; a handler also gets the reference's decoding and checks.
    handler: HostHandler | None = None
    # How registries are reached (sources.yml, docker config): the policy downloads' settings.
    registries: RegistryAccess = field(default_factory=RegistryAccess)
    # The policy's `hostCapabilities` grant; nothing unless granted, as the reference.
    host_capabilities: AllowList = DENY_ALL

    @property
    def reads_cluster(self) -> bool:
        """A context-aware policy (it has contextAwareResources) granted some Kubernetes call: the server
        connects to the cluster for such policies only (kwserver.server.daemon, `Daemon._follow_cluster`)."""
        return bool(self.allowed_resources) and any(
            self.host_capabilities.allows(path) for path in CAPABILITIES if path.startswith("kubernetes/"))

    def __call__(self, binding: str, namespace: str, operation: str, payload: bytes) -> bytes:
        if binding != "kubewarden":
            raise HostCallError(f"unknown binding: {binding}")
        if namespace != UNGATED_NAMESPACE:
            path = capability_path(namespace, operation)
            if not self.host_capabilities.allows(path):
                self._deny(path)
        request = None
        if self.handler is not None or namespace == "kubernetes":
            request = host_request(binding, namespace, operation, payload)
        if request is None:
            return self._direct(namespace, operation, payload, None)
        kubernetes.check_access(self.policy_id, self.allowed_resources, request)
        direct = lambda: self._direct(namespace, operation, payload, request)  # noqa: E731
        return direct() if self.handler is None else self.handler.answer(request, direct)

    def _deny(self, path: str) -> None:
        log.error("policy %s tried to use the host capability %s it has not been granted (allowed: %s)",
                  self.policy_id, path, self.host_capabilities)
        DENIALS[(self.policy_id, path if path in CAPABILITIES else "unknown")] += 1
        raise HostCallError(capability_denied_message(path))

    def on_behalf(self, request: HostRequest, deadline: float | None) -> bytes:
        """A Kubernetes request the host makes for the policy (the inventory of a Rego policy), answered
        like the policy's own calls: through the handler (recorded, replayed), else by the cluster."""
        direct = lambda: kubernetes.answer(request, deadline)  # noqa: E731
        return direct() if self.handler is None else self.handler.answer(request, direct)

    def _direct(self, namespace: str, operation: str, payload: bytes, request: HostRequest | None) -> bytes:
        if namespace == "tracing":
            return tracing.call(self.policy_id, operation, payload)
        if namespace == "net":
            return net.call(operation, payload)
        if namespace == "kubernetes":
            if request is None:
                raise HostCallError(f"unknown operation: {operation}")
            return kubernetes.answer(request, _deadline())
        if namespace in ("oci", "crypto"):
            return self._registry_or_crypto(namespace, operation, payload, request)
        raise HostCallError(f"unknown namespace: {namespace}")

    def _registry_or_crypto(self, namespace: str, operation: str, payload: bytes,
                            request: HostRequest | None) -> bytes:
        request = request or host_request("kubewarden", namespace, operation, payload)
        if request is None:
            raise HostCallError(f"unknown operation: {operation}")
        # Imported on first use: they bring the registry client and cryptography (registry_access.py).
        from kwserver.capabilities import crypto, oci, sigstore

        if request.kind == "CryptoIsCertificateTrusted":
            return crypto.answer(request.fields["request"])
        if request.kind in oci.OPERATIONS:
            return oci.answer(request, self.registries, _deadline())
        return sigstore.answer(request, self.registries, _deadline())
