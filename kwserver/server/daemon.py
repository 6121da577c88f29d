"""The gunicorn pre-fork daemon: one class owns the process lifecycle; gunicorn hooks are thin.

Master: parse settings, prepare the configuration (the policy registry: fetch, compile, validate
settings; the cluster as its policies need it) the same way at start and on every reload, bind the
listeners, run the master's services (kwserver.server.services), fork, watch the pool. Worker (after
fork): drop what belongs to the master, start the epoch ticker (threads do not survive fork), set a
process title, serve with the limits the daemon hands its worker class.

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
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import orjson
import psutil
from gunicorn.app.base import Application
from gunicorn.errors import HaltServer

from kwserver import __version__
from kwserver.cluster import connection
from kwserver.cluster.limits import CacheLimits
from kwserver.cluster.supervisor import CacheSupervisor
from kwserver.config import ConfigError, ServerSettings
from kwserver.evaluation import Evaluator, InstancePool, PolicyRegistry
from kwserver.evaluation.bootstrap import BootError, BootReport, build_registry
from kwserver.logs import configure_logging
from kwserver.observability import discovery, memory, metrics, otlp
from kwserver.observability.endpoints import EndpointServer, LocalOnly, Readiness
from kwserver.observability.status import LoadedFacts, StatusView
from kwserver.runtime.engine import EpochTicker
from kwserver.server.api import create_app
from kwserver.server.autoscaler import PoolController, ScalingPolicy
from kwserver.server.detach import DetachError, detach
from kwserver.server.service import AdmissionService
from kwserver.server.services import MasterService, MasterServices
from kwserver.server.sizing import (
    WORKER_ESTIMATE_BYTES,
    count_text,
    describe_room,
    memory_limit,
    worker_plan,
    workers_that_fit,
)
from kwserver.server.tls import TlsContextCache, TlsError
from kwserver.server.worker import ConnectionLimits, EventLoopWorker

log = logging.getLogger(__name__)

# gunicorn's settings and hooks for kwserver (also imported by the repository's gunicorn.conf.py).
GUNICORN_CONFIG_MODULE = "kwserver.server.gunicorn_config"
# Workers get this long to finish in-flight requests when retired (reload, shrink, recycle, shutdown).
GRACEFUL_TIMEOUT_SECONDS = 30
MIB = 1024 * 1024


def set_process_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - setproctitle is a dependency; titles are cosmetic
        pass


def exit_if_taken(listeners: Iterable[tuple[str, Any, str]]) -> None:
    """Exit with one line for the first (what, (host, port), flag) that cannot be bound."""
    for what, address, flag in listeners:
        if not isinstance(address, tuple):
            continue  # a unix socket or an inherited descriptor: gunicorn's to check
        host, port = address[0], address[1]
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn and the endpoints bind
            try:
                probe.bind((host, port))
            except OSError as exc:
                log.error("cannot serve %s on %s:%d: %s (another server? choose a port with %s)",
                          what, host, port, exc.strerror or exc, flag)
                sys.exit(1)


class ServedCounter:
    """WSGI middleware of the workers: counts requests and busy time (the pool's utilisation)."""

    def __init__(self, app: Callable, record: Callable[[float], None]):
        self.app = app
        self.record = record  # called with the seconds each request took
        self.requests = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        try:
            return self.app(environ, start_response)
        finally:
            self.record(time.perf_counter() - started)
            self.requests += 1


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
        self.readiness = Readiness(self._has_serving_worker)
        self.services = MasterServices()
        self.arbiter: Any = None
        self.ticker: EpochTicker | None = None
        self.tls: TlsContextCache | None = None
        self.span_relay: Any = None  # otlp_traces.SpanRelay with --log-fmt otlp
        self.cluster_cache: CacheSupervisor | None = None  # while some policy reads the cluster
        self.worker_age = 0
        self.served: ServedCounter | None = None  # the app, counting the requests it serves
        self._titled_requests = 0
        Daemon.current = self

    @classmethod
    def from_env(cls) -> Daemon:
        settings = ServerSettings.from_env()
        configure_logging(settings.log_level, settings.log_fmt)
        return cls(settings)

    @property
    def worker_class(self) -> type[EventLoopWorker]:
        """gunicorn's worker class for this server: the event-loop worker, handed its connection limits
        and what it does once a second (publish its counts, retitle)."""
        return EventLoopWorker.serving(ConnectionLimits.from_settings(self.settings), every_second=self._each_second)

    @property
    def bind(self) -> list[str]:
        addr = self.settings.addr
        host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
        return [f"{host}:{self.settings.port}"]

    # master: loading ------------------------------------------------------------------------------
    def load(self, api_addresses: Iterable[Any] = ()) -> Callable:
        """Build the registry and the WSGI app; runs in the master, before the fork.

        `api_addresses`: where gunicorn will bind the API (its `cfg.address`), checked first with the
        master's own ports, so that a port in use stops the server at once and before any policy loads
        (gunicorn alone would retry for 5 s)."""
        if "GUNICORN_FD" not in os.environ:  # not a re-exec inheriting its listeners (USR2)
            settings = self.settings
            listeners = [("the admission API", address, "--port") for address in api_addresses]
            listeners.append(("readiness", (settings.addr, settings.readiness_probe_port), "--readiness-probe-port"))
            if settings.metrics_port:
                listeners.append(("metrics", (settings.addr, settings.metrics_port), "--metrics-port"))
            exit_if_taken(listeners)
        # Before any metric value exists: prometheus-client picks its multiprocess value class here.
        self.metrics_dir = metrics.prepare_directory(None)
        self.metrics = metrics.WorkerMetrics(self.settings.metric_series_limit)
        try:
            self._check_telemetry()
            if self.settings.tls:  # a pair that cannot serve fails the start, naming the file
                self.make_ssl_context()
            evaluator = self._prepare(previous=None)
        except (BootError, ConfigError, connection.ConnectionFailure, TlsError) as exc:
            log.error("%s", exc)
            sys.exit(1)
        self.service = AdmissionService(
            self.registry, evaluator, observe=self.metrics.observe,
            always_accept_namespace=self.settings.always_accept_admission_reviews_on_namespace,
        )
        self.served = ServedCounter(create_app(self._traced(self.service)), record=self.metrics.served)
        self._freeze_heap()
        return self.served

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

    def _prepare(self, previous: PolicyRegistry | None) -> Evaluator:
        """The configuration and everything it needs, at start and on a reload alike: the policy registry
        (on a reload, unchanged modules of `previous` are reused), the cluster as its policies need it,
        the instance pool and evaluator. Raises BootError, ConfigError or ConnectionFailure before
        anything in service changed."""
        registry, report = build_registry(self.settings, previous=previous)
        self._follow_cluster(any(p.reads_cluster for p in registry.policies.values()))
        return self._install(registry, report)

    def _follow_cluster(self, required: bool) -> None:
        """Cluster access as the configuration needs it: one cache of the cluster for the whole server,
        in a process of its own that the workers ask, while some policy reads the cluster (it may list
        and get only its `contextAwareResources`); none, and no connection, otherwise."""
        if required and self.cluster_cache is None:
            settings = self.settings
            if not connection.connect(ignore_failure=settings.ignore_kubernetes_connection_failure):
                connection.disable()
                return
            limits = CacheLimits.from_settings(settings)
            self.cluster_cache = self.services.start(CacheSupervisor(
                limits, settings.log_level, settings.log_fmt))
            connection.use_cache(self.cluster_cache.path, limits)
        elif not required:
            connection.disable()
            if self.cluster_cache is None:
                log.info("no policy reads the cluster: not connecting to Kubernetes")
                return
            # Workers forked before this reload finish their requests on the old configuration, with the cache.
            log.info("no policy reads the cluster any more: the cluster cache stops once the current workers exit")
            self.services.retire(self.cluster_cache, self._worker_pids())
            self.cluster_cache = None

    def _worker_pids(self) -> list[int]:
        return list(self.arbiter.WORKERS) if self.arbiter is not None else []

    def _install(self, registry: PolicyRegistry, report: BootReport) -> Evaluator:
        settings = self.settings
        self.registry, self.boot_report = registry, report
        fresh = settings.fresh_instance_per_request  # None: fresh where it is as cheap as reuse
        self.pool = InstancePool(
            registry, reuse=None if fresh is None else not fresh,
            keep_bytes=settings.instance_keep_memory_mib * MIB,
            budget_bytes=settings.worker_instance_budget_mib * MIB,
        )
        self.metrics.pool = self.pool
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
            evaluator = self._prepare(previous=self.registry)
        except (BootError, ConfigError, connection.ConnectionFailure) as exc:
            log.error("reload refused, the running configuration stays in service: %s", exc)
            return
        self.service.use(self.registry, evaluator)
        self._freeze_heap()
        log.info("reloaded %s", self.settings.policies)

    # master: running ------------------------------------------------------------------------------
    def on_ready(self, arbiter: Any) -> None:
        self.arbiter = arbiter
        self._fit_workers_in_memory()
        for service in self._master_services():
            self.services.start(service)
        self._unready_on_term()
        self.readiness.ready.set()
        settings = self.settings
        log.info("ready: API on %s, readiness on port %d, metrics on port %d", ", ".join(self.bind),
                 settings.readiness_probe_port, settings.metrics_listener_port)

    def _has_serving_worker(self) -> bool:
        """Readiness needs a worker that serves: one that set itself up (TLS included) and joined the
        connection table, not one merely forked (or dying at its start)."""
        if self.arbiter is None:
            return False
        live, table = set(self.arbiter.WORKERS), EventLoopWorker.table
        if table is None or not issubclass(self.arbiter.worker_class, EventLoopWorker):
            return bool(live)  # another worker class (a --gunicorn-config): its start is not visible
        return bool(live & table.serving())

    def _master_services(self) -> list[MasterService]:
        """What the master runs beside the arbiter, as the settings ask (the cluster cache follows the
        configuration instead: see `_follow_cluster`)."""
        services: list[MasterService] = [*self._endpoints()]
        controller = self._pool_controller()
        if controller is not None:
            services.append(controller)
        if self.settings.enable_metrics:
            from kwserver.observability.otlp_metrics import MetricsPush

            services.append(MetricsPush.from_env(self.metrics_dir))
        if self.span_relay is not None:
            from kwserver.observability.otlp_traces import SpanExport

            services.append(SpanExport(self.span_relay))
        return services

    def _endpoints(self) -> list[EndpointServer]:
        """Readiness on its port; metrics and status on the same one, or on a port of their own. A port
        that cannot be bound stops the server."""
        settings = self.settings
        routes = {settings.readiness_probe_port: ({"/readiness": self.readiness.route}, "readiness")}
        status = StatusView(self.metrics_dir, self._loaded_facts)
        registry = metrics.master_registry(self.metrics_dir, [metrics.MasterCollector(status.snapshot)])
        routes.setdefault(settings.metrics_listener_port, ({}, "metrics"))[0].update({
            "/metrics": lambda: (200, "text/plain; version=0.0.4", metrics.render(registry)),
            # Process ids, titles, memory and policy names: for `kwserver top` on this host only.
            "/status": LocalOnly(lambda: (200, "application/json", orjson.dumps(status.snapshot()))),
        })
        endpoints = []
        for port, (paths, name) in routes.items():
            try:
                endpoints.append(EndpointServer(settings.addr, port, paths, name))
            except OSError as exc:
                log.error("cannot serve %s on %s:%d: %s", name, settings.addr, port, exc)
                sys.exit(1)
        return endpoints

    def _unready_on_term(self) -> None:
        """On SIGTERM, readiness turns unready before gunicorn drains the workers."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            self.readiness.ready.clear()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_term)

    def _pool_controller(self) -> PoolController | None:
        settings = self.settings
        scaling, plan = None, worker_plan(settings)
        if plan.autoscaling:
            scaling = ScalingPolicy(plan.minimum, plan.maximum, settings.scale_up_after_seconds,
                                    settings.scale_down_after_seconds)
        if scaling is None and not settings.worker_max_uss_mib:
            return None
        return PoolController(
            policy=scaling, max_uss_bytes=settings.worker_max_uss_mib * MIB,
            busy_seconds=lambda: metrics.metric_total(self.metrics_dir, "kwserver_worker_busy_seconds"),
            workers=lambda: {pid: worker.age for pid, worker in list(self.arbiter.WORKERS.items())},
            uss=_uss, resize=self._resize_pool, no_room=self._no_room_for_a_worker,
        )

    def _memory_in_use(self) -> tuple[int, int]:
        """The server's footprint (the PSS of its processes) and what one worker holds of its own (the
        largest USS of the running workers; an estimate before the first one runs)."""
        processes = memory.server_processes(os.getpid())
        worker_uss = [p["uss"] for p in processes if p["role"] == "worker"]
        return sum(p["pss"] for p in processes), max(worker_uss, default=WORKER_ESTIMATE_BYTES)

    def _no_room_for_a_worker(self) -> str | None:
        limit = memory_limit()
        if limit is None:
            return None
        used, per_worker = self._memory_in_use()
        if workers_that_fit(limit, used, per_worker):
            return None
        return f"it would not fit in the memory limit ({describe_room(limit, used, per_worker)})"

    def _fit_workers_in_memory(self) -> None:
        """Before the first fork: no more workers than the pod's memory limit holds (when their number is
        kwserver's choice; a number the operator set is kept, with a warning)."""
        limit, wanted = memory_limit(), self.arbiter.num_workers
        if limit is None:
            return
        used, per_worker = self._memory_in_use()
        fit = workers_that_fit(limit, used, per_worker)
        if fit >= wanted:
            return
        room = describe_room(limit, used, per_worker)
        if self.settings.workers is not None or self.settings.min_workers is not None:
            log.warning("%s may not fit in the memory limit (%s)", count_text(wanted), room)
        elif fit == 0:
            log.warning("the memory limit is below what one worker needs (%s): starting 1 worker", room)
            self.arbiter.num_workers = 1
        else:
            log.warning("starting %s instead of %d: the memory limit holds no more (%s)", count_text(fit), wanted, room)
            self.arbiter.num_workers = fit

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
        self.services.worker_exited(pid)

    def on_exit(self) -> None:
        self.readiness.ready.clear()
        self.services.stop()  # the metrics push exports its final totals from the directory removed next
        if self.metrics_dir:
            metrics.remove_directory(self.metrics_dir)

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
        self.services.in_worker()
        if self.registry is not None and self.registry.engine_options.epoch_interruption:
            self.ticker = EpochTicker(self.registry.engine)
            self.ticker.start()
        self._title_worker(0)

    def _each_second(self) -> None:
        """In a worker, once a second: publish its counts; the title then shows the count `kwserver top`
        reads (the worker serves from this thread, so nothing is counted in between)."""
        if self.metrics is not None:
            self.metrics.flush()
        if self.served is not None and self.served.requests != self._titled_requests:
            self._title_worker(self.served.requests)

    def _title_worker(self, requests: int) -> None:
        self._titled_requests = requests
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
        return self.daemon.load(self.cfg.address)


def serve(settings: ServerSettings, gunicorn_config: str | None = None) -> None:
    configure_logging(settings.log_level, settings.log_fmt)
    if settings.daemon:
        try:
            detach(settings.daemon_pid_file, settings.daemon_stdout_file, settings.daemon_stderr_file)
        except DetachError as exc:
            log.error("%s", exc)
            sys.exit(1)
    log.info("kwserver %s starting: %s", __version__, worker_plan(settings).describe())
    for ignored in settings.ignored():
        log.warning("ignoring --%s", ignored)
    os.environ.update(settings.to_env())  # so a gunicorn config file sees the same settings
    daemon = Daemon(settings)
    try:
        KwserverApplication(daemon, gunicorn_config).run()
    except HaltServer as exc:
        # gunicorn halting while it halts: a second worker that failed to boot (each said why) is reaped
        # during the stop of the first one, and gunicorn's own exit hooks are skipped.
        log.error("stopped: %s", exc.reason)
        daemon.on_exit()
        discovery.withdraw()
        sys.exit(exc.exit_status)
