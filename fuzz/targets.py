"""Fuzz targets: what a client, a file or a module can hand kwserver, and what must hold whatever it is.

Each target takes bytes and returns None when the invariants held; it raises (AssertionError, or an
exception nobody expected) when they did not. The same targets run under atheris (coverage-guided,
`python -m fuzz TARGET`) and under hypothesis in the suite (tests/test_fuzz.py).

Invariants: a clear client error (4xx) or a configuration / metadata error with a message, never a
500 from kwserver's own code, never an exception escaping to the worker, never an answer for another
request's uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

# A template the structured targets mutate: the shapes that reach deep code are built from it.
REVIEW: dict[str, Any] = {
    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
    "request": {
        "uid": "1299d386-525b-4032-98ae-1949f69f9cfc",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": "nginx", "namespace": "default", "operation": "CREATE",
        "userInfo": {"username": "alice", "uid": "u-1", "groups": ["system:authenticated"],
                     "extra": {"scopes": ["a"]}},
        "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nginx", "annotations": {"a": "b"}},
                   "spec": {"containers": [{"name": "c", "image": "nginx",
                                            "securityContext": {"privileged": True}}]}},
        "oldObject": None, "dryRun": False, "options": {"kind": "CreateOptions"},
    },
}
POLICIES_YML = {
    "p": {"module": "registry://ghcr.io/kubewarden/policies/pod-privileged:v0.2.7", "policyMode": "monitor",
          "allowedToMutate": False, "settings": {"a": [1, 2]}, "timeoutEvalSeconds": 2,
          "contextAwareResources": [{"apiVersion": "v1", "kind": "Pod"}], "message": "m"},
    "g": {"expression": "a() && !b() || a()", "message": "group",
          "policies": {"a": {"module": "file:///a.wasm"}, "b": {"module": "https://example.com/b.wasm",
                                                             "settings": {}}}},
}
SOURCES_YML = {"insecure_sources": ["localhost:5000"], "source_authorities": {
    "registry.example.com": [{"type": "Data", "data": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"}]}}
VERIFICATION_YML = {"apiVersion": "v1", "allOf": [{"kind": "pubKey", "owner": "o", "key": "-----BEGIN PUBLIC KEY-----",
                                                   "annotations": {"env": "prod"}}],
                    "anyOf": {"minimumMatches": 1, "signatures": [{"kind": "githubAction", "owner": "o"}]}}
METADATA = {"protocolVersion": "v1", "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                                                "operations": ["CREATE"]}],
            "mutating": False, "contextAwareResources": [], "executionMode": "kubewarden-wapc",
            "backgroundAudit": True, "annotations": {"io.kubewarden.policy.title": "t"},
            "minimumKubewardenVersion": "1.10.0", "policyType": "kubernetes"}


class Choices:
    """Decisions read from the fuzzer's bytes (as atheris's FuzzedDataProvider, without needing atheris)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def below(self, n: int) -> int:
        return (self.byte() << 8 | self.byte()) % n if n > 1 else 0

    def text(self) -> str:
        length = self.byte() % 24
        chunk = self.data[self.pos:self.pos + length]
        self.pos += length
        return chunk.decode("utf-8", "replace")

    def rest(self) -> bytes:
        rest, self.pos = self.data[self.pos:], len(self.data)
        return rest

    def value(self, depth: int = 0) -> Any:
        kind = self.below(9 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.byte() & 1)
        if kind == 2:
            return self.below(1 << 16) - (1 << 15) if self.byte() & 1 else (self.byte() - 128) * 1e300
        if kind in (3, 4, 5):
            return self.text()
        if kind in (6, 7):
            return [self.value(depth + 1) for _ in range(self.below(4))]
        return {self.text(): self.value(depth + 1) for _ in range(self.below(4))}


def mutated(template: Any, choices: Choices, mutations: int | None = None) -> Any:
    """`template` with a few members replaced by, or added as, arbitrary JSON values (chosen by the bytes)."""
    doc = json.loads(json.dumps(template))
    for _ in range(mutations if mutations is not None else 1 + choices.below(4)):
        target, key = None, None
        node = doc
        while isinstance(node, (dict, list)) and node and choices.byte() % 3:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            target, key = node, keys[choices.below(len(keys))]
            node = node[key]
        replacement = choices.value()
        if target is None:
            if isinstance(doc, dict) and choices.byte() & 1:
                doc[choices.text()] = replacement
            else:
                doc = replacement
        elif choices.byte() % 5 == 0 and isinstance(target, dict):
            del target[key]
        else:
            target[key] = replacement
    return doc


# --- the HTTP API: admission bodies through falcon, the service and the metrics ------------------------

class _Registry:
    """The registry's surface the service reads: one policy `p`, protect mode, no init errors."""

    init_errors: dict[str, str] = {}
    specs: dict[str, Any] = {}

    def policy_mode(self, policy_id: str) -> str:
        from kwserver.evaluation import UnknownPolicy

        if policy_id != "p":
            raise UnknownPolicy(policy_id)
        return "protect"


class _Evaluator:
    """Accepts everything, with the request's own uid (what a policy does through the real evaluator)."""

    def evaluate(self, policy_id: str, request: Any) -> dict[str, Any]:
        from kwserver import admission

        return admission.admission_response(request.uid, True)


_app: Any = None


def _api() -> tuple[Any, Any]:
    global _app
    if _app is None:
        from kwserver.observability.metrics import WorkerMetrics
        from kwserver.server.api import create_app
        from kwserver.server.service import AdmissionService

        metrics = WorkerMetrics(series_limit=64)
        _app = create_app(AdmissionService(_Registry(), _Evaluator(), observe=metrics.observe,
                                           always_accept_namespace="always")), metrics
    return _app


def _expected_uid(body: bytes, raw: bool) -> str | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    request = doc.get("request") if isinstance(doc, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    return uid if isinstance(uid, str) else ("" if raw else None)


def admission_api(data: bytes) -> None:
    """Any body on /validate, /audit and /validate_raw: 200 with the request's uid, or a 4xx; never 500."""
    import falcon.testing

    choices = Choices(data)
    body = orjson.dumps(mutated(REVIEW, choices)) if choices.byte() & 1 else choices.rest()
    app, metrics = _api()
    for route, raw in (("/validate/p", False), ("/audit/p", False), ("/validate_raw/p", True)):
        result = falcon.testing.simulate_post(app, route, body=body, headers={"Content-Type": "application/json"})
        assert result.status_code in (200, 400, 413, 415, 422), (route, result.status, result.text[:300])
        if result.status_code == 200:
            answer = result.json["response"]
            assert answer["uid"] == _expected_uid(body, raw), (route, answer["uid"], body[:200])
    # Counted (without a TypeError), with string labels only.
    assert all(isinstance(v, str) for labels in metrics._pending.evaluations for v in labels)


# --- the HTTP worker: request bytes, split anywhere --------------------------------------------------

class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed or not data, "written after close"
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 3000)}.get(name, default)


_server: Any = None


def _echo_app(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["PATH_INFO"].encode("utf-8", "surrogateescape"), b" ", body[:64]]


def http_request(data: bytes) -> None:
    """Bytes from a client, in chunks of any size: answers are HTTP responses, one per request at most."""
    global _server
    from kwserver.server.worker import Connection, ConnectionLimits, HttpServer

    if _server is None:  # one per worker, as in the server (it keeps a descriptor in reserve)
        limits = ConnectionLimits(header_timeout=10, body_timeout=10, idle_timeout=10, handshake_timeout=10,
                                  max_connections=10, max_body_bytes=4096, max_header_bytes=2048)
        _server = HttpServer(asyncio.new_event_loop(), _echo_app, limits, None, lambda: None)
        _server.accepting = True
    server = _server
    connection = Connection(server)
    transport = _Transport()
    server.pending_connections = 1
    connection.connection_made(transport)
    choices = Choices(data)
    stream = choices.rest()
    sizes = stream[:8] or b"\x40"
    position, step = 0, 0
    while position < len(stream) and not transport.closed:
        size = 1 + sizes[step % len(sizes)] % 97
        connection.data_received(stream[position:position + size])
        position, step = position + size, step + 1
        if not transport.reading:  # back-pressure: the answers are "sent", reading goes on
            connection.resume_writing()
    connection.connection_lost(None)
    for chunk in transport.written:
        assert chunk.startswith((b"HTTP/1.1 ", b"HTTP/1.1 100 Continue")), chunk[:100]
    assert server.open_connections == 0 and not server.idle_connections
    for handle in list(getattr(server.loop, "_scheduled", ())):
        handle.cancel()


# --- files and modules --------------------------------------------------------------------------------

_scratch = Path(tempfile.mkdtemp(prefix="kwserver-fuzz-"))


def _yaml_text(data: bytes, template: Any) -> str:
    import yaml

    choices = Choices(data)
    if choices.byte() & 1:
        return yaml.safe_dump(mutated(template, choices))
    return choices.rest().decode("utf-8", "replace")


def policies_yml(data: bytes) -> None:
    """Any policies.yml: policies, or a ConfigError with a message."""
    from kwserver.config import ConfigError, load_policies

    path = _scratch / "policies.yml"
    path.write_text(_yaml_text(data, POLICIES_YML), encoding="utf-8")
    with contextlib.suppress(ConfigError):
        entries = load_policies(path, tolerate_invalid_expressions=bool(data[:1]) and data[0] & 1)
        assert entries


def sources_yml(data: bytes) -> None:
    """Any sources.yml: sources, or a ConfigError (what `load_sources` reads, its CA bundles in scratch)."""
    import yaml

    from kwserver.config import ConfigError
    from kwserver.sources.trust import parse_sources

    bundles = _scratch / "bundles"
    bundles.mkdir(exist_ok=True)
    with contextlib.suppress(ConfigError, yaml.YAMLError):
        parse_sources(yaml.safe_load(_yaml_text(data, SOURCES_YML)), _scratch, bundles)


def verification_yml(data: bytes) -> None:
    """Any verification.yml: a configuration, or a ConfigError."""
    from kwserver.config import ConfigError
    from kwserver.sources.verification import load_verification

    path = _scratch / "verification.yml"
    path.write_text(_yaml_text(data, VERIFICATION_YML), encoding="utf-8")
    with contextlib.suppress(ConfigError):
        load_verification(str(path))


_WASM_HEADER = b"\x00asm\x01\x00\x00\x00"


def module_metadata(data: bytes) -> None:
    """Any module bytes, or any metadata in a module: metadata, or a MetadataError / WasmFormatError."""
    from kwserver.evaluation.modes import read_metadata
    from kwserver.metadata import MetadataError, WasmFormatError, embed_custom_section

    choices = Choices(data)
    kind = choices.byte() % 3
    if kind == 0:
        wasm = choices.rest()
    elif kind == 1:
        wasm = embed_custom_section(_WASM_HEADER, orjson.dumps(mutated(METADATA, choices)))
    else:
        wasm = _WASM_HEADER + choices.rest()
    with contextlib.suppress(MetadataError, WasmFormatError):
        read_metadata(wasm)


# The kwserver modules the targets exercise (imported under atheris's instrumentation by fuzz/__main__.py).
MODULES = ("kwserver.admission", "kwserver.server.api", "kwserver.server.service", "kwserver.server.worker",
           "kwserver.observability.metrics", "kwserver.config", "kwserver.expressions", "kwserver.sources.trust",
           "kwserver.sources.verification", "kwserver.metadata", "kwserver.evaluation.modes", "kwserver.truncation")

TARGETS: dict[str, Callable[[bytes], None]] = {
    "admission_api": admission_api,
    "http_request": http_request,
    "policies_yml": policies_yml,
    "sources_yml": sources_yml,
    "verification_yml": verification_yml,
    "module_metadata": module_metadata,
}


def seeds(name: str) -> list[bytes]:
    """Starting inputs: the templates as they are (structured form) and as text."""
    import yaml

    templates = {"admission_api": REVIEW, "policies_yml": POLICIES_YML, "sources_yml": SOURCES_YML,
                 "verification_yml": VERIFICATION_YML, "module_metadata": METADATA}
    if name == "http_request":
        body = orjson.dumps(REVIEW)
        return [b"\x10POST /validate/p HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body + b"GET /x HTTP/1.0\r\n\r\n"]
    template = templates[name]
    text = json.dumps(template).encode() if name in ("admission_api", "module_metadata") else \
        yaml.safe_dump(template).encode()
    return [b"\x00" + text, b"\x01\x00\x00\x00"]


def environment() -> None:
    """Quiet logs (a target that logs per input would drown the fuzzer's output)."""
    import logging

    logging.disable(logging.CRITICAL)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_scratch))
