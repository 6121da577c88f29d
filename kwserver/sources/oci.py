"""OCI registries: pull and push policies in the artifact format Kubewarden publishes.

An OCI image manifest whose config blob is `{}` of type `application/vnd.wasm.config.v1+json` and
whose single layer is the module, of type `application/vnd.wasm.content.layer.v1+wasm` (what
kwctl and policy-fetcher write). The client speaks the distribution API over `transport`
(sources.yml, timeouts, retries, size limits) and answers both authentication challenges: Basic
(htpasswd registries) and Bearer (a token from the realm the registry names, fetched with the
config.json credentials or anonymously).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import requests

from kwserver.sources.credentials import Credential, Credentials
from kwserver.sources.errors import SourceError
from kwserver.sources.options import FetchOptions
from kwserver.sources.references import ImageReference
from kwserver.sources.transport import (
    Attempt,
    make_session,
    read_limited,
    request,
    with_fallback,
)
from kwserver.sources.trust import Sources

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
WASM_CONFIG = "application/vnd.wasm.config.v1+json"
WASM_LAYER = "application/vnd.wasm.content.layer.v1+wasm"
ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
EMPTY_CONFIG = b"{}"
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    body: bytes
    digest: str
    document: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        layers = self.document.get("layers")
        return layers if isinstance(layers, list) else []


def build_manifest(wasm: bytes, annotations: Mapping[str, str] | None = None) -> bytes:
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": WASM_CONFIG, "digest": sha256_digest(EMPTY_CONFIG), "size": len(EMPTY_CONFIG)},
        "layers": [{"mediaType": WASM_LAYER, "digest": sha256_digest(wasm), "size": len(wasm)}],
    }
    if annotations:
        document["annotations"] = dict(annotations)
    return json.dumps(document, separators=(",", ":")).encode()


def wasm_layer(manifest: Manifest, reference: ImageReference) -> dict[str, Any]:
    """The one layer of a Kubewarden policy artifact, or a clear refusal."""
    media_type = manifest.document.get("mediaType")
    if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in manifest.document:
        raise SourceError(f"{reference} is an image index, not a policy artifact (an OCI image manifest)")
    layers = manifest.layers
    wasm = [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == WASM_LAYER]
    if len(wasm) != 1 or len(layers) != 1:
        found = [layer.get("mediaType") if isinstance(layer, dict) else layer for layer in layers]
        raise SourceError(f"{reference} is not a Kubewarden policy: its manifest must have one layer of media "
                          f"type {WASM_LAYER}, it has {found}")
    layer = wasm[0]
    if not isinstance(layer.get("digest"), str) or not isinstance(layer.get("size"), int):
        raise SourceError(f"{reference}: the manifest's layer has no valid digest and size")
    return layer


class OciClient:
    """One registry host. Thread-safe enough for one fetch per thread: tokens are cached per scope."""

    def __init__(self, registry: str, sources: Sources, credentials: Credentials, options: FetchOptions):
        self.registry = registry
        self.sources = sources
        self.credential: Credential | None = credentials.for_registry(registry)
        self.credentials_path = credentials.path
        self.options = options
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    # --- the API ---------------------------------------------------------------------------------
    def pull(self, reference: ImageReference) -> bytes:
        """The module bytes, checked against the manifest's layer digest and size."""
        return self.run(lambda session, attempt: self._pull(session, attempt, reference))

    def manifest(self, reference: ImageReference) -> Manifest:
        return self.run(lambda session, attempt: self._manifest(session, attempt, reference))

    def manifest_or_none(self, reference: ImageReference) -> Manifest | None:
        """The manifest, or None when the registry does not know the tag (e.g. no signatures)."""
        def get(session: requests.Session, attempt: Attempt) -> Manifest | None:
            try:
                return self._manifest(session, attempt, reference)
            except _NotFound:
                return None
        return self.run(get)

    def blob(self, reference: ImageReference, digest: str, size: int | None = None) -> bytes:
        return self.run(lambda session, attempt: self._blob(session, attempt, reference, digest, size))

    def push(self, wasm: bytes, reference: ImageReference, annotations: Mapping[str, str] | None = None) -> str:
        """Upload the artifact; returns the manifest digest."""
        return self.run(lambda session, attempt: self._push(session, attempt, wasm, reference, annotations))

    def run(self, operation: Any) -> Any:
        def attempt_with_session(attempt: Attempt) -> Any:
            with make_session(self.options, self.sources.proxies) as session:
                return operation(session, attempt)
        return with_fallback(self.registry, self.sources, attempt_with_session)

    # --- operations ------------------------------------------------------------------------------
    def _pull(self, session: requests.Session, attempt: Attempt, reference: ImageReference) -> bytes:
        manifest = self._manifest(session, attempt, reference)
        layer = wasm_layer(manifest, reference)
        return self._blob(session, attempt, reference, layer["digest"], layer["size"])

    def _manifest(self, session: requests.Session, attempt: Attempt, reference: ImageReference) -> Manifest:
        path = f"/v2/{reference.repository}/manifests/{reference.reference}"
        response = self._send(session, attempt, "GET", path, reference, headers={"Accept": ACCEPT})
        if response.status_code == 404:
            response.close()
            raise _NotFound(f"{reference}: manifest unknown to {self.registry} (no such repository or tag)")
        self._expect(response, 200, f"GET manifest of {reference}")
        body = read_limited(response, self.options, f"the manifest of {reference}")
        digest = sha256_digest(body)
        if reference.digest and digest != reference.digest:
            raise SourceError(f"{reference}: the registry sent a manifest whose digest is {digest}")
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise SourceError(f"{reference}: the manifest is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise SourceError(f"{reference}: the manifest is not a JSON object")
        return Manifest(body, digest, document)

    def _blob(self, session: requests.Session, attempt: Attempt, reference: ImageReference, digest: str,
              size: int | None) -> bytes:
        if size is not None and size > self.options.max_bytes:
            raise SourceError(f"{reference}: the layer is {size} bytes, more than the limit of "
                              f"{self.options.max_bytes} bytes")
        if not digest.startswith("sha256:"):
            raise SourceError(f"{reference}: the layer digest {digest} does not use sha256")
        response = self._send(session, attempt, "GET", f"/v2/{reference.repository}/blobs/{digest}", reference)
        if response.status_code == 404:
            response.close()
            raise SourceError(f"{reference}: blob {digest} unknown to {self.registry}")
        self._expect(response, 200, f"GET blob {digest} of {reference}")
        data = read_limited(response, self.options, f"the layer of {reference}")
        actual = sha256_digest(data)
        if actual != digest:
            raise SourceError(f"{reference}: the layer's digest does not match the manifest: "
                              f"expected {digest}, got {actual}")
        if size is not None and len(data) != size:
            raise SourceError(f"{reference}: the layer is {len(data)} bytes, the manifest says {size}")
        return data

    def _push(self, session: requests.Session, attempt: Attempt, wasm: bytes, reference: ImageReference,
              annotations: Mapping[str, str] | None) -> str:
        for blob in (EMPTY_CONFIG, wasm):
            self._upload_blob(session, attempt, reference, blob)
        manifest = build_manifest(wasm, annotations)
        path = f"/v2/{reference.repository}/manifests/{reference.reference}"
        response = self._send(session, attempt, "PUT", path, reference, push=True, data=manifest,
                              headers={"Content-Type": OCI_MANIFEST})
        self._expect(response, 201, f"PUT manifest of {reference}")
        response.close()
        return sha256_digest(manifest)

    def _upload_blob(self, session: requests.Session, attempt: Attempt, reference: ImageReference,
                     blob: bytes) -> None:
        digest = sha256_digest(blob)
        blob_path = f"/v2/{reference.repository}/blobs/{digest}"
        head = self._send(session, attempt, "HEAD", blob_path, reference, push=True)
        head.close()
        if head.status_code == 200:
            return
        start = self._send(session, attempt, "POST", f"/v2/{reference.repository}/blobs/uploads/", reference,
                           push=True)
        self._expect(start, 202, f"start a blob upload to {reference}")
        start.close()
        location = urljoin(self._url(attempt, blob_path), start.headers.get("Location", ""))
        separator = "&" if "?" in location else "?"
        done = self._send(session, attempt, "PUT", f"{location}{separator}digest={digest}", reference, push=True,
                          data=blob, headers={"Content-Type": "application/octet-stream"})
        self._expect(done, 201, f"upload blob {digest} to {reference}")
        done.close()

    # --- HTTP and authentication -----------------------------------------------------------------
    def _url(self, attempt: Attempt, path: str) -> str:
        return path if "://" in path else f"{attempt.scheme}://{self.registry}{path}"

    def _send(self, session: requests.Session, attempt: Attempt, method: str, path: str,
              reference: ImageReference, *, push: bool = False, headers: dict[str, str] | None = None,
              data: bytes | None = None) -> requests.Response:
        url = self._url(attempt, path)
        scope = f"repository:{reference.repository}:{'pull,push' if push else 'pull'}"
        headers = dict(headers or {})
        authorization = self._authorization(scope)
        if authorization:
            headers["Authorization"] = authorization
        response = request(session, method, url, attempt, self.options, headers=headers, data=data)
        if response.status_code != 401:
            return response
        challenge = response.headers.get("WWW-Authenticate", "")
        response.close()
        headers["Authorization"] = self._answer(session, attempt, challenge, scope)
        response = request(session, method, url, attempt, self.options, headers=headers, data=data)
        if response.status_code == 401:
            response.close()
            raise SourceError(self._denied())
        return response

    def _authorization(self, scope: str) -> str | None:
        with self._lock:
            token = self._tokens.get(scope)
        if token:
            return f"Bearer {token}"
        return None

    def _denied(self) -> str:
        if self.credential is None:
            return (f"{self.registry} requires authentication and there are no credentials for it in the docker "
                    f"config ({self.credentials_path or 'none found'})")
        return f"{self.registry} refused the credentials of user `{self.credential.username}` " \
               f"(from {self.credentials_path})"

    def _answer(self, session: requests.Session, attempt: Attempt, challenge: str, scope: str) -> str:
        kind, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        if kind.lower() == "basic":
            if self.credential is None:
                raise SourceError(self._denied())
            return "Basic " + _basic(self.credential)
        if kind.lower() != "bearer" or "realm" not in params:
            raise SourceError(f"{self.registry} asks for unsupported authentication: {challenge or '(none)'}")
        query = {"service": params["service"]} if "service" in params else {}
        query["scope"] = params.get("scope", scope)
        headers = {"Authorization": "Basic " + _basic(self.credential)} if self.credential else {}
        realm = params["realm"]
        token_attempt = Attempt("https", self.sources.verify_for(_host_of(realm))) \
            if realm.startswith("https://") else attempt
        response = request(session, "GET", realm, token_attempt, self.options, params=query, headers=headers)
        if response.status_code in (401, 403):
            response.close()
            raise SourceError(self._denied())
        self._expect(response, 200, f"get a token from {realm}")
        try:
            answer = json.loads(read_limited(response, self.options, "the token answer"))
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"the token service {realm} answered without a token")
        with self._lock:
            self._tokens[scope] = token
        return f"Bearer {token}"

    def _expect(self, response: requests.Response, status: int, what: str) -> None:
        # Registries differ on 200/201/202 for writes; any success is one.
        if response.status_code == status or (status != 200 and 200 <= response.status_code < 300):
            return
        detail = _registry_errors(response)
        response.close()
        raise SourceError(f"{what}: HTTP {response.status_code} {response.reason}{detail}")


class _NotFound(SourceError):
    pass


def _basic(credential: Credential) -> str:
    return base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()


def _host_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def _registry_errors(response: requests.Response) -> str:
    """The registry's own error text (distribution `errors` list), when it sent one."""
    try:
        errors = json.loads(response.content[:65536]).get("errors") or []
        texts = [f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError, requests.RequestException):
        return ""
    return f" ({'; '.join(texts)})" if texts else ""
