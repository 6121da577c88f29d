"""The gunicorn pre-fork daemon: one class owns the process lifecycle; gunicorn hooks are thin.

Master: parse settings, build the policy registry (fetch, compile, validate settings), bind the
listeners, serve readiness and metrics, fork, watch the pool. Worker (after fork): close what belongs
to the master, start the epoch ticker (threads do not survive fork), set a process title, serve.

Worker class: kwserver's event-loop worker (kwserver/server/worker.py): keep-alive connections (the
Kubernetes API server calls webhooks over TLS and reuses its connections), each read completely
within its limits before the request is evaluated, so slow clients never stall the server.
Concurrency comes from processes: evaluations run one at a time per worker.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import orjson
import psutil
from gunicorn.app.base import Application

from kwserver import __version__
from kwserver.cluster import connection
from kwserver.cluster.limits import CacheLimits
from kwserver.cluster.supervisor import CacheSupervisor
from kwserver.config import ConfigError, ServerSettings
from kwserver.evaluation import Evaluator, InstancePool, PolicyRegistry
from kwserver.evaluation.bootstrap import BootError, BootReport, build_registry
from kwserver.logs import configure_logging
from kwserver.observability import metrics, otlp
from kwserver.observability.endpoints import EndpointServer, LocalOnly, Readiness
from kwserver.observability.status import LoadedFacts, StatusView
from kwserver.runtime.engine import EpochTicker
from kwserver.server.api import create_app
from kwserver.server.autoscaler import PoolController, ScalingPolicy
from kwserver.server.service import AdmissionService
from kwserver.server.tls import TlsContextCache

log = logging.getLogger(__name__)

WORKER_CLASS = "kwserver.server.worker.EventLoopWorker"
# gunicorn's settings and hooks for kwserver (also imported by the repository's gunicorn.conf.py).
GUNICORN_CONFIG_MODULE = "kwserver.server.gunicorn_config"
# Workers get this long to finish in-flight requests when retired (reload, shrink, recycle, shutdown).
GRACEFUL_TIMEOUT_SECONDS = 30
TITLE_EVERY_REQUESTS = 100
MIB = 1024 * 1024


def set_process_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - setproctitle is a dependency; titles are cosmetic
        pass


class ServedCounter:
    """WSGI middleware of the workers: counts requests and busy time (the pool's utilisation)."""

    def __init__(self, app: Callable, record: Callable[[float], None], retitle: Callable[[int], None]):
        self.app = app
        self.record = record  # called with the seconds each request took
        self.retitle = retitle  # called with the request count, every TITLE_EVERY_REQUESTS requests
        self.requests = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        try:
            return self.app(environ, start_response)
        finally:
            self.record(time.perf_counter() - started)
            self.requests += 1
            if self.requests % TITLE_EVERY_REQUESTS == 1:
                self.retitle(self.requests)


class Daemon:
    """Owns the lifecycle of the master and its workers; gunicorn's hooks delegate here."""

    current: ClassVar[Daemon | None] = None

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.registry: PolicyRegistry | None = None
        self.boot_report: BootReport | None = None
        self.service: AdmissionService | None = None
        self.pool: InstancePool | None = None
        self.metrics_dir: str | None = None  # made when the server loads (metrics.prepare_directory)
        self.metrics: metrics.WorkerMetrics | None = None
        self.readiness = Readiness(lambda: bool(self.arbiter and self.arbiter.WORKERS))
        self.endpoints: list[EndpointServer] = []
        self.controller: PoolController | None = None
        self.arbiter: Any = None
        self.ticker: EpochTicker | None = None
        self.tls: TlsContextCache | None = None
        self.span_relay: Any = None  # otlp_traces.SpanRelay with --log-fmt otlp
        self.span_export: Any = None  # otlp_traces.SpanExport, in the master
        self.metrics_push: Any = None  # otlp_metrics.MetricsPush with --enable-metrics, in the master
        self.cluster_cache: CacheSupervisor | None = None
        self.worker_age = 0
        Daemon.current = self

    @classmethod
    def from_env(cls) -> Daemon:
        settings = ServerSettings.from_env()
        configure_logging(settings.log_level, settings.log_fmt)
        return cls(settings)

    @property
    def bind(self) -> list[str]:
        addr = self.settings.addr
        host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
        return [f"{host}:{self.settings.port}"]

    # master: loading ------------------------------------------------------------------------------
    def load(self) -> Callable:
        """Build the registry and the WSGI app; runs in the master, before the fork."""
        # Before any metric value exists: prometheus-client picks its multiprocess value class here.
        self.metrics_dir = metrics.prepare_directory(None)
        self.metrics = metrics.WorkerMetrics(self.settings.metric_series_limit)
        try:
            self._check_telemetry()
            registry, report = build_registry(self.settings)
            connection.connect_at_startup(
                required=any(p.spec.context_aware_resources for p in registry.policies.values()),
                ignore_failure=self.settings.ignore_kubernetes_connection_failure)
        except (BootError, ConfigError, connection.ConnectionFailure) as exc:
            log.error("%s", exc)
            sys.exit(1)
        self._start_cluster_cache()
        evaluator = self._install(registry, report)
        self.service = AdmissionService(
            registry, evaluator, observe=self.metrics.observe,
            always_accept_namespace=self.settings.always_accept_admission_reviews_on_namespace,
        )
        app = ServedCounter(create_app(self._traced(self.service)), record=self.metrics.served,
                            retitle=self._title_worker)
        self._freeze_heap()
        return app

    def _check_telemetry(self) -> None:
        if self.settings.enable_metrics:
            otlp.check("metrics")
        if self.settings.log_fmt == "otlp":
            otlp.check("traces")

    def _traced(self, service: AdmissionService) -> Any:
        if self.settings.log_fmt != "otlp":
            return service
        from kwserver.observability.otlp_traces import SpanRelay, TracedService

        self.span_relay = SpanRelay()
        return TracedService(service, self.span_relay)

    def _start_cluster_cache(self) -> None:
        """One cache of the cluster for the whole server, in a process of its own; workers ask it."""
        if not connection.enabled():
            return
        settings = self.settings
        self.cluster_cache = CacheSupervisor(
            CacheLimits(settings.cluster_max_reflectors, settings.cluster_max_objects),
            settings.log_level, settings.log_fmt)
        self.cluster_cache.start()
        connection.use_cache(self.cluster_cache.path)

    def _install(self, registry: PolicyRegistry, report: BootReport) -> Evaluator:
        settings = self.settings
        self.registry, self.boot_report = registry, report
        self.pool = InstancePool(
            registry, reuse=not settings.fresh_instance_per_request,
            keep_bytes=settings.instance_keep_memory_mib * MIB,
            budget_bytes=settings.worker_instance_budget_mib * MIB,
            observer=self.metrics,
        )
        self.pool.link_all()
        compiled = sum(m.compiled_size for m in registry.modules.values())
        log.info(
            "loaded %d policies and %d groups over %d unique modules (%d downloaded, %.1f MiB compiled, %d reused, "
            "compile cache %d hit / %d miss) in %.2fs", len(registry.specs), len(registry.groups),
            report.unique_modules, report.downloaded_modules, compiled / MIB, report.reused_modules,
            report.cache_hits, report.cache_misses, report.seconds,
        )
        return Evaluator(registry, self.pool)

    @staticmethod
    def _freeze_heap() -> None:
        # Everything allocated so far is shared with the workers. Freezing it keeps the workers' garbage
        # collector from writing to those objects, which would copy their pages into every worker.
        gc.collect()
        gc.freeze()

    def reload(self) -> None:
        """SIGHUP: load the configuration again; switch only if all of it is valid.

        gunicorn then forks new workers from this master and retires the old ones gracefully. When the
        new configuration is refused, the new workers serve the old one.
        """
        try:
            registry, report = build_registry(self.settings, previous=self.registry)
        except (BootError, ConfigError) as exc:
            log.error("reload refused, the running configuration stays in service: %s", exc)
            return
        self.service.use(registry, self._install(registry, report))
        self._freeze_heap()
        log.info("reloaded %s", self.settings.policies)

    # master: running ------------------------------------------------------------------------------
    def on_ready(self, arbiter: Any) -> None:
        self.arbiter = arbiter
        settings = self.settings
        routes = {settings.readiness_probe_port: ({"/readiness": self.readiness.route}, "readiness")}
        if settings.metrics_port:
            status = StatusView(self.metrics_dir, self._loaded_facts)
            registry = metrics.master_registry(self.metrics_dir, [metrics.MasterCollector(status.snapshot)])
            routes[settings.metrics_port] = ({
                "/metrics": lambda: (200, "text/plain; version=0.0.4", metrics.render(registry)),
                # Process ids, titles, memory and policy names: for `kwserver top` on this host only.
                "/status": LocalOnly(lambda: (200, "application/json", orjson.dumps(status.snapshot()))),
            }, "metrics")
        for port, (paths, name) in routes.items():
            try:
                self.endpoints.append(EndpointServer(settings.addr, port, paths, name))
            except OSError as exc:
                log.error("cannot serve %s on %s:%d: %s", name, settings.addr, port, exc)
                sys.exit(1)
        for endpoint in self.endpoints:
            endpoint.start()
        self._unready_on_term()
        self.readiness.ready.set()
        self._start_controller()
        self._start_metrics_push()
        self._start_span_export()
        log.info("ready: API on %s, readiness on port %d, metrics on port %s", ", ".join(self.bind),
                 settings.readiness_probe_port, settings.metrics_port or "(disabled)")

    def _unready_on_term(self) -> None:
        """On SIGTERM, readiness turns unready before gunicorn drains the workers."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            self.readiness.ready.clear()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_term)

    def _start_controller(self) -> None:
        settings = self.settings
        scaling = None
        if settings.autoscaling:
            scaling = ScalingPolicy(settings.pool_min, settings.pool_max, settings.scale_up_after_seconds,
                                    settings.scale_down_after_seconds)
        if scaling is None and not settings.worker_max_uss_mib:
            return
        self.controller = PoolController(
            policy=scaling, max_uss_bytes=settings.worker_max_uss_mib * MIB,
            busy_seconds=lambda: metrics.metric_total(self.metrics_dir, "kwserver_worker_busy_seconds"),
            workers=lambda: {pid: worker.age for pid, worker in list(self.arbiter.WORKERS.items())},
            uss=_uss, resize=self._resize_pool,
        )
        self.controller.start()

    def _start_span_export(self) -> None:
        if self.span_relay is None:
            return
        from kwserver.observability.otlp_traces import SpanExport

        self.span_export = SpanExport(self.span_relay)
        self.span_export.start()

    def _start_metrics_push(self) -> None:
        if not self.settings.enable_metrics:
            return
        from kwserver.observability.otlp_metrics import MetricsPush

        self.metrics_push = MetricsPush.from_env(self.metrics_dir)
        self.metrics_push.start()

    def _resize_pool(self, workers: int) -> None:
        # What gunicorn's TTIN/TTOU handlers do, for any step at once (signals sent in a row coalesce).
        self.arbiter.num_workers = workers
        self.arbiter.wakeup()

    def _loaded_facts(self) -> LoadedFacts:
        registry, report = self.registry, self.boot_report
        if registry is None or report is None:
            return LoadedFacts()
        return LoadedFacts(
            policies=len(registry.top_level_names), modules=len(registry.modules),
            compiled_module_bytes=sum(m.compiled_size for m in registry.modules.values()),
            boot_seconds=report.seconds, compile_cache_hits=report.cache_hits,
            compile_cache_misses=report.cache_misses,
        )

    def before_fork(self) -> None:
        # gunicorn titles the master once its loop starts; forks come after that.
        set_process_title(f"kwserver: master [{self._describe()}]")

    def worker_exiting(self) -> None:
        """In the worker, as it exits: publish what it counted since its last flush."""
        if self.metrics is not None:
            self.metrics.flush()

    def worker_exited(self, pid: int) -> None:
        if self.metrics_dir:
            metrics.archive_dead_worker(self.metrics_dir, pid, self.settings.metric_series_limit)

    def on_exit(self) -> None:
        self.readiness.ready.clear()
        if self.controller is not None:
            self.controller.stop()
        for endpoint in self.endpoints:
            endpoint.stop()
        if self.metrics_push is not None:
            self.metrics_push.stop()
        if self.span_export is not None:
            self.span_export.stop()
        if self.metrics_dir:
            metrics.remove_directory(self.metrics_dir)
        if self.cluster_cache is not None:
            self.cluster_cache.stop()

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
    def after_fork(self, worker: Any) -> None:
        self.worker_age = worker.age
        if self.metrics is not None:
            worker.every_second = self.metrics.flush
        for endpoint in self.endpoints:
            endpoint.close_inherited()
        self.endpoints = []
        self.controller = None
        self.metrics_push = self.span_export = None  # the master's; their threads are not in this process
        if self.span_relay is not None:
            self.span_relay.in_worker()
        if self.registry is not None and self.registry.engine_options.epoch_interruption:
            self.ticker = EpochTicker(self.registry.engine)
            self.ticker.start()
        self._title_worker(0)

    def _title_worker(self, requests: int) -> None:
        set_process_title(f"kwserver: worker {self.worker_age} [{self._describe()}] {requests} requests")


def _uss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_full_info().uss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


# --- gunicorn hooks: thin, they only find the daemon and delegate -----------------------------------

def get_daemon() -> Daemon:
    """The daemon of this process: the one `kwserver serve` made, or one from the environment."""
    return Daemon.current or Daemon.from_env()


class KwserverApplication(Application):
    """`kwserver serve`: gunicorn with kwserver's settings, optionally tuned by a gunicorn config file.

    Configured from kwserver's settings, never from gunicorn's command line (argv is kwserver's).
    """

    def __init__(self, daemon: Daemon, gunicorn_config: str | None = None):
        self.daemon = daemon
        self.gunicorn_config = gunicorn_config
        super().__init__()

    def load_config(self) -> None:
        self.load_config_from_module_name_or_filename(f"python:{GUNICORN_CONFIG_MODULE}")
        if self.gunicorn_config:
            self.load_config_from_module_name_or_filename(self.gunicorn_config)

    def load(self) -> Callable:
        return self.daemon.load()


def serve(settings: ServerSettings, gunicorn_config: str | None = None) -> None:
    configure_logging(settings.log_level, settings.log_fmt)
    log.info("kwserver %s starting with %d worker(s)", __version__, settings.initial_workers)
    for ignored in settings.ignored():
        log.warning("ignoring --%s", ignored)
    os.environ.update(settings.to_env())  # so a gunicorn config file sees the same settings
    KwserverApplication(Daemon(settings), gunicorn_config).run()
