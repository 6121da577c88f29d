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

from kwserver.capabilities.kubernetes import NO_KUBERNETES_CLIENT
from kwserver.cluster import connection
from kwserver.cluster.client import ClusterError
from kwserver.config import ContextAwareResource

log = logging.getLogger(__name__)

# A policy without a timeout still gets an answer: the cluster client's own request bound.
_MAX_WAIT_SECONDS = connection.REQUEST_TIMEOUT_SECONDS
_MIN_WAIT_SECONDS = 0.05


class InventoryUnavailable(Exception):
    """The cluster could not be listed; the text is the rejection message."""


class Cluster(Protocol):
    """What the inventory needs of the cluster client (`kwserver.cluster.connection.cluster()`)."""

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None,
             field_selector: str | None, timeout: float) -> bytes: ...

    def resource(self, api_version: str, kind: str, timeout: float) -> Any: ...


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

    def opa(self, policy_name: str, resources: Sequence[ContextAwareResource], settings_json: bytes,
            timeout_seconds: float | None) -> bytes:
        """The `data` of an OPA policy: its settings with the inventory as `kubernetes`."""
        client, deadline = _client(), _deadline(timeout_seconds)
        lists = _fetch(client, resources, deadline)
        key = ("opa", tuple(resources), settings_json)
        cached = self._cached(key, lists)
        if cached is not None:
            return cached
        settings = orjson.loads(settings_json)
        if not isinstance(settings, dict):
            settings = {}
        if "kubernetes" in settings and key not in self.built:
            log.warning("policy %s: the `kubernetes` key of its settings is replaced by the cluster inventory",
                        policy_name)
        plurals = [_plural(client, resource, deadline) for resource in resources]
        inventory = opa_inventory([(plural, _items(raw)) for plural, raw in zip(plurals, lists, strict=True)])
        return self._store(key, lists, orjson.dumps(opa_data(settings, inventory)))

    def gatekeeper(self, resources: Sequence[ContextAwareResource], timeout_seconds: float | None) -> bytes:
        """The `data` of a Gatekeeper policy: `{"inventory": ...}`."""
        lists = _fetch(_client(), resources, _deadline(timeout_seconds))
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


def _client() -> Cluster:
    client = connection.cluster()
    if client is None:
        raise InventoryUnavailable(NO_KUBERNETES_CLIENT)
    return client


def _deadline(timeout_seconds: float | None) -> float:
    wait = _MAX_WAIT_SECONDS if timeout_seconds is None else min(float(timeout_seconds), _MAX_WAIT_SECONDS)
    return time.monotonic() + wait


def _remaining(deadline: float) -> float:
    return max(_MIN_WAIT_SECONDS, deadline - time.monotonic())


def _fetch(client: Cluster, resources: Sequence[ContextAwareResource], deadline: float) -> tuple[bytes, ...]:
    """The List of every kind, all namespaces, no selectors; the whole fetch ends by `deadline`."""
    lists = []
    for resource in resources:
        try:
            lists.append(client.list(resource.api_version, resource.kind, None, None, None, _remaining(deadline)))
        except ClusterError as exc:
            raise InventoryUnavailable(str(exc)) from exc
    return tuple(lists)


def _plural(client: Cluster, resource: ContextAwareResource, deadline: float) -> str:
    try:
        return str(client.resource(resource.api_version, resource.kind, _remaining(deadline)).plural)
    except ClusterError as exc:
        raise InventoryUnavailable(str(exc)) from exc


def _items(raw: bytes) -> list[dict[str, Any]]:
    items = orjson.loads(raw).get("items") or []
    return [item for item in items if isinstance(item, dict)]


_process_cache = InventoryCache()


def opa_data_json(policy_name: str, resources: Sequence[ContextAwareResource], settings_json: bytes,
                  timeout_seconds: float | None) -> bytes:
    return _process_cache.opa(policy_name, resources, settings_json, timeout_seconds)


def gatekeeper_data_json(resources: Sequence[ContextAwareResource], timeout_seconds: float | None) -> bytes:
    return _process_cache.gatekeeper(resources, timeout_seconds)
