"""The gunicorn pre-fork daemon: one class owns the process lifecycle; gunicorn hooks are thin.

Master: parse settings, build the policy registry (fetch, compile, validate settings), bind the
listeners, serve readiness, fork. Worker (after fork): close what belongs to the master, start the
epoch ticker (threads do not survive fork), set a process title, serve.

Worker class: `gthread` with one thread. The Kubernetes API server calls webhooks over TLS with
keep-alive; gunicorn's `sync` worker answers `Connection: close`, so every request would pay a full
TLS handshake (measured: ~350 vs ~2,900 requests/s). More threads per worker measured *worse* (GIL
hand-offs around many short native calls), so concurrency comes from processes.
"""

from __future__ import annotations

import gc
import http.server
import logging
import os
import socket
import ssl
import sys
import threading
from typing import Any, ClassVar

import falcon
import orjson
from gunicorn.app.base import BaseApplication

from kwserver import __version__
from kwserver.api import create_app
from kwserver.bootstrap import BootError, BootReport, build_registry
from kwserver.config import ConfigError, ServerSettings
from kwserver.evaluation import Evaluator, InstancePool, PolicyRegistry
from kwserver.runtime.engine import EpochTicker
from kwserver.service import AdmissionService
from kwserver.tls import TlsContextCache

log = logging.getLogger(__name__)

WORKER_CLASS = "gthread"
# Idle keep-alive connections stay open this long; the API server reuses its webhook connections.
KEEPALIVE_SECONDS = 75
MIB = 1024 * 1024


def set_process_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - setproctitle is a dependency; titles are cosmetic
        pass


# --- logging ----------------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line, shaped like the reference server's `--log-fmt json`."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"message": record.getMessage()}
        for key in ("policy_id", "data"):
            if hasattr(record, key):
                fields[key] = getattr(record, key)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return orjson.dumps({
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.replace("WARNING", "WARN"),
            "target": record.name,
            "pid": record.process,
            "fields": fields,
        }).decode()


_LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
               "warn": logging.WARNING, "error": logging.ERROR}


def configure_logging(settings: ServerSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LOG_LEVELS[settings.log_level])


# --- readiness (served by the master, plain HTTP, on its own port) --------------------------------

class _ReadinessHandler(http.server.BaseHTTPRequestHandler):
    ready = threading.Event()

    def do_GET(self) -> None:
        ok = self.path.split("?", 1)[0] == "/readiness"
        status = (200 if self.ready.is_set() else 503) if ok else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ReadinessServer:
    def __init__(self, addr: str, port: int):
        handler = type("ReadinessHandler", (_ReadinessHandler,), {"ready": threading.Event()})
        http.server.ThreadingHTTPServer.address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.server = http.server.ThreadingHTTPServer((addr, port), handler)
        self.ready = handler.ready
        self.thread = threading.Thread(target=self.server.serve_forever, name="kwserver-readiness", daemon=True)

    def start(self) -> None:
        self.ready.set()
        self.thread.start()

    def close_inherited(self) -> None:
        """In a forked worker: drop the copy of the master's listening socket."""
        self.server.socket.close()

    def stop(self) -> None:
        self.ready.clear()
        self.server.shutdown()
        self.server.server_close()


# --- the daemon ------------------------------------------------------------------------------------

class Daemon:
    """Owns the lifecycle of the master and its workers; gunicorn's hooks delegate here."""

    current: ClassVar[Daemon | None] = None

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.registry: PolicyRegistry | None = None
        self.pool: InstancePool | None = None
        self.boot_report: BootReport | None = None
        self.readiness: ReadinessServer | None = None
        self.ticker: EpochTicker | None = None
        self.tls: TlsContextCache | None = None
        self.worker_index = 0
        Daemon.current = self

    @classmethod
    def from_env(cls) -> Daemon:
        settings = ServerSettings.from_env()
        configure_logging(settings)
        return cls(settings)

    @property
    def bind(self) -> list[str]:
        addr = self.settings.addr
        host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
        return [f"{host}:{self.settings.port}"]

    def gunicorn_settings(self) -> dict[str, Any]:
        """The gunicorn configuration `kwserver serve` uses; gunicorn.conf.py spells out the same."""
        settings = self.settings
        options: dict[str, Any] = {
            "bind": self.bind,
            "workers": settings.worker_count,
            "worker_class": WORKER_CLASS,
            "threads": settings.threads,
            "keepalive": KEEPALIVE_SECONDS,
            "preload_app": True,
            "proc_name": "kwserver",
            "loglevel": "debug" if settings.log_level in ("trace", "debug") else settings.log_level,
            "when_ready": when_ready,
            "pre_fork": pre_fork,
            "post_fork": post_fork,
            "on_exit": on_exit,
        }
        if settings.tls:
            options.update(certfile=settings.cert_file, keyfile=settings.key_file, ssl_context=ssl_context)
        return options

    # master ---------------------------------------------------------------------------------------
    def load(self) -> falcon.App:
        """Build the registry and the WSGI app; runs in the master, before the fork."""
        try:
            registry, report = build_registry(self.settings)
        except (BootError, ConfigError) as exc:
            log.error("%s", exc)
            sys.exit(1)
        self.registry, self.boot_report = registry, report
        compiled = sum(m.compiled_size for m in registry.modules.values())
        log.info(
            "loaded %d policies and %d groups over %d unique modules (%.1f MiB compiled, cache %d hit / "
            "%d miss) in %.2fs", len(registry.specs), len(registry.groups), report.unique_modules,
            compiled / MIB, report.cache_hits, report.cache_misses, report.seconds,
        )
        settings = self.settings
        self.pool = InstancePool(
            registry, reuse=not settings.fresh_instance_per_request,
            keep_bytes=settings.instance_keep_memory_mib * MIB,
            budget_bytes=settings.worker_instance_budget_mib * MIB,
        )
        service = AdmissionService(
            registry, Evaluator(registry, self.pool),
            always_accept_namespace=settings.always_accept_admission_reviews_on_namespace,
        )
        app = create_app(service)
        # Everything allocated so far is shared with the workers. Freezing it keeps the workers' garbage
        # collector from writing to those objects, which would copy their pages into every worker.
        gc.collect()
        gc.freeze()
        return app

    def on_ready(self) -> None:
        self.readiness = ReadinessServer(self.settings.addr, self.settings.readiness_probe_port)
        self.readiness.start()
        log.info("ready: API on %s, readiness on port %d", ", ".join(self.bind),
                 self.settings.readiness_probe_port)

    def before_fork(self) -> None:
        # gunicorn titles the master once its loop starts; forks come after that.
        set_process_title(f"kwserver: master [{self._describe()}]")

    def on_exit(self) -> None:
        if self.readiness is not None:
            self.readiness.stop()

    def _describe(self) -> str:
        registry = self.registry
        if registry is None:
            return "no policies"
        return f"{len(registry.specs)} policies, {len(registry.groups)} groups, {len(registry.modules)} modules"

    def make_ssl_context(self) -> ssl.SSLContext:
        """Called by gunicorn for every new connection; the cache rebuilds it when the files rotate."""
        if self.tls is None:
            settings = self.settings
            self.tls = TlsContextCache(settings.cert_file, settings.key_file, settings.client_ca_files)
        return self.tls.context()

    # worker ---------------------------------------------------------------------------------------
    def after_fork(self, worker_age: int) -> None:
        self.worker_index = worker_age
        if self.readiness is not None:
            self.readiness.close_inherited()
            self.readiness = None
        if self.registry is not None and self.registry.engine_options.epoch_interruption:
            self.ticker = EpochTicker(self.registry.engine)
            self.ticker.start()
        set_process_title(f"kwserver: worker {worker_age} [{self._describe()}]")


# --- gunicorn hooks: thin, they only find the daemon and delegate -----------------------------------

def get_daemon() -> Daemon:
    """The daemon of this process: the one `kwserver serve` made, or one from the environment."""
    return Daemon.current or Daemon.from_env()



def wsgi_app() -> falcon.App:
    """WSGI factory for `gunicorn -c gunicorn.conf.py` (settings from KUBEWARDEN_*/KWSERVER_* env)."""
    return get_daemon().load()


def when_ready(server: Any) -> None:
    get_daemon().on_ready()


def pre_fork(server: Any, worker: Any) -> None:
    get_daemon().before_fork()


def post_fork(server: Any, worker: Any) -> None:
    get_daemon().after_fork(worker.age)


def on_exit(server: Any) -> None:
    get_daemon().on_exit()


def ssl_context(config: Any, default_ssl_context_factory: Any) -> ssl.SSLContext:
    return get_daemon().make_ssl_context()


class KwserverApplication(BaseApplication):
    """`kwserver serve`: gunicorn with kwserver's settings, optionally tuned by a gunicorn config file."""

    def __init__(self, daemon: Daemon, gunicorn_config: str | None = None):
        self.daemon = daemon
        self.gunicorn_config = gunicorn_config
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.daemon.gunicorn_settings().items():
            self.cfg.set(key, value)
        if self.gunicorn_config:
            self.load_config_from_file(self.gunicorn_config)

    def load(self) -> falcon.App:
        return self.daemon.load()


def serve(settings: ServerSettings, gunicorn_config: str | None = None) -> None:
    configure_logging(settings)
    log.info("kwserver %s starting with %d worker(s)", __version__, settings.worker_count)
    os.environ.update(settings.to_env())  # so a gunicorn config file sees the same settings
    KwserverApplication(Daemon(settings), gunicorn_config).run()
