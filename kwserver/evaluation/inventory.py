"""The cluster inventory that context-aware OPA and Gatekeeper policies read as `data` (spec §5.3).

Rego policies make no host calls: the server lists every kind of the policy's `contextAwareResources`
(all namespaces, no selectors) before each evaluation and hands the result over in the layout the policy
was written for:

- OPA (kube-mgmt's layout): the settings, with `kubernetes` replaced by
  `{<plural>: {<namespace>: {<name>: obj}}}` for namespaced kinds and `{<plural>: {<name>: obj}}` for
  cluster-scoped ones;
- Gatekeeper (its sync layout): `{"inventory": {"cluster": {<apiVersion>: {<Kind>: {<name>: obj}}},
  "namespace": {<namespace>: {<apiVersion>: {<Kind>: {<name>: obj}}}}}}`.

An object is namespaced when it has a namespace, as in the reference. The lists come from the cluster
client's reflectors; the JSON document is rebuilt only when one of them changed, so an unchanged cluster
hands the instance the very same bytes (which it then does not push again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from kwserver.capabilities.callback_requests import HostCallError, HostRequest
from kwserver.cluster import connection
from kwserver.config import ContextAwareResource

log = logging.getLogger(__name__)

# A policy without a timeout still gets an answer: the cluster client's own request bound.
_MAX_WAIT_SECONDS = connection.REQUEST_TIMEOUT_SECONDS


class InventoryUnavailable(Exception):
    """The cluster could not be listed; the text is the rejection message."""


class HostRequests(Protocol):
    """How the inventory reaches the cluster: the policy's own capabilities (kwserver.capabilities), so the
    lists are recorded and replayed as the policy's calls are (`kwserver run`), as in the reference."""

    def on_behalf(self, request: HostRequest, deadline: float | None) -> bytes: ...


def _named(items: Sequence[dict[str, Any]]) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(namespace or None, name, object) of every listed object that has a name."""
    named = []
    for obj in items:
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if isinstance(name, str):
            named.append((metadata.get("namespace") or None, name, obj))
    return named


def opa_inventory(lists: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> dict[str, Any]:
    """`data.kubernetes` of an OPA policy from (plural name, listed objects) pairs. A kind with no
    objects has no key, as in the reference."""
    inventory: dict[str, Any] = {}
    for plural, items in lists:
        for namespace, name, obj in _named(items):
            by_name = inventory.setdefault(plural, {})
            if namespace is not None:
                by_name = by_name.setdefault(namespace, {})
            by_name[name] = obj
    return inventory


def gatekeeper_inventory(lists: Sequence[tuple[ContextAwareResource, Sequence[dict[str, Any]]]]) -> dict[str, Any]:
    """`data.inventory` of a Gatekeeper policy from (resource, listed objects) pairs."""
    cluster: dict[str, Any] = {}
    namespaced: dict[str, Any] = {}
    for resource, items in lists:
        for namespace, name, obj in _named(items):
            scope = cluster if namespace is None else namespaced.setdefault(namespace, {})
            scope.setdefault(resource.api_version, {}).setdefault(resource.kind, {})[name] = obj
    return {"cluster": cluster, "namespace": namespaced}


def opa_data(settings: dict[str, Any], inventory: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "kubernetes": inventory}


def gatekeeper_data(inventory: dict[str, Any]) -> dict[str, Any]:
    return {"inventory": inventory}


class _Built:
    __slots__ = ("data", "lists")

    def __init__(self, lists: tuple[bytes, ...], data: bytes):
        self.lists, self.data = lists, data


class InventoryCache:
    """The data documents of this process, one per (mode, allow-list, settings)."""

    def __init__(self) -> None:
        self.built: dict[tuple[Any, ...], _Built] = {}
        self.lock = threading.Lock()

    def opa(self, host: HostRequests, policy_name: str, resources: Sequence[ContextAwareResource],
            settings_json: bytes, timeout_seconds: float | None) -> bytes:
        """The `data` of an OPA policy: its settings with the inventory as `kubernetes`."""
        deadline = _deadline(timeout_seconds)
        lists = _fetch(host, resources, deadline)
        # Asked every time, after the lists, as the reference does (recorded sessions see the same calls).
        plurals = tuple(_plural(host, resource, deadline) for resource in resources)
        key = ("opa", tuple(resources), plurals, settings_json)
        cached = self._cached(key, lists)
        if cached is not None:
            return cached
        settings = orjson.loads(settings_json)
        if not isinstance(settings, dict):
            settings = {}
        if "kubernetes" in settings and key not in self.built:
            log.warning("policy %s: the `kubernetes` key of its settings is replaced by the cluster inventory",
                        policy_name)
        inventory = opa_inventory([(plural, _items(raw)) for plural, raw in zip(plurals, lists, strict=True)])
        return self._store(key, lists, orjson.dumps(opa_data(settings, inventory)))

    def gatekeeper(self, host: HostRequests, resources: Sequence[ContextAwareResource],
                   timeout_seconds: float | None) -> bytes:
        """The `data` of a Gatekeeper policy: `{"inventory": ...}`."""
        lists = _fetch(host, resources, _deadline(timeout_seconds))
        key = ("gatekeeper", tuple(resources))
        cached = self._cached(key, lists)
        if cached is not None:
            return cached
        pairs = [(resource, _items(raw)) for resource, raw in zip(resources, lists, strict=True)]
        inventory = gatekeeper_inventory(pairs)
        return self._store(key, lists, orjson.dumps(gatekeeper_data(inventory)))

    def _cached(self, key: tuple[Any, ...], lists: tuple[bytes, ...]) -> bytes | None:
        with self.lock:
            built = self.built.get(key)
        return built.data if built is not None and built.lists == lists else None

    def _store(self, key: tuple[Any, ...], lists: tuple[bytes, ...], data: bytes) -> bytes:
        with self.lock:
            self.built[key] = _Built(lists, data)
        return data


def _deadline(timeout_seconds: float | None) -> float:
    wait = _MAX_WAIT_SECONDS if timeout_seconds is None else min(float(timeout_seconds), _MAX_WAIT_SECONDS)
    return time.monotonic() + wait


def _fetch(host: HostRequests, resources: Sequence[ContextAwareResource], deadline: float) -> tuple[bytes, ...]:
    """The List of every kind, all namespaces, no selectors; the whole fetch ends by `deadline`."""
    return tuple(_ask(host, "KubernetesListResourceAll", resource, deadline, label_selector=None,
                      field_selector=None) for resource in resources)


def _plural(host: HostRequests, resource: ContextAwareResource, deadline: float) -> str:
    answer = _ask(host, "KubernetesGetResourcePluralName", resource, deadline)
    try:
        plural = orjson.loads(answer)
    except orjson.JSONDecodeError:
        plural = None
    if not isinstance(plural, str):
        raise InventoryUnavailable(f"get plural name failure, cannot convert callback response: {answer[:200]!r}")
    return plural


def _ask(host: HostRequests, kind: str, resource: ContextAwareResource, deadline: float, **fields: Any) -> bytes:
    request = HostRequest(kind, {"api_version": resource.api_version, "kind": resource.kind, **fields})
    try:
        return host.on_behalf(request, deadline)
    except HostCallError as exc:
        raise InventoryUnavailable(str(exc)) from exc


def _items(raw: bytes) -> list[dict[str, Any]]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InventoryUnavailable(f"cannot convert callback response into a list of kubernetes objects: {exc}") \
            from exc
    items = doc.get("items") if isinstance(doc, dict) else None
    return [item for item in items or [] if isinstance(item, dict)]


_process_cache = InventoryCache()


def opa_data_json(host: HostRequests, policy_name: str, resources: Sequence[ContextAwareResource],
                  settings_json: bytes, timeout_seconds: float | None) -> bytes:
    return _process_cache.opa(host, policy_name, resources, settings_json, timeout_seconds)


def gatekeeper_data_json(host: HostRequests, resources: Sequence[ContextAwareResource],
                         timeout_seconds: float | None) -> bytes:
    return _process_cache.gatekeeper(host, resources, timeout_seconds)
