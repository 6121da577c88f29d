"""`kubewarden/kubernetes/*` and the legacy `kubernetes` binding: reads of the cluster, behind the
policy's `contextAwareResources` allow-list (kwserver.cluster does the reading)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from kwserver.capabilities.callback_requests import HostCallError, HostRequest
from kwserver.cluster import connection
from kwserver.cluster.limits import ClusterError
from kwserver.config import ContextAwareResource

log = logging.getLogger(__name__)

NO_KUBERNETES_CLIENT = "kube::Client was not initialized properly"
OPERATIONS = frozenset({"list_resources_by_namespace", "list_resources_all", "get_resource", "can_i"})
_ACCESS_CHECKED = frozenset({"KubernetesListResourceNamespace", "KubernetesListResourceAll", "KubernetesGetResource"})
# A host call cannot be interrupted like wasm code: it gives up by itself, at the latest when the
# evaluation's deadline passes.
_MAX_WAIT_SECONDS = connection.REQUEST_TIMEOUT_SECONDS
_MIN_WAIT_SECONDS = 0.05
# A call that gives up leaves the guest this long before the deadline to read the error: a clear host
# error rather than the evaluation's timeout.
_GUEST_MARGIN_SECONDS = 0.25


def access_denied_message(api_version: str, kind: str) -> str:
    return (f"Policy has not been granted access to Kubernetes {api_version}/{kind} resources. "
            "The violation has been reported.")


def check_access(policy_id: str, allowed: Iterable[ContextAwareResource], request: HostRequest) -> None:
    if request.kind not in _ACCESS_CHECKED:
        return  # can_i is not restricted
    allowed = tuple(allowed)
    api_version, kind = request.fields["api_version"], request.fields["kind"]
    if ContextAwareResource(api_version, kind) not in allowed:
        log.error("policy %s tried to access Kubernetes %s/%s resources it has not been granted (allowed: %s)",
                  policy_id, api_version, kind, ", ".join(f"{r.api_version}/{r.kind}" for r in allowed) or "none")
        raise HostCallError(access_denied_message(api_version, kind))


def answer(request: HostRequest, deadline: float | None = None) -> bytes:
    """This build's answer to a decoded Kubernetes request; `deadline` (monotonic) bounds the wait."""
    client = connection.cluster()
    if client is None:
        raise HostCallError(NO_KUBERNETES_CLIENT)
    wait = _MAX_WAIT_SECONDS if deadline is None else max(_MIN_WAIT_SECONDS, min(
        _MAX_WAIT_SECONDS, deadline - time.monotonic() - _GUEST_MARGIN_SECONDS))
    fields = request.fields
    try:
        if request.kind == "KubernetesListResourceNamespace":
            return client.list(fields["api_version"], fields["kind"], fields["namespace"],
                               fields.get("label_selector"), fields.get("field_selector"), wait)
        if request.kind == "KubernetesListResourceAll":
            return client.list(fields["api_version"], fields["kind"], None,
                               fields.get("label_selector"), fields.get("field_selector"), wait)
        if request.kind == "KubernetesGetResource":
            return client.get(fields["api_version"], fields["kind"], fields["name"], fields.get("namespace"),
                              bool(fields.get("disable_cache")), wait)
        if request.kind == "KubernetesCanI":
            return client.can_i(fields["request"], bool(fields.get("disable_cache")), wait)
        if request.kind == "KubernetesGetResourcePluralName":
            return client.plural(fields["api_version"], fields["kind"], wait)
    except ClusterError as exc:
        raise HostCallError(str(exc)) from exc
    raise HostCallError(f"unknown operation: {request.kind}")
