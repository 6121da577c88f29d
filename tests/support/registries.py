"""Real registries and web servers for the source tests, on free loopback ports.

`start_registry` runs Debian's docker-registry (distribution 2.x) with a generated config.yml:
plain HTTP, TLS with a certificate from a CA made for the test, htpasswd basic auth (bcrypt hashes),
or token auth against `TokenServer`, a small issuer of JWTs the registry checks against the test's
own signing certificate. `FileServer` serves a directory over HTTP or HTTPS.
"""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import bcrypt
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.support.certs import CertPair, make_ca, make_cert
from tests.support.server import free_port, stop_process

DOCKER_REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


@dataclass
class Registry:
    process: subprocess.Popen
    port: int
    directory: Path
    tls: CertPair | None = None  # the CA that signed the registry's certificate
    users: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, path: str) -> str:
        return f"registry://{self.host}/{path}"

    def stop(self) -> None:
        stop_process(self.process, timeout=10)

    def log(self) -> str:
        return (self.directory / "registry.log").read_text()


def start_registry(directory: Path, *, tls: bool = False, users: dict[str, str] | None = None,
                   token: TokenServer | None = None) -> Registry:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(directory / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
    }
    ca = None
    if tls:
        ca = make_ca(directory, "registry-ca")
        server = make_cert(directory, "registry", ca)
        config["http"]["tls"] = {"certificate": str(server.cert), "key": str(server.key)}
    if users:
        htpasswd = directory / "htpasswd"
        htpasswd.write_text("".join(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}\n"
                                    for user, pw in users.items()))
        config["auth"] = {"htpasswd": {"realm": "kwserver-tests", "path": str(htpasswd)}}
    if token:
        config["auth"] = {"token": {"realm": token.realm, "service": token.service, "issuer": token.issuer,
                                    "rootcertbundle": str(token.certificate_path)}}
    (directory / "config.yml").write_text(yaml.safe_dump(config))
    with open(directory / "registry.log", "wb") as log:
        process = subprocess.Popen([DOCKER_REGISTRY, "serve", str(directory / "config.yml")],
                                   stdout=log, stderr=subprocess.STDOUT)
    registry = Registry(process, port, directory, ca, dict(users or {}))
    _wait_listening(registry)
    return registry


def _wait_listening(registry: Registry, timeout: float = 20.0) -> None:
    scheme = "https" if registry.tls else "http"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited:\n{registry.log()}")
        try:
            requests.get(f"{scheme}://{registry.host}/v2/", timeout=1,
                         verify=str(registry.tls.cert) if registry.tls else True)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    registry.stop()
    raise RuntimeError(f"docker-registry did not listen in {timeout}s:\n{registry.log()}")


def docker_config(directory: Path, credentials: dict[str, tuple[str, str]]) -> Path:
    """A directory holding Docker's config.json for `host -> (user, password)`."""
    directory.mkdir(parents=True, exist_ok=True)
    auths = {host: {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}
             for host, (user, pw) in credentials.items()}
    (directory / "config.json").write_text(json.dumps({"auths": auths}))
    return directory


# --- a token service for the registry's bearer-token flow --------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens (ES256 JWTs with an x5c header) to users with the right password."""

    service = "kwserver-test-registry"
    issuer = "kwserver-test-issuer"

    def __init__(self, directory: Path, users: dict[str, str]):
        self.users = users
        self.requests: list[dict[str, Any]] = []
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "token-signer")])
        now = time.time()
        import datetime

        self.certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(now - 60, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(now + 86400, datetime.UTC))
            .sign(self.key, hashes.SHA256())
        )
        self.certificate_path = directory / "token-signer.pem"
        directory.mkdir(parents=True, exist_ok=True)
        self.certificate_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                outer.requests.append({"query": query, "authorization": self.headers.get("Authorization")})
                user = outer._authenticate(self.headers.get("Authorization"))
                if user is False:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": outer.token(user or "", query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _authenticate(self, header: str | None) -> str | bool | None:
        """The user, None for anonymous, False for wrong credentials."""
        if not header:
            return None
        user, _, password = base64.b64decode(header.removeprefix("Basic ")).decode().partition(":")
        return user if self.users.get(user) == password else False

    def token(self, user: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            allowed = actions.split(",") if user else []  # anonymous users get nothing
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()]}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- a plain web server for https:// and http:// module URLs ------------------------------------------

class FileServer:
    def __init__(self, root: Path, certificate: CertPair | None = None):
        self.port = free_port()
        handler = lambda *a, **k: _QuietHandler(*a, directory=str(root), **k)  # noqa: E731
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.scheme = "http"
        if certificate:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificate.cert, certificate.key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}/{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def raw_push(registry: Registry, repository: str, tag: str, layers: list[tuple],
             config: tuple[str, bytes] = ("application/vnd.wasm.config.v1+json", b"{}"),
             manifest_type: str = "application/vnd.oci.image.manifest.v1+json") -> str:
    """Push an artifact as another OCI client would, any media types; returns the manifest digest."""
    import hashlib

    base = f"{'https' if registry.tls else 'http'}://{registry.host}/v2/{repository}"
    verify = str(registry.tls.cert) if registry.tls else True
    auth = next(iter(registry.users.items()), None)  # a registry with basic auth: push as its first user

    def blob(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = requests.post(f"{base}/blobs/uploads/", verify=verify, auth=auth, timeout=10)
        start.raise_for_status()
        location = requests.compat.urljoin(base, start.headers["Location"])
        sep = "&" if "?" in location else "?"
        requests.put(f"{location}{sep}digest={digest}", data=data, verify=verify, auth=auth,
                     timeout=10).raise_for_status()
        return {"digest": digest, "size": len(data)}

    manifest = {"schemaVersion": 2, "mediaType": manifest_type,
                "config": {"mediaType": config[0], **blob(config[1])},
                "layers": [{"mediaType": layer[0], **blob(layer[1]), **({"annotations": layer[2]} if len(layer) > 2
                                                                        else {})} for layer in layers]}
    body = json.dumps(manifest).encode()
    requests.put(f"{base}/manifests/{tag}", data=body, headers={"Content-Type": manifest_type}, verify=verify,
                 auth=auth, timeout=10).raise_for_status()
    return "sha256:" + hashlib.sha256(body).hexdigest()


def blob_path(registry: Registry, digest: str) -> Path:
    """Where docker-registry's filesystem driver keeps a blob (for tests that tamper with it)."""
    hex_digest = digest.removeprefix("sha256:")
    return registry.directory / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_digest[:2] / \
        hex_digest / "data"


LIBRARY_REPOSITORY = "kubewarden/policies"


def push_library(registry: Registry, dist: Path, sources: Path, cwd: Path) -> dict[str, str]:
    """`kwserver push` every module of the policy library; returns name -> registry:// reference."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBEWARDEN_", "KWSERVER_", "DOCKER_"))}
    references = {}
    for module in sorted(dist.glob("*.wasm")):
        reference = registry.ref(f"{LIBRARY_REPOSITORY}/{module.stem}:v1.0.0")
        subprocess.run([sys.executable, "-m", "kwserver", "push", str(module), reference, "--sources-path",
                        str(sources)], check=True, capture_output=True, cwd=cwd, env=env, timeout=60)
        references[module.stem] = reference
    return references


def cosign_sign(registry: Registry, repository: str, digest: str, keys: list[Any],
                annotations: dict[str, str] | None = None) -> None:
    """Store signatures of `digest` as cosign does: simple-signing layers under `sha256-<hex>.sig`."""
    layers = []
    for key in keys:
        payload = json.dumps({"critical": {"identity": {"docker-reference": f"{registry.host}/{repository}"},
                                           "image": {"docker-manifest-digest": digest},
                                           "type": "cosign container image signature"},
                              "optional": annotations}).encode()
        signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
        layers.append(("application/vnd.dev.cosign.simplesigning.v1+json", payload,
                       {"dev.cosignproject.cosign/signature": signature}))
    raw_push(registry, repository, digest.replace(":", "-") + ".sig", layers,
             config=("application/vnd.oci.image.config.v1+json", b'{"architecture":"","os":""}'))


def public_pem(key: Any) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class ForwardProxy:
    """A forward proxy that records what it forwards: absolute-URI requests, and CONNECT tunnels when
    `tunnel` (else CONNECT is refused)."""

    def __init__(self, tunnel: bool = False) -> None:
        import http.client

        self.port = free_port()
        self.tunnel = tunnel
        self.forwarded: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                target = urlparse(self.path)
                outer.forwarded.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "host")}
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                path = target.path + (f"?{target.query}" if target.query else "")
                connection.request(self.command, path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_HEAD = do_POST = do_PUT = _forward

            def do_CONNECT(self) -> None:
                outer.forwarded.append(f"CONNECT {self.path}")
                if not outer.tunnel:
                    self.send_error(405, "this test proxy does not tunnel")
                    return
                host, _, port = self.path.rpartition(":")
                try:
                    upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
                except (OSError, ValueError):
                    self.send_error(502, "cannot reach the target")
                    return
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True
                with upstream:
                    _relay(self.connection, upstream)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _relay(client: socket.socket, upstream: socket.socket, idle_seconds: float = 30.0) -> None:
    """Bytes both ways until either side closes (or nothing moves for `idle_seconds`)."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        while events := selector.select(idle_seconds):
            for key, _ in events:
                try:
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
                except OSError:
                    return


def sources_file(directory: Path, doc: dict) -> Path:
    """`doc` written as `directory`/sources.yml."""
    path = directory / "sources.yml"
    path.write_text(yaml.safe_dump(doc))
    return path
