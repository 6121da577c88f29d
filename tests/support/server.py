"""A real kwserver (gunicorn) on free loopback ports, waiting for things, and the `kwserver` command."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml

T = TypeVar("T")


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return range(0)
    return range(low, high + 1)


# Below the kernel's ephemeral range when it leaves room (Linux: 32768-60999): a port from that range,
# free when asked, can become the source port of some test's outgoing connection before the server
# binds it (a CI run failed so: "Address already in use" on a port free_port had just returned).
_EPHEMERAL = _ephemeral_ports()
_LISTEN_PORTS = range(10_000, _EPHEMERAL.start) if _EPHEMERAL.start > 11_000 else range(0)


_handed_out: set[int] = set()  # a test often asks for several ports before it starts anything


def free_port() -> int:
    """A loopback port nothing listens on now, for a server the test starts."""
    for _ in range(100):
        port = random.choice(_LISTEN_PORTS) if _LISTEN_PORTS else 0
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = sock.getsockname()[1]
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port")


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.2) -> T:
    """The first true value of `condition()`, asked every `interval` seconds; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


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


def response_of(reply: requests.Response) -> dict[str, Any]:
    """The AdmissionResponse of a 200 answer."""
    assert reply.status_code == 200, reply.text[:1000]
    return reply.json()["response"]


# --- the server's metrics -------------------------------------------------------------------------

def metrics_text(server: Server) -> str:
    return requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text


def published_metrics(server: Server, served: int) -> str:
    """The metrics once the workers have published the counts of `served` requests (about once a second)."""
    return wait_for(lambda: (text := metrics_text(server)) and sample(text, "kwserver_worker_requests_total") == served
                    and text, timeout=10)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") and not labels:
            total += float(line.rsplit(" ", 1)[1])
        if not line.startswith(name + "{"):
            continue
        label_text = line[len(name) + 1:line.rindex("}")]
        found = dict(part.split("=", 1) for part in label_text.split('",') if "=" in part)
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- the command line -----------------------------------------------------------------------------

def kwserver(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`kwserver ARGS` in `cwd` (also its HOME), without the caller's KUBEWARDEN_, KWSERVER_ and DOCKER_ variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KUBEWARDEN_", "KWSERVER_", "DOCKER_"))}
    return subprocess.run([sys.executable, "-m", "kwserver", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env={**base, "HOME": str(cwd), **(env or {})})


def check_config(directory: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """`kwserver check` of a policies.yml with one policy `p` on `module`."""
    config = directory / "policies.yml"
    config.write_text(yaml.safe_dump({"p": {"module": module}}))
    return kwserver("check", "--policies", str(config), *args, cwd=directory,
                    env={"KWSERVER_COMPILE_CACHE_DIR": str(directory / "cache")})


class Load:
    """Threads posting `body` to `path` of a server, each request on a new connection, until the `with`
    block ends; `failures` holds every reply `accept` refused and every error, `count` the requests."""

    def __init__(self, server: Server, path: str, body: Any, *, threads: int = 4,
                 accept: Callable[[requests.Response], bool] = lambda reply: reply.status_code == 200):
        self.server, self.path, self.body, self.accept = server, path, body, accept
        self.failures: list[Any] = []
        self.sent: list[None] = []  # one item per request (appending is atomic)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                reply = requests.post(self.server.url + self.path, json=self.body, timeout=30)
                if not self.accept(reply):
                    self.failures.append((reply.status_code, reply.text[:300]))
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self.sent.append(None)

    @property
    def count(self) -> int:
        return len(self.sent)
