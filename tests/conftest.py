"""Shared fixtures: paths to conformance data and a real kwserver (gunicorn) on loopback ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CONFORMANCE = SHARED / "conformance"
FIXTURES = CONFORMANCE / "fixtures"
SERVER_FIXTURES = FIXTURES / "kubewarden-policy-server"
TEST_POLICIES = REPO / "tests" / "policies"


def policy_path(name: str) -> str:
    return str(TEST_POLICIES / f"{name}.wasm")


def load_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def as_review(request: dict[str, Any]) -> dict[str, Any]:
    """Wrap a bare AdmissionRequest fixture in an AdmissionReview envelope."""
    if "request" in request:
        return request
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """A wasmtime engine with epoch interruption and its ticker running, for in-process runtime tests."""
    from kwserver.runtime.engine import EngineOptions, EpochTicker, make_engine

    engine = make_engine(EngineOptions(epoch_interruption=True))
    ticker = EpochTicker(engine)
    ticker.start()
    yield engine
    ticker.stop()


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for the whole run: servers after the first start warm."""
    path = tmp_path_factory.mktemp("compile-cache")
    path.chmod(0o700)
    return path


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    readiness_port: int
    metrics_port: int
    scheme: str = "http"
    log_path: Path | None = None
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def post(self, path: str, body: Any = None, *, data: bytes | None = None,
             headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        if data is None:
            data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        return self.session.post(self.url + path, data=data, headers=headers, timeout=30, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""


def start_server(tmp_path: Path, policies: dict[str, Any], compile_cache: Path, *, args: list[str] = (),
                 env: dict[str, str] | None = None, scheme: str = "http", command: list[str] | None = None,
                 wait: bool = True) -> Server:
    config = tmp_path / "policies.yml"
    config.write_text(yaml.safe_dump(policies))
    port, readiness, metrics_port = free_port(), free_port(), free_port()
    log_path = tmp_path / f"server-{port}.log"
    full_env = {
        **os.environ,
        "KWSERVER_COMPILE_CACHE_DIR": str(compile_cache),
        "KUBEWARDEN_BIND_ADDRESS": "127.0.0.1",
        "KUBEWARDEN_PORT": str(port),
        "KUBEWARDEN_READINESS_PROBE_PORT": str(readiness),
        "KWSERVER_METRICS_PORT": str(metrics_port),
        "KUBEWARDEN_POLICIES": str(config),
        "KUBEWARDEN_WORKERS": "2",
        **(env or {}),
    }
    command = command or [sys.executable, "-m", "kwserver", "serve", *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    server = Server(process, port, readiness, metrics_port, scheme, log_path)
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = 60.0) -> None:
    wait_ready_on(server.readiness_port, server.process, server.log, timeout)


def wait_ready_on(readiness_port: int, process: subprocess.Popen, log: Any, timeout: float = 60.0) -> None:
    """Until `/readiness` on the port answers 200; the server's log (`log()`) in the error otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kwserver exited with {process.returncode}:\n{log()}")
        try:
            if requests.get(f"http://127.0.0.1:{readiness_port}/readiness", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"kwserver not ready after {timeout}s:\n{log()}")


def stop_process(process: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_server(server: Server) -> None:
    server.session.close()
    stop_process(server.process)


@pytest.fixture
def run_server(tmp_path: Path, compile_cache: Path) -> Iterator[Any]:
    """Start kwservers for one test; all are stopped at its end."""
    servers: list[Server] = []

    def run(policies: dict[str, Any], **kwargs: Any) -> Server:
        index = len(servers)
        directory = tmp_path / f"server{index}"
        directory.mkdir()
        server = start_server(directory, policies, compile_cache, **kwargs)
        servers.append(server)
        return server

    yield run
    for server in servers:
        stop_server(server)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str) -> CertPair:
    """A throwaway certificate authority (EC P-256, valid for a day)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}", cwd=directory)
    return CertPair(cert, key)


def make_cert(directory: Path, name: str, ca: CertPair, san: str = "DNS:localhost,IP:127.0.0.1") -> CertPair:
    """A certificate signed by `ca`, usable as a server (with `san`) or client certificate."""
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
             "-out", str(cert), "-days", "1", "-extfile", str(ext), cwd=directory)
    return CertPair(cert, key)
