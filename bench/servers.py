"""Servers under test, each a real gunicorn master on free 127.0.0.1 ports:

- `kwserver`: `python -m kwserver serve` (readiness on its own port, like tests/support/server.py);
- `canned`: bench/canned.py, the HTTP ceiling, on one of three HTTP stacks (`STACKS`);
- `naive`: bench/naive.py, the naive baseline design.

The baselines run under the same gunicorn settings as kwserver (worker class, keep-alive, TLS),
taken from kwserver so they cannot drift apart, unless a stack is chosen to compare HTTP stacks.
They run with bench/gunicorn_bench.py (no control socket: several masters must not fight over the
default path).
"""

from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from kwserver.config import ServerSettings
from kwserver.server.worker import EventLoopWorker
from tests.support.server import free_port

REPO = Path(__file__).resolve().parent.parent
GUNICORN_OVERRIDES = Path(__file__).resolve().parent / "gunicorn_bench.py"


# HTTP stacks a canned app can be served by: (gunicorn worker class, extra gunicorn arguments, app suffix).
STACKS: dict[str, tuple[str, list[str], str]] = {
    # kwserver's worker (kwserver/server/worker.py): uvloop + httptools in front of the WSGI app, with
    # the settings' default limits.
    "event-loop": (f"{EventLoopWorker.__module__}.{EventLoopWorker.__qualname__}", [], ":app"),
    # kwserver's stack before the event-loop worker: gunicorn's threaded worker with one thread.
    "gthread": ("gthread", ["--threads", "1"], ":app"),
    # The candidate measured beside it: falcon's ASGI app on uvicorn's gunicorn worker (httptools + uvloop).
    "uvicorn": ("uvicorn_worker.UvicornWorker", [], ":asgi_app"),
}


class ServerFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Tls:
    cert_file: Path
    key_file: Path


def make_tls(directory: Path) -> Tls:
    """A throwaway self-signed certificate for 127.0.0.1, made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    if cert.exists() and key.exists():
        return Tls(cert, key)
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    except FileNotFoundError as exc:
        raise ServerFailed("the openssl CLI is needed for TLS runs: apt-get install -y openssl") from exc
    except subprocess.CalledProcessError as exc:
        raise ServerFailed(f"openssl failed: {exc.stderr.decode(errors='replace')}") from exc
    key.chmod(0o600)
    return Tls(cert, key)


@dataclass
class Server:
    name: str
    kind: str  # kwserver, canned, naive
    process: subprocess.Popen
    port: int
    workers: int
    log_path: Path
    tls: bool = False
    readiness_port: int | None = None
    started_at: float = 0.0  # time.monotonic() at spawn
    ready_after_s: float = float("nan")  # spawn to ready (readiness 200 / all workers loaded)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.Error:
            return []

    def post(self, path: str, body: bytes, timeout: float = 30) -> tuple[int, bytes]:
        """One POST (a fresh connection), for preflight checks."""
        if self.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)


def _http_ok(port: int, path: str = "/readiness", timeout: float = 1.0) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _wait_workers(server: Server, deadline: float, ready_dir: Path | None) -> None:
    """Wait until the master has all its workers (and, with a ready dir, each worker loaded its app)."""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerFailed(f"{server.name} exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        pids = server.worker_pids()
        if len(pids) >= server.workers:
            if ready_dir is None:
                return
            loaded = {p.name for p in ready_dir.iterdir()} if ready_dir.exists() else set()
            if all(str(pid) in loaded for pid in pids):
                return
        time.sleep(0.02)
    raise ServerFailed(f"{server.name}: workers not up before the deadline:\n{server.log()[-4000:]}")


def _spawn(argv: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


def start_kwserver(name: str, config: Path, *, workers: int, work_dir: Path, cache_dir: Path,
                   tls: Tls | None = None, env: dict[str, str] | None = None, timeout: float = 180) -> Server:
    """`python -m kwserver serve` on free loopback ports; returns once readiness answers 200 and all
    workers exist. `ready_after_s` is spawn-to-readiness, what a Kubernetes probe would see."""
    port, readiness, metrics_port = free_port(), free_port(), free_port()
    full_env = {
        **os.environ,
        "KWSERVER_COMPILE_CACHE_DIR": str(cache_dir),
        "KUBEWARDEN_BIND_ADDRESS": "127.0.0.1",
        "KUBEWARDEN_PORT": str(port),
        "KUBEWARDEN_READINESS_PROBE_PORT": str(readiness),
        "KWSERVER_METRICS_PORT": str(metrics_port),
        "KUBEWARDEN_POLICIES": str(config),
        "KUBEWARDEN_WORKERS": str(workers),
        "KUBEWARDEN_LOG_LEVEL": "warn",
        **(env or {}),
    }
    if tls:
        full_env.update(KUBEWARDEN_CERT_FILE=str(tls.cert_file), KUBEWARDEN_KEY_FILE=str(tls.key_file))
    # kwserver disables gunicorn's control socket itself (kwserver/server/gunicorn_config.py).
    argv = [sys.executable, "-m", "kwserver", "serve"]
    log_path = work_dir / f"{name}.log"
    started = time.monotonic()
    process = _spawn(argv, full_env, log_path, work_dir)
    server = Server(name, "kwserver", process, port, workers, log_path, tls=tls is not None,
                    readiness_port=readiness, started_at=started)
    deadline = started + timeout
    try:
        while True:
            if process.poll() is not None:
                raise ServerFailed(f"{name} exited with {process.returncode}:\n{server.log()[-4000:]}")
            if _http_ok(readiness):
                server.ready_after_s = time.monotonic() - started
                break
            if time.monotonic() > deadline:
                raise ServerFailed(f"{name} not ready after {timeout:.0f}s:\n{server.log()[-4000:]}")
            time.sleep(0.01)
        _wait_workers(server, deadline, None)
    except BaseException:
        server.stop()
        raise
    return server


def start_gunicorn_app(name: str, kind: str, app: str, *, workers: int, work_dir: Path,
                       tls: Tls | None = None, env: dict[str, str] | None = None, preload: bool = False,
                       stack: str = "event-loop", timeout: float = 120) -> Server:
    """A bench app module (`bench.canned`, `bench.naive`) under kwserver's gunicorn settings, on `stack`.

    Each worker touches `$BENCH_READY_DIR/<pid>` once its app is loaded; the server is ready when
    every worker has. `ready_after_s` is spawn-to-all-workers-loaded.
    """
    port = free_port()
    ready_dir = work_dir / f"{name}.ready"
    if ready_dir.exists():
        for entry in ready_dir.iterdir():
            entry.unlink()
    ready_dir.mkdir(parents=True, exist_ok=True)
    worker_class, stack_args, app_suffix = STACKS[stack]
    argv = [
        # An explicit config file: gunicorn would otherwise load ./gunicorn.conf.py (kwserver's own).
        sys.executable, "-m", "gunicorn", "--config", str(GUNICORN_OVERRIDES),
        "--worker-class", worker_class, *stack_args,
        "--keep-alive", str(ServerSettings.keepalive_timeout_seconds), "--workers", str(workers),
        "--bind", f"127.0.0.1:{port}",
        "--log-level", "warning", "--name", f"bench-{kind}",
        # Slow workers (the naive one compiles at start) must not be killed by the default 30 s timeout.
        "--timeout", "300",
    ]
    if preload:
        argv.append("--preload")
    if tls:
        argv += ["--certfile", str(tls.cert_file), "--keyfile", str(tls.key_file)]
    argv.append(app + app_suffix)
    full_env = {**os.environ, "BENCH_READY_DIR": str(ready_dir), "PYTHONPATH": _pythonpath(), **(env or {})}
    log_path = work_dir / f"{name}.log"
    started = time.monotonic()
    process = _spawn(argv, full_env, log_path, work_dir)
    server = Server(name, kind, process, port, workers, log_path, tls=tls is not None, started_at=started)
    try:
        _wait_workers(server, started + timeout, ready_dir)
        server.ready_after_s = time.monotonic() - started
    except BaseException:
        server.stop()
        raise
    return server


def _pythonpath() -> str:
    current = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (str(REPO), current) if p)
