"""A Kubernetes API client for the context-aware callbacks, with the reference's caches.

Connection settings and credentials (kubeconfig, in-cluster service account, exec plugins, client
certificates) come from lightkube; requests are plain JSON over its authenticated HTTP client, so what a
policy reads is what the API server sent, not a model's round trip.

Caches, as the reference keeps them: discovery (plural name, scope) forever; lists from one reflector per
(api_version, kind, namespace, selectors), a list+watch kept fresh in a thread and never evicted;
`get_resource` and `can_i` answers for 5 s. They live in the process that asks: each worker has its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import orjson

log = logging.getLogger(__name__)

ANSWER_TTL_SECONDS = 5.0
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
WATCH_SECONDS = 290  # the API server ends a watch after this; the reflector resumes from its last version
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)


class ClusterError(Exception):
    """A request the API server refused or that could not reach it; the text is what the guest reads."""


class NotFound(ClusterError):
    pass


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


class Reflector:
    """An in-memory copy of one list, kept fresh by list+watch in a daemon thread."""

    def __init__(self, http: httpx.Client, resource: ApiResource, namespace: str | None,
                 selectors: dict[str, str]):
        self.http, self.resource, self.namespace, self.selectors = http, resource, namespace, selectors
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.loaded = threading.Event()
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"reflector {resource.kind}", daemon=True)
        self.thread.start()

    def items(self, wait_seconds: float) -> list[dict[str, Any]]:
        """The current objects; the first call waits for the initial list."""
        if not self.loaded.wait(wait_seconds):
            raise ClusterError(f"cannot list {self.resource.api_version}/{self.resource.kind}: "
                               f"{self.last_error or 'the API server did not answer in time'}")
        with self.lock:
            return [self.objects[key] for key in sorted(self.objects)]

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                version = self._list()
                failures = 0
                self._watch(version)
            except _Relist:
                continue
            except (httpx.HTTPError, ClusterError, ValueError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("watch of %s/%s failed, retrying: %s", self.resource.api_version,
                            self.resource.kind, self.last_error)
                time.sleep(_BACKOFF[min(failures, len(_BACKOFF) - 1)])
                failures += 1

    def _typed(self, obj: dict[str, Any]) -> dict[str, Any]:
        # List items usually come without their type; watch events carry it. Give every item both.
        obj.setdefault("apiVersion", self.resource.api_version)
        obj.setdefault("kind", self.resource.kind)
        return stripped(obj)

    def _list(self) -> str:
        doc = request_json(self.http, "GET", self.resource.path(self.namespace), params=self.selectors)
        objects = {_object_key(item): self._typed(item) for item in doc.get("items") or []}
        with self.lock:
            self.objects = objects
        self.last_error = None
        self.loaded.set()
        return str((doc.get("metadata") or {}).get("resourceVersion", ""))

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
        with self.lock:
            if kind == "DELETED":
                self.objects.pop(key, None)
            elif kind in ("ADDED", "MODIFIED"):
                self.objects[key] = self._typed(obj)
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
    doc = response.json()
    if not isinstance(doc, dict):
        raise ClusterError(f"the API server answered {path} with something that is not an object")
    return doc


class _TtlCache:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.clock = ttl, clock
        self.entries: dict[Any, tuple[float, bytes]] = {}
        self.lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry[0] < self.clock():
                self.entries.pop(key, None)
                return None
            return entry[1]

    def put(self, key: Any, value: bytes) -> None:
        with self.lock:
            self.entries[key] = (self.clock() + self.ttl, value)


class ClusterClient:
    """The callbacks' view of one cluster. `wait_seconds` bounds every request (the policy's own
    deadline is usually shorter and is passed per call)."""

    def __init__(self, http: httpx.Client):
        self.http = http
        self.resources: dict[tuple[str, str], ApiResource] = {}
        self.reflectors: dict[tuple[Any, ...], Reflector] = {}
        self.answers = _TtlCache(ANSWER_TTL_SECONDS)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

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
             field_selector: str | None, timeout: float) -> bytes:
        resource = self.resource(api_version, kind, timeout)
        if namespace is not None and not resource.namespaced:
            raise ClusterError(f"resource {api_version}/{kind} is cluster wide. "
                               "Cannot search for it inside of a namespace")
        selectors = {name: value for name, value in (("labelSelector", label_selector),
                                                     ("fieldSelector", field_selector)) if value}
        key = (api_version, kind, namespace, label_selector, field_selector)
        with self.lock:
            reflector = self.reflectors.get(key)
            if reflector is None:
                reflector = self.reflectors[key] = Reflector(self.http, resource, namespace, selectors)
        items = reflector.items(timeout)
        return orjson.dumps({"apiVersion": api_version, "kind": f"{kind}List", "metadata": {}, "items": items})

    def get(self, api_version: str, kind: str, name: str, namespace: str | None, disable_cache: bool,
            timeout: float) -> bytes:
        key = ("get", api_version, kind, name, namespace)
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
        answer = orjson.dumps(doc)
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
        answer = orjson.dumps(doc["status"])
        self.answers.put(key, answer)
        return answer


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
