"""A Kubernetes API client for the context-aware callbacks, with the reference's caches.

Connection settings and credentials (kubeconfig, in-cluster service account, exec plugins, client
certificates) come from lightkube; requests are plain JSON over its authenticated HTTP client, so what a
policy reads is what the API server sent, not a model's round trip.

Caches, as the reference keeps them: discovery (plural name, scope) forever; lists from one reflector per
(api_version, kind, namespace, selectors, field masks), a list+watch kept fresh in a thread and never
evicted, its objects pruned to the masks as they arrive (kwserver/cluster/field_masks.py); `get_resource`
and `can_i` answers for 5 s. Under `kwserver serve` one client lives in the cluster cache process
(kwserver/cluster/cache_server.py) and the workers ask it; tools use one in their own process.

Bounded: at most `CacheLimits.max_reflectors` lists and `CacheLimits.max_objects` objects over all of them;
objects are kept as their JSON bytes (a parsed object costs several times its JSON), and each list's answer
is serialized once per change, not once per call. The answers are a BoundedCache (entries, bytes, 5 s):
a policy asking a new name on every request cannot grow it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import orjson

from kwserver.bounded_cache import BoundedCache
from kwserver.cluster.field_masks import Mask, mask_tree, masked, normalized
from kwserver.cluster.limits import DEFAULT_MAX_OBJECTS, CacheLimits, ClusterError, NotFound, describe

log = logging.getLogger(__name__)

ANSWER_TTL_SECONDS = 5.0
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
WATCH_SECONDS = 290  # the API server ends a watch after this; the reflector resumes from its last version
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)
LIST_PAGE_SIZE = 500


_REFUSED_RETRY_SECONDS = 30.0  # a list refused for its size is tried again after this (objects may go away)


@dataclass(frozen=True)
class ApiResource:
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name is not None else base


def stripped(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as reflectors store it: no managedFields, no last-applied annotation (they are large and
    no policy needs them)."""
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict):
            annotations.pop(LAST_APPLIED, None)
    return obj


def _object_key(obj: dict[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return metadata.get("namespace") or "", metadata.get("name") or ""


class _Relist(Exception):
    """The watch cannot resume (its version is gone): list again."""


class _OverBudget(Exception):
    """The list holds more objects than the cache may keep."""


class ObjectBudget:
    """The objects all reflectors of one client hold together, at most `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held: dict[int, int] = {}
        self.lock = threading.Lock()

    def claim(self, owner: object, count: int) -> int | None:
        """Let `owner` hold `count` objects: None when granted, else the total it would make."""
        with self.lock:
            total = sum(self.held.values()) - self.held.get(id(owner), 0) + count
            if total > self.limit:
                return total
            self.held[id(owner)] = count
            return None

    def total(self) -> int:
        with self.lock:
            return sum(self.held.values())


class Reflector:
    """An in-memory copy of one list, kept fresh by list+watch in a daemon thread. Objects are stored as
    their JSON; the list answer is built once per change."""

    def __init__(self, http: httpx.Client, resource: ApiResource, namespace: str | None,
                 selectors: dict[str, str], budget: ObjectBudget | None = None, mask: Mask | None = None):
        self.http, self.resource, self.namespace, self.selectors = http, resource, namespace, selectors
        self.mask = mask
        self.budget = budget or ObjectBudget(DEFAULT_MAX_OBJECTS)
        self.objects: dict[tuple[str, str], bytes] = {}
        self.lock = threading.Lock()
        self.loaded = threading.Event()  # set by the first list, or when the list is refused
        self.last_error: str | None = None
        self.refusal: str | None = None  # why the list is not served (too many objects)
        self.generation = 0
        self._answer: tuple[int, bytes] | None = None
        self.thread = threading.Thread(target=self._run, name=f"reflector {resource.kind}", daemon=True)
        self.thread.start()

    @property
    def what(self) -> str:
        return f"{self.resource.api_version}/{self.resource.kind}"

    def answer(self, wait_seconds: float) -> bytes:
        """The List document of the current objects; the first call waits for the initial list."""
        return self.versioned_answer(wait_seconds)[1]

    def versioned_answer(self, wait_seconds: float) -> tuple[int, bytes]:
        """The List document and its generation (which changes whenever the objects do)."""
        if not self.loaded.wait(wait_seconds):
            raise ClusterError(f"cannot list {self.what}: "
                               f"{self.last_error or 'the API server did not answer in time'}")
        with self.lock:
            if self.refusal is not None:
                raise ClusterError(self.refusal)
            if self._answer is None or self._answer[0] != self.generation:
                head = orjson.dumps({"apiVersion": self.resource.api_version, "kind": f"{self.resource.kind}List",
                                     "metadata": {}})[:-1]
                items = b",".join(self.objects[key] for key in sorted(self.objects))
                self._answer = (self.generation, head + b',"items":[' + items + b"]}")
            return self._answer

    def items(self, wait_seconds: float) -> list[dict[str, Any]]:
        """The current objects, parsed."""
        return orjson.loads(self.answer(wait_seconds))["items"]

    def _run(self) -> None:
        failures = 0
        while not self.http.is_closed:  # the client's owner closed it: its reflectors end
            try:
                version = self._list()
                failures = 0
                self._watch(version)
            except _Relist:
                continue
            except _OverBudget:
                time.sleep(_REFUSED_RETRY_SECONDS)
            except RuntimeError:
                if not self.http.is_closed:
                    raise
            except (httpx.HTTPError, ClusterError, ValueError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("watch of %s failed, retrying: %s", self.what, self.last_error)
                time.sleep(_BACKOFF[min(failures, len(_BACKOFF) - 1)])
                failures += 1

    def _typed(self, obj: dict[str, Any]) -> bytes:
        # List items usually come without their type; watch events carry it. Give every item both.
        obj.setdefault("apiVersion", self.resource.api_version)
        obj.setdefault("kind", self.resource.kind)
        return _compact(orjson.dumps(masked(stripped(obj), self.mask)))

    def _refuse(self, total: int) -> None:
        self.budget.claim(self, 0)
        with self.lock:
            self.objects, self.generation = {}, self.generation + 1
            self.refusal = (f"cannot list {self.what}: the cluster cache may hold {self.budget.limit} objects "
                            f"(--cluster-max-objects) and this list would make it {total}")
        log.error("%s", self.refusal)
        self.loaded.set()
        raise _OverBudget()

    def _list(self) -> str:
        # In pages, as the reference's reflectors list: a page is parsed, stored as bytes and dropped, so
        # a large list never exists as parsed objects all at once.
        objects: dict[tuple[str, str], bytes] = {}
        token, version = "", ""
        while True:
            params = {**self.selectors, "limit": str(LIST_PAGE_SIZE), **({"continue": token} if token else {})}
            doc = request_json(self.http, "GET", self.resource.path(self.namespace), params=params)
            items = doc.get("items") or []
            over = self.budget.claim(self, len(objects) + len(items))
            if over is not None:
                self._refuse(over)
            for item in items:
                objects[_object_key(item)] = self._typed(item)
            metadata = doc.get("metadata") or {}
            version = version or str(metadata.get("resourceVersion", ""))
            token = metadata.get("continue") or ""
            if not token:
                break
        with self.lock:
            self.objects, self.generation, self.refusal = objects, self.generation + 1, None
        self.last_error = None
        self.loaded.set()
        return version

    def _watch(self, version: str) -> None:
        while True:
            params = {**self.selectors, "watch": "1", "resourceVersion": version,
                      "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_SECONDS)}
            timeout = httpx.Timeout(10.0, read=WATCH_SECONDS + 30.0)
            with self.http.stream("GET", self.resource.path(self.namespace), params=params,
                                  timeout=timeout) as response:
                if response.status_code == 410:
                    raise _Relist()
                if response.status_code >= 400:
                    response.read()
                    raise ClusterError(api_error_text(response))
                for line in response.iter_lines():
                    if line.strip():
                        version = self._apply(orjson.loads(line), version)

    def _apply(self, event: dict[str, Any], version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise _Relist() if obj.get("code") == 410 else ClusterError(str(obj.get("message")))
        version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        if kind == "BOOKMARK":
            return version
        key = _object_key(obj)
        if kind == "ADDED" or (kind == "MODIFIED" and key not in self.objects):
            over = self.budget.claim(self, len(self.objects) + 1)
            if over is not None:
                self._refuse(over)
        with self.lock:
            if kind == "DELETED":
                self.objects.pop(key, None)
            elif kind in ("ADDED", "MODIFIED"):
                self.objects[key] = self._typed(obj)
            self.generation += 1
        if kind == "DELETED":
            self.budget.claim(self, len(self.objects))
        return version


def api_error_text(response: httpx.Response) -> str:
    try:
        status = response.json()
        message = status.get("message") if isinstance(status, dict) else None
    except ValueError:
        message = None
    return f"the API server answered {response.status_code}: {message or response.text[:200]}"


def request_json(http: httpx.Client, method: str, path: str, *, timeout: float | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    response = http.request(method, path, timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                            **kwargs)
    if response.status_code == 404:
        raise NotFound(api_error_text(response))
    if response.status_code >= 400:
        raise ClusterError(api_error_text(response))
    doc = orjson.loads(response.content)
    if not isinstance(doc, dict):
        raise ClusterError(f"the API server answered {path} with something that is not an object")
    return doc


class ClusterClient:
    """The callbacks' view of one cluster. `wait_seconds` bounds every request (the policy's own
    deadline is usually shorter and is passed per call)."""

    def __init__(self, http: httpx.Client, limits: CacheLimits | None = None):
        limits = limits or CacheLimits()
        self.http, self.limits = http, limits
        self.budget = ObjectBudget(limits.max_objects)
        self.resources: dict[tuple[str, str], ApiResource] = {}
        self.reflectors: dict[tuple[Any, ...], Reflector] = {}
        self.answers: BoundedCache[bytes] = BoundedCache(
            "cluster_answers", max_entries=limits.max_answers, max_bytes=limits.max_answer_bytes,
            ttl=ANSWER_TTL_SECONDS)
        self.lock = threading.Lock()
        # Generations start again in a restarted cache process: versions carry which process made them.
        self.incarnation = os.urandom(6).hex()

    def close(self) -> None:
        self.http.close()

    def plural(self, api_version: str, kind: str, timeout: float) -> bytes:
        """The kind's plural resource name, as a JSON string."""
        return orjson.dumps(self.resource(api_version, kind, timeout).plural)

    def resource(self, api_version: str, kind: str, timeout: float) -> ApiResource:
        found = self.resources.get((api_version, kind))
        if found is not None:
            return found
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        try:
            doc = request_json(self.http, "GET", path, timeout=timeout)
        except (ClusterError, httpx.HTTPError, ValueError) as exc:
            raise ClusterError(f"error finding resource {api_version} / {kind}: {describe(exc)}") from exc
        for entry in doc.get("resources") or []:
            if entry.get("kind") == kind and "/" not in str(entry.get("name", "/")):
                found = ApiResource(api_version, kind, entry["name"], bool(entry.get("namespaced")))
                self.resources[(api_version, kind)] = found
                return found
        raise ClusterError(f"Cannot find resource {api_version}/{kind}")

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None,
             field_selector: str | None, timeout: float, masks: list[str] | None = None) -> bytes:
        return self.reflector(api_version, kind, namespace, label_selector, field_selector, timeout,
                              masks).answer(timeout)

    def list_version(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None,
                     field_selector: str | None, timeout: float, masks: list[str] | None = None) -> tuple[str, bytes]:
        """The list and a version of it that differs whenever the answer does, in this process or another."""
        reflector = self.reflector(api_version, kind, namespace, label_selector, field_selector, timeout, masks)
        generation, answer = reflector.versioned_answer(timeout)
        return f"{self.incarnation}:{generation}", answer

    def reflector(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None,
                  field_selector: str | None, timeout: float, masks: list[str] | None = None) -> Reflector:
        resource = self.resource(api_version, kind, timeout)
        if namespace is not None and not resource.namespaced:
            raise ClusterError(f"resource {api_version}/{kind} is cluster wide. "
                               "Cannot search for it inside of a namespace")
        selectors = {name: value for name, value in (("labelSelector", label_selector),
                                                     ("fieldSelector", field_selector)) if value}
        mask = normalized(masks)
        key = (api_version, kind, namespace, label_selector, field_selector, mask)
        with self.lock:
            reflector = self.reflectors.get(key)
            if reflector is None:
                if len(self.reflectors) >= self.limits.max_reflectors:
                    raise ClusterError(f"cannot list {api_version}/{kind}: the cluster cache keeps at most "
                                       f"{self.limits.max_reflectors} lists (--cluster-max-reflectors) "
                                       "and all are in use")
                reflector = Reflector(self.http, resource, namespace, selectors, self.budget, mask_tree(mask))
                self.reflectors[key] = reflector
        return reflector

    def sizes(self) -> tuple[int, int]:
        """(lists, objects) held: for the process title and logs."""
        return len(self.reflectors), self.budget.total()

    def get(self, api_version: str, kind: str, name: str, namespace: str | None, disable_cache: bool,
            timeout: float, masks: list[str] | None = None) -> bytes:
        """The object, pruned to `masks`; kept pruned (the cache key has the masks)."""
        mask = normalized(masks)
        key = ("get", api_version, kind, name, namespace, mask)
        cached = None if disable_cache else self.answers.get(key)
        if cached is not None:
            return cached
        resource = self.resource(api_version, kind, timeout)
        if resource.namespaced and namespace is None:
            raise ClusterError(f"Resource {api_version}/{kind} is namespaced, but no namespace was provided")
        path = resource.path(namespace if resource.namespaced else None, name)
        try:
            doc = request_json(self.http, "GET", path, timeout=timeout)
        except NotFound as exc:
            shown = "None" if namespace is None else f'Some("{namespace}")'
            raise ClusterError(f"Cannot find {api_version}/{kind} named '{name}' inside of namespace "
                               f"'{shown}'") from exc
        except (httpx.HTTPError, ValueError) as exc:
            raise ClusterError(f"cannot get {api_version}/{kind} {name}: {describe(exc)}") from exc
        answer = _compact(orjson.dumps(masked(doc, mask_tree(mask))))
        self.answers.put(key, answer)
        return answer

    def can_i(self, review: dict[str, Any], disable_cache: bool, timeout: float) -> bytes:
        key = ("can_i", orjson.dumps(review, option=orjson.OPT_SORT_KEYS))
        cached = None if disable_cache else self.answers.get(key)
        if cached is not None:
            return cached
        attributes = review.get("resource_attributes") or {}
        spec: dict[str, Any] = {"user": review.get("user"), "groups": review.get("groups"),
                                "resourceAttributes": {name: attributes.get(name) for name in (
                                    "namespace", "verb", "group", "resource", "subresource", "name", "version")}}
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": _without_nulls(spec)}
        try:
            doc = request_json(self.http, "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                               content=orjson.dumps(body), headers={"Content-Type": "application/json"},
                               timeout=timeout)
        except (httpx.HTTPError, ValueError) as exc:
            raise ClusterError(f"cannot create a SubjectAccessReview: {describe(exc)}") from exc
        if not isinstance(doc.get("status"), dict):
            raise ClusterError("SubjectAccessReview did not return a response")
        answer = _compact(orjson.dumps(doc["status"]))
        self.answers.put(key, answer)
        return answer


def _compact(data: bytes) -> bytes:
    """A copy of what is kept: orjson's bytes keep the over-allocated buffer they were written in (4 KiB for a
    small object)."""
    return memoryview(data).tobytes()


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value
