"""The harness of one scenario: servers, load points, sampling, and the results they leave behind.

A scenario (bench/steps.py) opens a `ScenarioRun`, starts servers through it (each is registered with
the sampler), runs load points (`run.load`), and adds headline figures; on exit every server is stopped,
then `bench/results/<scenario>/` receives results.json (raw samples and points), report.md and plots
(bench/report.py).
"""

from __future__ import annotations

import http.client
import logging
import math
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import sampler as sampling
from bench.servers import REPO, Server, Tls, make_tls, start_gunicorn_app, start_kwserver
from bench.workloads import Workload, classify
from bench.wrk import WrkAborted, WrkCommand, WrkResult, run_wrk

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MIB = 1024 * 1024
PROBE_AFTER_S = 0.3  # when the connection distribution is checked after wrk starts


@dataclass
class Options:
    duration: float = 4.0  # seconds of one load point
    warmup: float = 1.5  # seconds of unmeasured load before the first point of a server+workload
    repeats: int = 3  # load points per variant, interleaved with the baseline's
    connections: int = 16  # wrk connections (keep-alive)
    wrk_threads: int = 1
    interval: float = 0.5  # sampling interval (s)
    workers: int = 2  # server workers unless a scenario varies them
    transports: tuple[str, ...] = ("http", "https")
    worker_counts: tuple[int, ...] = (1, 2, 4, 8)
    soak_requests: int = 200_000
    soak_max_seconds: float = 330.0
    soak_segment: float = 5.0
    soak_warmup_requests: int = 20_000
    startup_repeats: int = 3
    pool_burst_seconds: float = 30.0  # `pool`: the load that grows the pool
    pool_scale_down_seconds: float = 30.0  # `pool`: kwserver's --scale-down-after-seconds (its default)
    # Keep-alive connections stay with the worker that accepted them; a stack that accepts greedily
    # (gunicorn's gthread) often gives one worker every connection wrk opens. With `balance`, a load point
    # whose connections left a worker idle (fewer busy workers than min(workers, CPUs)) is restarted,
    # up to `balance_attempts` times; the attempts are recorded and reported.
    balance: bool = True
    balance_attempts: int = 12
    ten_policy_config: str | None = None
    sixty_one_policy_config: str | None = None
    results: Path = RESULTS_DIR
    cache_dir: Path | None = None  # shared warm compile cache (default: a temporary directory)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["results"] = str(self.results)
        doc["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return doc


@dataclass
class Point:
    """One load point: one wrk run against one server, with what the server used meanwhile."""

    label: str  # the variant measured (e.g. "kwserver reject")
    series: str  # the comparison group it belongs to (e.g. "http"); ratios are within a series
    server: str
    kind: str
    transport: str
    workload: str
    repeat: int
    t_start: float
    t_end: float
    wrk: dict[str, Any]
    rps: float
    latency_ms: dict[str, float]
    server_cpu_s: float
    wrk_cpu_s: float
    other_cpu_s: float  # CPU of everything else on the machine meanwhile (the harness, other users)
    errors: int
    non_2xx: int
    memory: dict[str, Any]  # snapshot right after the load: totals and per process
    memory_during: dict[str, float]  # medians of the sampled totals during the load
    connections: dict[str, int]  # established connections per worker pid (sampled, max)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return int(self.wrk.get("requests", 0))

    @property
    def server_cpu_ms_per_request(self) -> float:
        return 1000 * self.server_cpu_s / self.requests if self.requests else math.nan

    @property
    def wrk_cpu_share(self) -> float:
        duration = self.wrk.get("duration_s") or 0
        return self.wrk_cpu_s / duration if duration else math.nan

    @property
    def other_cpu_share(self) -> float:
        duration = self.t_end - self.t_start
        return self.other_cpu_s / duration if duration > 0 else math.nan

    @property
    def server_cpu_share(self) -> float:
        duration = self.wrk.get("duration_s") or 0
        return self.server_cpu_s / duration if duration else math.nan

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["requests"] = self.requests
        doc["server_cpu_ms_per_request"] = self.server_cpu_ms_per_request
        doc["wrk_cpu_share"] = self.wrk_cpu_share
        doc["server_cpu_share"] = self.server_cpu_share
        doc["other_cpu_share"] = self.other_cpu_share
        return doc


def memory_summary(samples: list[sampling.Sample]) -> dict[str, Any]:
    return {
        "pss": sampling.total(samples, "pss"),
        "uss": sampling.total(samples, "uss"),
        "rss": sampling.total(samples, "rss"),
        "processes": [{"pid": s.pid, "role": s.role, "pss": s.pss, "uss": s.uss, "rss": s.rss} for s in samples],
    }


def machine_info() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in ("wasmtime", "gunicorn", "falcon", "orjson", "psutil"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # pragma: no cover - informational only
            info[package] = "?"
    try:
        import subprocess

        from bench.wrk import find_wrk

        out = subprocess.run([find_wrk(), "--version"], capture_output=True, text=True, timeout=10)
        info["wrk"] = (out.stdout or out.stderr).splitlines()[0].strip()
    except Exception:
        info["wrk"] = "missing"
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        info["cpu_model"] = "?"
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


class ScenarioRun:
    def __init__(self, name: str, options: Options, title: str, description: str):
        self.name = name
        self.options = options
        self.title = title
        self.description = description
        self.out_dir = options.results / name
        self.work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.clock = sampling.Clock()
        self.sampler = sampling.Sampler(self.clock, options.interval)
        self.points: list[Point] = []
        self.notes: list[str] = []
        self.headlines: list[dict[str, Any]] = []
        self.tables: list[tuple[str, list[str], list[list[str]]]] = []  # extra tables: (title, header, rows)
        self.figures: list[tuple[str, str]] = []  # (file name, caption)
        self.data: dict[str, Any] = {}  # scenario-specific raw results
        self.configs: dict[str, Any] = {}
        self.workloads: dict[str, Workload] = {}
        self.events: list[dict[str, Any]] = []
        self.servers: dict[str, Server] = {}
        self.server_info: dict[str, dict[str, Any]] = {}
        self.machine = machine_info()
        self.started_wall = time.time()
        self.error: str | None = None
        self._tls: Tls | None = None
        self.cache_dir = options.cache_dir or (self.work / "compile-cache")
        self._compiled: set[Path] = set()

    # context ----------------------------------------------------------------------------------
    def __enter__(self) -> ScenarioRun:
        self.sampler.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.error = f"{type(exc).__name__}: {exc}"
        for server in list(self.servers.values()):
            self.stop(server)
        self.sampler.stop()
        self.elapsed = self.clock.now()
        shutil.rmtree(self.work, ignore_errors=True)

    # servers ----------------------------------------------------------------------------------
    @property
    def tls(self) -> Tls:
        if self._tls is None:
            self._tls = make_tls(self.work / "tls")
        return self._tls

    def _register(self, server: Server, **info: Any) -> Server:
        self.servers[server.name] = server
        self.sampler.add_server(server.name, server.pid)
        self.server_info[server.name] = {"kind": server.kind, "workers": server.workers, "tls": server.tls,
                                         "ready_after_s": server.ready_after_s, **info}
        self.event(f"{server.name} ready")
        return server

    def kwserver(self, name: str, config: Path, *, workers: int | None = None, tls: bool = False,
                 env: dict[str, str] | None = None, cache_dir: Path | None = None) -> Server:
        if cache_dir is None:
            self.compile_ahead(config)
        server = start_kwserver(name, config, workers=workers or self.options.workers, work_dir=self.work,
                                cache_dir=cache_dir or self.cache_dir, tls=self.tls if tls else None, env=env)
        return self._register(server, config=str(config), env=env or {})

    def checkout(self, commit: str) -> Path | None:
        """An older commit's kwserver package, extracted from git, for a server started with it on
        PYTHONPATH (`env={"PYTHONPATH": str(path)}`); None when this checkout's history lacks the commit."""
        target = self.work / f"kwserver-{commit}"
        if not target.exists():
            archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "kwserver"], capture_output=True)
            if archive.returncode != 0:
                return None
            target.mkdir(parents=True)
            subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        return target

    def compile_ahead(self, config: Path) -> None:
        """Fill the run's compile cache for `config` (`kwserver check`), so that no measured server compiles:
        a master that compiled keeps the compiler's allocations, which the first server of a run would
        carry in its memory figures."""
        if config in self._compiled:
            return
        subprocess.run([sys.executable, "-m", "kwserver", "check", "--policies", str(config)],
                       env={**os.environ, "KWSERVER_COMPILE_CACHE_DIR": str(self.cache_dir)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        self._compiled.add(config)

    def canned(self, name: str, *, workers: int | None = None, tls: bool = False,
               stack: str = "event-loop") -> Server:
        server = start_gunicorn_app(name, "canned", "bench.canned", workers=workers or self.options.workers,
                                    work_dir=self.work, tls=self.tls if tls else None, stack=stack)
        return self._register(server, stack=stack)

    def naive(self, name: str, config: Path, *, workers: int | None = None, tls: bool = False) -> Server:
        server = start_gunicorn_app(name, "naive", "bench.naive", workers=workers or self.options.workers,
                                    work_dir=self.work, tls=self.tls if tls else None,
                                    env={"BENCH_NAIVE_POLICIES": str(config)})
        return self._register(server, config=str(config))

    def stop(self, server: Server) -> None:
        self.sampler.remove_server(server.name)
        server.stop()
        self.servers.pop(server.name, None)
        self.event(f"{server.name} stopped")

    def event(self, label: str) -> None:
        self.events.append({"t": self.clock.now(), "label": label})

    # load -------------------------------------------------------------------------------------
    def preflight(self, server: Server, workload: Workload) -> Counter:
        """Send every distinct request of the workload once; record and check what the server answers."""
        expected: dict[str, str] = {}
        conn = _connection(server)
        try:
            for (url_path, obj_name), body_file in zip(workload.entries, _manifest_files(workload), strict=True):
                key = f"{url_path} {obj_name}"
                if key in expected:
                    continue
                conn.request("POST", url_path, body=Path(body_file).read_bytes(),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                expected[key] = classify(response.status, response.read())
        finally:
            conn.close()
        outcomes: Counter = Counter()
        for (url_path, obj_name) in workload.entries:
            outcomes[expected[f"{url_path} {obj_name}"]] += 1
        workload.expected = expected
        errors = {k: v for k, v in expected.items() if v.startswith("error")}
        if errors:
            self.notes.append(f"preflight of `{workload.name}` on {server.name}: {len(errors)} request kind(s) "
                              f"answered with errors, e.g. {next(iter(errors.items()))}")
        self.data.setdefault("preflight", {})[f"{server.name}/{workload.name}"] = {
            "outcomes_per_request_kind": expected, "outcome_counts_in_mix": dict(outcomes)}
        return outcomes

    def warmup(self, server: Server, workload: Workload, seconds: float | None = None,
               connections: int | None = None) -> None:
        seconds = self.options.warmup if seconds is None else seconds
        if seconds <= 0:
            return
        self.load(server, workload, label="warm-up", series="warm-up", duration=seconds,
                  connections=connections, record=False)

    def warm_every_worker(self, server: Server, workload: Workload, *, connections: int,
                          seconds: float = 1.0, max_rounds: int = 12) -> int:
        """Unmeasured load in short rounds until every worker has served some of it (so that each holds
        instances of the workload's policies); returns the rounds used (bounded by max_rounds)."""
        served: set[int] = set()
        rounds = 0

        def record() -> bool:
            for pid in server.worker_pids():
                if sampling.established_connections(pid):
                    served.add(pid)
            return True

        command = WrkCommand(url=server.url, manifest=workload.manifest, duration_s=seconds,
                             connections=connections, threads=self.options.wrk_threads)
        while rounds < max_rounds:
            rounds += 1
            run_wrk(command, on_start=self.sampler.set_load, on_exit=lambda pid: self.sampler.set_load(None),
                    probe=(PROBE_AFTER_S, record))
            if set(server.worker_pids()) <= served:
                break
        missing = set(server.worker_pids()) - served
        if missing:
            self.notes.append(f"warm-up of {server.name}: {len(missing)} worker(s) got no connection in "
                              f"{rounds} rounds")
        self.event(f"{server.name} warm ({rounds} rounds)")
        return rounds

    def load(self, server: Server, workload: Workload, *, label: str, series: str, repeat: int = 0,
             duration: float | None = None, connections: int | None = None, record: bool = True,
             extra: dict[str, Any] | None = None) -> Point:
        duration = duration or self.options.duration
        connections = connections or self.options.connections
        self.workloads[workload.name] = workload
        command = WrkCommand(url=server.url, manifest=workload.manifest, duration_s=duration,
                             connections=connections, threads=self.options.wrk_threads)
        need = min(server.workers, os.cpu_count() or 1, connections)
        rejected: list[list[int]] = []
        attempt = 0
        while True:
            attempt += 1
            probe = None
            if record and self.options.balance and need > 1 and attempt < self.options.balance_attempts:
                probe = (PROBE_AFTER_S, lambda: self._balanced(server, need, rejected))
            cpu_before = sampling.tree_cpu_seconds(server.pid)
            master_before = sampling.process_cpu_seconds(server.pid)
            machine_before = sampling.machine_busy_seconds()
            t_start = self.clock.now()
            try:
                result: WrkResult = run_wrk(command, on_start=self.sampler.set_load,
                                            on_exit=lambda pid: self.sampler.set_load(None), probe=probe)
                break
            except WrkAborted:
                continue
        t_end = self.clock.now()
        machine_busy = sampling.machine_busy_seconds() - machine_before
        balance = {"attempts": attempt, "rejected_distributions": rejected}
        if attempt >= self.options.balance_attempts and need > 1 and self.options.balance:
            self.notes.append(f"{label} ({series}, repeat {repeat}): connections still unbalanced after "
                              f"{attempt - 1} restarts; measured as they landed")
        cpu_after = sampling.tree_cpu_seconds(server.pid)
        master_cpu_s = sampling.process_cpu_seconds(server.pid) - master_before
        other = max(0.0, machine_busy - (cpu_after - cpu_before) - result.wrk_cpu_s)
        after = sampling.snapshot(server.name, server.pid, t_end)
        during = self.sampler.between(t_start, t_end, server.name)
        point = Point(
            label=label, series=series, server=server.name, kind=server.kind, transport=server.scheme,
            workload=workload.name, repeat=repeat, t_start=t_start, t_end=t_end, wrk=result.to_json(),
            rps=result.rps, latency_ms={k: v / 1000 for k, v in result.latency_us.items()},
            server_cpu_s=cpu_after - cpu_before, wrk_cpu_s=result.wrk_cpu_s, other_cpu_s=other,
            errors=result.error_count,
            non_2xx=result.non_2xx, memory=memory_summary(after), memory_during=_during(during),
            connections=_connections(during),
            extra={"balance": balance, "master_cpu_s": master_cpu_s, **(extra or {})},
        )
        if result.error_count or result.non_2xx:
            self.notes.append(f"{label} ({series}, repeat {repeat}): wrk saw {result.errors} errors, "
                              f"{result.non_2xx} non-2xx answers")
        if not record:
            self.data.setdefault("unmeasured_spans", []).append([t_start, t_end, label])
        if record:
            self.points.append(point)
            log.info("%-10s %-28s %-6s r%d: %8.0f req/s  p50 %.2f ms  p99 %.2f ms  server %.2f ms/req  "
                     "PSS %.1f MiB", self.name, label, series, repeat, point.rps, point.latency_ms["p50"],
                     point.latency_ms["p99"], point.server_cpu_ms_per_request, point.memory["pss"] / MIB)
        return point

    def _balanced(self, server: Server, need: int, rejected: list[list[int]]) -> bool:
        counts = sorted((sampling.established_connections(pid) for pid in server.worker_pids()), reverse=True)
        if sum(1 for n in counts if n > 0) >= need:
            return True
        rejected.append(counts)
        return False

    # results ----------------------------------------------------------------------------------
    def headline(self, figure: str, value: str, raw: str = "", **numbers: Any) -> None:
        self.headlines.append({"figure": figure, "value": value, "raw": raw, "numbers": numbers})

    def select(self, *, label: str | None = None, series: str | None = None) -> list[Point]:
        return [p for p in self.points
                if (label is None or p.label == label) and (series is None or p.series == series)]


def _connection(server: Server) -> http.client.HTTPConnection:
    if server.tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection("127.0.0.1", server.port, timeout=30, context=context)
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)


def _manifest_files(workload: Workload) -> list[str]:
    return [line.split("\t", 1)[1] for line in workload.manifest.read_text().splitlines() if line]


def _during(samples: list[sampling.Sample]) -> dict[str, float]:
    by_t: dict[float, dict[str, int]] = {}
    for s in samples:
        totals = by_t.setdefault(s.t, {"pss": 0, "uss": 0, "rss": 0})
        totals["pss"] += s.pss
        totals["uss"] += s.uss
        totals["rss"] += s.rss
    if not by_t:
        return {}
    return {key: statistics.median(t[key] for t in by_t.values()) for key in ("pss", "uss", "rss")}


def _connections(samples: list[sampling.Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        if s.role == "worker" and s.connections >= 0:
            out[str(s.pid)] = max(out.get(str(s.pid), 0), s.connections)
    return out
