"""A local Kubernetes API server for tests: HTTPS with a test CA, bearer-token auth, discovery, lists with
resource versions and `limit`/`continue` pages, watch streams, SubjectAccessReviews and 404 Status answers,
in the API's JSON shapes.

`KubeApi.kubeconfig(path)` writes the kubeconfig a kwserver connects with. Objects are changed through
`put` / `delete`, which notify open watches as the real API server does.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.support.certs import make_ca, make_cert


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    @property
    def group_version(self) -> tuple[str, str]:
        group, _, version = self.api_version.rpartition("/")
        return group, version


KINDS = (
    Kind("v1", "Namespace", "namespaces", False),
    Kind("v1", "Pod", "pods", True),
    Kind("v1", "Service", "services", True),
    Kind("v1", "ConfigMap", "configmaps", True),
    Kind("apps/v1", "Deployment", "deployments", True),
    Kind("networking.k8s.io/v1", "Ingress", "ingresses", True),
)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class KubeApi:
    def __init__(self, directory: Path, token: str = "test-token"):
        self.token = token
        self.ca = make_ca(directory, "kube-ca")
        self.cert = make_cert(directory, "kube-apiserver", self.ca)
        self.version = 100
        self.objects: dict[Kind, dict[tuple[str, str], dict[str, Any]]] = {kind: {} for kind in KINDS}
        self.events: list[tuple[int, Kind, str, dict[str, Any]]] = []
        self.changed = threading.Condition()
        self.requests: list[str] = []  # "METHOD path?query" of every authenticated request
        # (user, verb, resource, namespace) -> allowed; anything else is denied.
        self.grants: set[tuple[str, str, str, str | None]] = set()
        self.stopping = False
        self.connections: set[Any] = set()  # open client connections, closed by stop() like a dying server
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert.cert, self.cert.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> KubeApi:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def kubeconfig(self, path: Path, token: str | None = None) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority": str(self.ca.cert)}}],
            "users": [{"name": "test", "user": {"token": token or self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        return path

    # --- the cluster's state ------------------------------------------------------------------------
    def kind(self, api_version: str, kind: str) -> Kind:
        return next(k for k in KINDS if (k.api_version, k.kind) == (api_version, kind))

    def put(self, api_version: str, kind: str, name: str, namespace: str | None = None,
            **fields: Any) -> dict[str, Any]:
        spec = self.kind(api_version, kind)
        with self.changed:
            self.version += 1
            key = (namespace or "", name)
            existed = key in self.objects[spec]
            metadata = {"name": name, "uid": f"uid-{name}", "resourceVersion": str(self.version),
                        "creationTimestamp": "2024-01-01T00:00:00Z",
                        "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                        **fields.pop("metadata", {})}
            if namespace is not None:
                metadata["namespace"] = namespace
            obj = {"apiVersion": api_version, "kind": kind, "metadata": metadata, **fields}
            self.objects[spec][key] = obj
            self.events.append((self.version, spec, "MODIFIED" if existed else "ADDED", copy.deepcopy(obj)))
            self.changed.notify_all()
            return obj

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        spec = self.kind(api_version, kind)
        with self.changed:
            self.version += 1
            obj = self.objects[spec].pop((namespace or "", name))
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}
            self.events.append((self.version, spec, "DELETED", obj))
            self.changed.notify_all()

    def count(self, prefix: str) -> int:
        return sum(1 for line in list(self.requests) if line.startswith(prefix))


def _selected(obj: dict[str, Any], query: dict[str, str]) -> bool:
    """Equality label selectors (`a=b,c=d`) and the metadata.name / metadata.namespace field selectors."""
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, query.get("labelSelector", "").split(",")):
        name, _, value = term.partition("=")
        if labels.get(name) != value:
            return False
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        name, _, value = term.partition("=")
        if obj["metadata"].get(name.removeprefix("metadata.")) != value:
            return False
    return True


def _discovery(api: KubeApi, path: str) -> dict[str, Any] | None:
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
    if path == "/apis":
        groups: dict[str, list[str]] = {}
        for kind in KINDS:
            group, version = kind.group_version
            if group:
                groups.setdefault(group, []).append(version)
        groups.setdefault("authorization.k8s.io", ["v1"])
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in sorted(set(vs))],
             "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}} for g, vs in groups.items()]}
    group_version = path.removeprefix("/api/") if path.startswith("/api/") else path.removeprefix("/apis/")
    kinds = [k for k in KINDS if k.api_version == group_version]
    if group_version == "authorization.k8s.io/v1":
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": [
            {"name": "subjectaccessreviews", "singularName": "", "namespaced": False,
             "kind": "SubjectAccessReview", "verbs": ["create"]}]}
    if not kinds or path.count("/") != (2 if path.startswith("/api/") else 3):
        return None
    resources = []
    for kind in kinds:
        resources.append({"name": kind.plural, "singularName": kind.kind.lower(), "namespaced": kind.namespaced,
                          "kind": kind.kind, "verbs": ["get", "list", "watch", "create", "delete"]})
        resources.append({"name": f"{kind.plural}/status", "singularName": "", "namespaced": kind.namespaced,
                          "kind": kind.kind, "verbs": ["get", "patch"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def _route(path: str) -> tuple[Kind, str | None, str | None] | None:
    """(kind, namespace, name) of a resource path; None when it is no resource path."""
    for kind in KINDS:
        base = "/api/v1" if kind.api_version == "v1" else f"/apis/{kind.api_version}"
        if not path.startswith(base + "/"):
            continue
        rest = path[len(base) + 1:].split("/")
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and kind.plural != "namespaces":
            namespace, rest = rest[1], rest[2:]
        if rest[0] != kind.plural or len(rest) > 2 or (namespace is not None and not kind.namespaced):
            continue
        return kind, namespace, rest[1] if len(rest) == 2 else None
    return None


def _handler(api: KubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body are separate writes: without TCP_NODELAY (which Go's servers set) the body waits
        # for the client's delayed ACK, 40 ms a request.
        disable_nagle_algorithm = True

        def setup(self) -> None:
            super().setup()
            api.connections.add(self.connection)

        def finish(self) -> None:
            api.connections.discard(self.connection)
            super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, doc: Any) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {api.token}":
                return True
            self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            return False

        def do_GET(self) -> None:
            if not self._authorized():
                return
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            api.requests.append(f"GET {self.path}")
            if parts.path == "/version":
                return self._send(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-kwtest"})
            discovery = _discovery(api, parts.path)
            if discovery is not None:
                return self._send(200, discovery)
            route = _route(parts.path)
            if route is None:
                return self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
            kind, namespace, name = route
            if name is not None:
                return self._get(kind, namespace, name)
            if query.get("watch") in ("1", "true"):
                return self._watch(kind, namespace, query)
            metadata: dict[str, Any] = {}
            with api.changed:
                items = [o for (ns, _), o in sorted(api.objects[kind].items())
                         if (namespace is None or ns == namespace) and _selected(o, query)]
                metadata["resourceVersion"] = str(api.version)
                if query.get("limit"):  # pages; the continue token is the offset of the next one
                    start, limit = int(query.get("continue") or 0), int(query["limit"])
                    if start + limit < len(items):
                        metadata["continue"] = str(start + limit)
                    items = items[start:start + limit]
                items = [copy.deepcopy(o) for o in items]  # only the page's
            for item in items:  # list items come without their type, as from the real API server
                item.pop("apiVersion")
                item.pop("kind")
            self._send(200, {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                             "metadata": metadata, "items": items})

        def _get(self, kind: Kind, namespace: str | None, name: str) -> None:
            obj = api.objects[kind].get((namespace or "", name))
            if obj is None:
                return self._send(404, _status(404, "NotFound", f'{kind.plural} "{name}" not found'))
            self._send(200, obj)

        def _watch(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> None:
            since = int(query.get("resourceVersion") or 0)
            ends = time.monotonic() + min(float(query.get("timeoutSeconds", 60)), 60)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while True:
                    with api.changed:
                        pending = [(v, t, o) for v, k, t, o in api.events
                                   if k == kind and v > since and (namespace is None or
                                                                   o["metadata"].get("namespace") == namespace)]
                        if not pending:
                            if api.stopping or time.monotonic() >= ends:
                                break
                            api.changed.wait(0.2)
                            continue
                    for version, event_type, obj in pending:
                        since = version
                        if _selected(obj, query):
                            line = json.dumps({"type": event_type, "object": obj}).encode() + b"\n"
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass
            self.close_connection = True

        def do_POST(self) -> None:
            if not self._authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            api.requests.append(f"POST {self.path}")
            if self.path != "/apis/authorization.k8s.io/v1/subjectaccessreviews":
                return self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
            spec = body.get("spec") or {}
            attributes = spec.get("resourceAttributes") or {}
            allowed = (spec.get("user"), attributes.get("verb"), attributes.get("resource"),
                       attributes.get("namespace")) in api.grants
            status = {"allowed": allowed, "reason": "granted by the test" if allowed else "no rule allows it"}
            if not allowed:
                status["denied"] = False
            self._send(201, {**body, "metadata": {"creationTimestamp": None}, "status": status})

    return Handler


SERVICES = [{"apiVersion": "v1", "kind": "Service"}]
NAMESPACES = [{"apiVersion": "v1", "kind": "Namespace"}]


def connected(run_server: Any, kube_api: KubeApi, tmp_path: Path, policies: dict[str, Any], **kwargs: Any) -> Any:
    """A kwserver (from the `run_server` fixture) connected to `kube_api` through a kubeconfig."""
    config = kube_api.kubeconfig(tmp_path / "kubeconfig")
    return run_server(policies, env={"KUBECONFIG": str(config), "KUBEWARDEN_WORKERS": "2", **kwargs.pop("env", {})},
                      **kwargs)
