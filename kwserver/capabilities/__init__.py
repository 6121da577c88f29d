"""Host capabilities: what a guest can ask the server for through `__host_call`.

One dispatcher per policy, so every call knows which policy made it and what that policy may access. Each
callback namespace has its module: `tracing` (policy logs), `net` (DNS), `kubernetes` (cluster reads, with
the reference's allow-list and caches), `oci` (image manifests: `oci`; signatures: `sigstore`, both through
the server's registry settings) and `crypto` (certificate chains). Other names get the reference's
"unknown" errors.

Kubernetes calls (and, when the dispatcher has a `HostHandler`, every call the reference hands to its
asynchronous callback handler) are first decoded into a `HostRequest` — the reference's callback request,
by variant name and fields — and checked against the policy's Kubernetes allow-list. A handler
(`kwserver run`) then answers them: it may replay recorded answers or record this build's own
(`kwserver.commands.host_sessions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kwserver.capabilities import kubernetes, net, tracing
from kwserver.capabilities.callback_requests import (
    BOOL,
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

__all__ = ["BOOL", "NO_KUBERNETES_CLIENT", "OPTIONAL", "REQUEST_FIELDS", "STRING", "VALUE", "Capabilities",
           "DirectHandler", "HostCallError", "HostHandler", "HostRequest", "RegistryAccess", "access_denied_message",
           "host_request"]

log = logging.getLogger(__name__)


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


def _is_kubernetes(binding: str, namespace: str) -> bool:
    return binding == "kubernetes" or (binding == "kubewarden" and namespace == "kubernetes")


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

    def __call__(self, binding: str, namespace: str, operation: str, payload: bytes) -> bytes:
        request = None
        if self.handler is not None or _is_kubernetes(binding, namespace):
            request = host_request(binding, namespace, operation, payload)
        if request is None:
            return self._direct(binding, namespace, operation, payload, None)
        if binding == "kubewarden":  # the legacy `kubernetes` binding is not checked (reference QUIRK)
            kubernetes.check_access(self.policy_id, self.allowed_resources, request)
        direct = lambda: self._direct(binding, namespace, operation, payload, request)  # noqa: E731
        return direct() if self.handler is None else self.handler.answer(request, direct)

    def on_behalf(self, request: HostRequest, deadline: float | None) -> bytes:
        """A Kubernetes request the host makes for the policy (the inventory of a Rego policy), answered
        like the policy's own calls: through the handler (recorded, replayed), else by the cluster."""
        direct = lambda: kubernetes.answer(request, deadline)  # noqa: E731
        return direct() if self.handler is None else self.handler.answer(request, direct)

    def _direct(self, binding: str, namespace: str, operation: str, payload: bytes,
                request: HostRequest | None) -> bytes:
        if binding == "kubewarden":
            if namespace == "tracing":
                return tracing.call(self.policy_id, operation, payload)
            if namespace == "net":
                return net.call(operation, payload)
            if namespace == "kubernetes":
                if request is None:
                    raise HostCallError(f"unknown operation: {operation}")
                return kubernetes.answer(request, _deadline())
            if namespace in ("oci", "crypto"):
                return self._registry_or_crypto(binding, namespace, operation, payload, request)
            raise HostCallError(f"unknown namespace: {namespace}")
        if binding == "kubernetes":
            if request is None:
                raise HostCallError(f"unknown namespace: {namespace}")
            log.warning("policy %s uses the deprecated `kubernetes` host binding", self.policy_id)
            return kubernetes.answer(request, _deadline())
        raise HostCallError(f"unknown binding: {binding}")

    def _registry_or_crypto(self, binding: str, namespace: str, operation: str, payload: bytes,
                            request: HostRequest | None) -> bytes:
        request = request or host_request(binding, namespace, operation, payload)
        if request is None:
            raise HostCallError(f"unknown operation: {operation}")
        # Imported on first use: they bring the registry client and cryptography (registry_access.py).
        from kwserver.capabilities import crypto, oci, sigstore

        if request.kind == "CryptoIsCertificateTrusted":
            return crypto.answer(request.fields["request"])
        if request.kind in oci.OPERATIONS:
            return oci.answer(request, self.registries, _deadline())
        return sigstore.answer(request, self.registries, _deadline())
