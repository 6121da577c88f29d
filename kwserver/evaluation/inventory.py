"""The cluster inventory that context-aware OPA and Gatekeeper policies read as `data`.

Rego policies make no host calls: before each evaluation the server lists every kind of the policy's
`contextAwareResources` (all namespaces, no selectors), and the policy's mode lays the lists out as the
policy expects (kwserver.evaluation.modes.opa and .gatekeeper). The lists come from the cluster client's
reflectors; a mode's document is rebuilt only when one of them changed, so an unchanged cluster hands the
instance the very same bytes (which it then does not push again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson

from kwserver.capabilities.callback_requests import HostCallError, HostRequest
from kwserver.cluster import connection
from kwserver.config import ContextAwareResource

# A policy without a timeout still gets an answer: the cluster client's own request bound.
_MAX_WAIT_SECONDS = connection.REQUEST_TIMEOUT_SECONDS


class InventoryUnavailable(Exception):
    """The cluster could not be listed; the text is the rejection message."""


class HostRequests(Protocol):
    """How the inventory reaches the cluster: the policy's own capabilities (kwserver.capabilities), so the
    lists are recorded and replayed as the policy's calls are (`kwserver run`), as in the reference."""

    def on_behalf(self, request: HostRequest, deadline: float | None) -> bytes: ...


def named(objects: Sequence[dict[str, Any]]) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(namespace or None, name, object) of every listed object that has a name; an object is namespaced
    when it has a namespace, as in the reference."""
    found = []
    for obj in objects:
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if isinstance(name, str):
            found.append((metadata.get("namespace") or None, name, obj))
    return found


class _Built:
    __slots__ = ("data", "lists")

    def __init__(self, lists: tuple[bytes, ...], data: bytes):
        self.lists, self.data = lists, data


class InventoryCache:
    """The data documents of this process, one per key (a mode's: its layout, allow-list and settings)."""

    def __init__(self) -> None:
        self.built: dict[tuple[Any, ...], _Built] = {}
        self.lock = threading.Lock()

    def document(self, key: tuple[Any, ...], lists: tuple[bytes, ...], build: Callable[[bool], bytes]) -> bytes:
        """The document of `key` for these lists: the one built last while they are unchanged, else
        `build(first)`, `first` telling whether this key was ever built before."""
        with self.lock:
            built = self.built.get(key)
        if built is not None and built.lists == lists:
            return built.data
        data = build(built is None)
        with self.lock:
            self.built[key] = _Built(lists, data)
        return data


def deadline_for(timeout_seconds: float | None) -> float:
    """When the inventory must be in hand: the policy's timeout, within the cluster client's own bound."""
    wait = _MAX_WAIT_SECONDS if timeout_seconds is None else min(float(timeout_seconds), _MAX_WAIT_SECONDS)
    return time.monotonic() + wait


def fetch(host: HostRequests, resources: Sequence[ContextAwareResource], deadline: float) -> tuple[bytes, ...]:
    """The List of every kind, all namespaces, no selectors; the whole fetch ends by `deadline`."""
    return tuple(_ask(host, "KubernetesListResourceAll", resource, deadline, label_selector=None,
                      field_selector=None) for resource in resources)


def plural_name(host: HostRequests, resource: ContextAwareResource, deadline: float) -> str:
    """The plural name of a kind (`services`), which keys OPA's inventory."""
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


def listed_objects(raw: bytes) -> list[dict[str, Any]]:
    """The objects of a List the cluster answered."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InventoryUnavailable(f"cannot convert callback response into a list of kubernetes objects: {exc}") \
            from exc
    found = doc.get("items") if isinstance(doc, dict) else None
    return [item for item in found or [] if isinstance(item, dict)]


_process_cache = InventoryCache()


def document(key: tuple[Any, ...], lists: tuple[bytes, ...], build: Callable[[bool], bytes]) -> bytes:
    """This process's document of `key` (see InventoryCache.document)."""
    return _process_cache.document(key, lists, build)
