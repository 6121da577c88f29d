"""The `chaos` scenario: the ten-policy mix under load while faults are injected on a schedule.

Clients (threads of this process, keep-alive connections) send the realistic mix over the ten-policy config
plus one context-aware policy (it lists ConfigMaps from a local Kubernetes API, through a proxy that can
stall). Every answer is checked against the answer the server gave before the faults (same outcome, same
uid). Faults: worker SIGKILLs, SIGHUP storms, a client that pipelines and never reads, a burst of
short connections, thousands of silent connections, half-sent requests on the readiness and metrics
listeners, garbage bytes, a stalled cluster API, and a compile cache damaged before a reload that
must load from it. A failed request is attributed to a killed worker when its connection was one the
worker held at the kill and it was in flight then.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import random
import selectors
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import wasmtime
import yaml

from bench import workloads as wl
from bench.harness import ScenarioRun
from bench.stats import linear_fit
from bench.steps import scenario, ten_policy_config, workdir

CLIENTS = 6
KIB = 1024
NAMESPACE = "chaos"
# What "the memory does not grow" means here, per 10,000 requests, once the workers are warm: the soak
# (bench/results/soak) measures +3 KiB per 10,000 over 200,000 requests; a stretch between faults is about a
# tenth of that, so its fit is noisier and the bound wider.
MEMORY_SLOPE_BOUND_KIB_PER_10K = 64.0
# Memory after a fault is not fitted for this long: new workers (kills, reloads) build their instances.
SETTLE_SECONDS = 5.0


@dataclass
class Outcome:
    t0: float
    t1: float
    port: int  # the client's local port: which connection
    ok: bool
    what: str  # "ok", "wrong: ...", "error: ..."


# --- load ---------------------------------------------------------------------------------------------

class Clients:
    """Keep-alive clients sending the requests in a loop; every answer checked against the expected one."""

    def __init__(self, port: int, requests: list[tuple[str, bytes, str, str]], clock: Any):
        self.port, self.requests, self.clock = port, requests, clock  # (path, body, expected outcome, uid)
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, index: int) -> None:
        connection: http.client.HTTPConnection | None = None
        position = index * 97
        while not self.stop.is_set():
            path, body, expected, uid = self.requests[position % len(self.requests)]
            position += 1
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            t0, port = self.clock.now(), 0
            try:
                if connection.sock is None:
                    connection.connect()
                port = connection.sock.getsockname()[1]
                connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
                got = wl.classify(response.status, answer)
                answered_uid = orjson.loads(answer).get("response", {}).get("uid") if response.status == 200 else None
                if got == expected and answered_uid == uid:
                    outcome = Outcome(t0, self.clock.now(), port, True, "ok")
                else:
                    outcome = Outcome(t0, self.clock.now(), port, False,
                                      f"wrong: {path} answered {got} (uid {answered_uid!r}), expected {expected}")
                if response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                outcome = Outcome(t0, self.clock.now(), port, False, f"error: {type(exc).__name__}: {exc}"[:200])
                connection.close()
                connection = None
            self.outcomes.append(outcome)


# --- the stalling cluster API ---------------------------------------------------------------------------

class StallingProxy:
    """A TCP proxy in front of the Kubernetes API; `stalled` holds every byte both ways until cleared."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stalled = threading.Event()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        with contextlib.closing(client), contextlib.closing(upstream), selector:
            while not self.closing:
                if self.stalled.is_set():
                    time.sleep(0.05)
                    continue
                for key, _ in selector.select(0.2):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)

    def close(self) -> None:
        self.closing = True
        self.listener.close()


# --- faults -------------------------------------------------------------------------------------------

class Faults:
    def __init__(self, run: ScenarioRun, server: Any, proxy: StallingProxy, config: Path, cache: Path,
                 module_switch: tuple[str, str, str]):
        self.run, self.server, self.proxy, self.config, self.cache = run, server, proxy, config, cache
        self.switch_policy, self.original_module, self.copied_module = module_switch
        self.kills: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.held: list[socket.socket] = []
        self.random = random.Random(24)

    def mark(self, label: str) -> None:
        self.run.event(label)
        self.log.append({"t": self.run.clock.now(), "fault": label})

    def workers(self) -> list[psutil.Process]:
        found = []
        for child in psutil.Process(self.server.pid).children():
            with contextlib.suppress(psutil.Error):  # a killed worker not reaped yet
                if child.status() != psutil.STATUS_ZOMBIE and "cluster" not in " ".join(child.cmdline()):
                    found.append(child)
        return found

    def kill_worker(self) -> None:
        workers = self.workers()
        victim = self.random.choice(workers)
        ports = self._client_ports(victim)
        victim.send_signal(signal.SIGKILL)
        t = self.run.clock.now()
        # A connection the victim accepted between the snapshot and the kill is in none of these sets; one a
        # surviving worker holds is not the kill's.
        survivors = set().union(*(self._client_ports(w) for w in workers if w.pid != victim.pid))
        self.kills.append({"t": t, "pid": victim.pid, "ports": ports, "survivor_ports": survivors})
        self.mark(f"SIGKILL worker {victim.pid}")

    def _client_ports(self, worker: psutil.Process) -> set[int]:
        try:
            return {c.raddr.port for c in worker.net_connections(kind="tcp")
                    if c.raddr and c.laddr.port == self.server.port}
        except psutil.Error:
            return set()

    def sighup_storm(self) -> None:
        self.mark("SIGHUP storm (8 in 2 s)")
        for _ in range(8):
            os.kill(self.server.pid, signal.SIGHUP)
            time.sleep(0.25)

    def pipeline_without_reading(self, seconds: float = 20) -> None:
        self.mark("client pipelining 3 MB answers, never reading")
        review = orjson.loads(wl.mix_objects()[0].body())
        review["request"]["uid"] = "u" * 2_500_000
        body = orjson.dumps(review)
        head = (b"POST /validate/clusterwide-no-privileged-pod HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock = socket.create_connection(("127.0.0.1", self.server.port))
        sock.settimeout(2)
        with contextlib.suppress(OSError):
            for _ in range(40):
                sock.sendall(head + body)
        time.sleep(seconds)
        sock.close()

    def connection_burst(self, count: int = 1000) -> None:
        self.mark(f"burst of {count} short connections")
        for _ in range(count):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.server.port), timeout=5).close()

    def silent_connections(self, count: int = 2500, seconds: float = 20) -> None:
        self.mark(f"{count} silent connections for {seconds:.0f} s")
        held = []
        for _ in range(count):
            with contextlib.suppress(OSError):
                held.append(socket.create_connection(("127.0.0.1", self.server.port), timeout=5))
        time.sleep(seconds)
        for sock in held:
            sock.close()

    def half_sent_probes(self, count: int = 300, seconds: float = 10) -> None:
        self.mark(f"{count} half-sent requests on the readiness and metrics listeners")
        held = []
        for port in (self.server.readiness_port, self.run.data["metrics_port"]):
            for _ in range(count // 2):
                with contextlib.suppress(OSError):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    sock.sendall(b"GET /readiness HTTP/1.1\r\nHost: x\r\n")
                    held.append(sock)
        time.sleep(seconds)
        for sock in held:
            sock.close()

    def garbage(self, count: int = 300) -> None:
        self.mark(f"{count} connections sending random bytes")
        for _ in range(count):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.server.port),
                                                                       timeout=2) as sock:
                sock.sendall(self.random.randbytes(self.random.randint(1, 4096)))
                with contextlib.suppress(OSError):
                    sock.recv(4096)

    def stall_cluster_api(self, seconds: float = 30) -> None:
        self.mark(f"cluster API stalled for {seconds:.0f} s")
        self.proxy.stalled.set()
        time.sleep(seconds)
        self.proxy.stalled.clear()
        self.mark("cluster API back")

    def damaged_cache_reload(self) -> None:
        """Damage every compiled artifact, then reload a config that names one module by another path: the
        master looks it up in the cache (same digest), finds it damaged, compiles it again."""
        for artifact in self.cache.rglob("*.cwasm"):
            data = bytearray(artifact.read_bytes())
            data[len(data) // 3:len(data) // 3 + 4096] = os.urandom(4096)
            artifact.write_bytes(bytes(data))
        doc = yaml.safe_load(self.config.read_text())
        current = doc[self.switch_policy]["module"]
        doc[self.switch_policy]["module"] = self.copied_module if current == self.original_module \
            else self.original_module
        self.config.write_text(yaml.safe_dump(doc))
        self.mark("compile cache damaged, reload naming a module anew")
        os.kill(self.server.pid, signal.SIGHUP)


# --- the scenario ---------------------------------------------------------------------------------------

def chaos_config(run: ScenarioRun, directory: Path) -> tuple[Path, tuple[str, str, str]]:
    from bench.context_aware import list_policy_wat
    from tests.support.modules import annotated

    ten = ten_policy_config(run)
    doc = yaml.safe_load(ten.path.read_text())
    for entry in doc.values():
        module = entry.get("module")
        if module and "://" not in module and not os.path.isabs(module):
            entry["module"] = str((ten.path.parent / module).resolve())
    payload = orjson.dumps({"api_version": "v1", "kind": "ConfigMap", "namespace": NAMESPACE})
    doc["context-configmaps"] = {
        "module": annotated(directory, "list-configmaps", wasmtime.wat2wasm(list_policy_wat(payload)),
                            "kubewarden-wapc", protocolVersion="v1"),
        "contextAwareResources": [{"apiVersion": "v1", "kind": "ConfigMap"}], "timeoutEvalSeconds": 5}
    switch = next(name for name, entry in doc.items() if "module" in entry and name != "context-configmaps")
    original = doc[switch]["module"]
    copied = directory / ("copy-" + Path(original).name)
    shutil.copyfile(original, copied)
    path = directory / "policies-chaos.yml"
    path.write_text(yaml.safe_dump(doc))
    return path, (switch, original, str(copied))


@scenario("chaos", "the ten-policy mix while faults are injected",
          __doc__.split("\n\n", 1)[1].replace("\n", " ").strip()
          + " Runs about five minutes (`--duration` scales the schedule: 60 s per unit of the default 4 s).")
def chaos(run: ScenarioRun) -> None:
    from tests.support.kube_api import KubeApi

    d = workdir(run, "chaos")
    api = KubeApi(d).start()
    api.put("v1", "Namespace", NAMESPACE)
    for i in range(20):
        api.put("v1", "ConfigMap", f"config-{i}", NAMESPACE, data={"key": f"value-{i}"})
    proxy = StallingProxy(int(api.url.rsplit(":", 1)[1]))
    kubeconfig = api.kubeconfig(d / "kubeconfig")
    kube = yaml.safe_load(kubeconfig.read_text())
    kube["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    kubeconfig.write_text(yaml.safe_dump(kube))
    config, switch = chaos_config(run, d)
    cache = d / "compile-cache"
    cache.mkdir(mode=0o700)
    metrics_port = _free_port()
    run.data["metrics_port"] = metrics_port
    server = run.kwserver("kwserver-chaos", config, workers=2, cache_dir=cache, env={
        "KUBECONFIG": str(kubeconfig), "KWSERVER_METRICS_PORT": str(metrics_port),
        "KWSERVER_SEND_TIMEOUT_SECONDS": "5", "KUBEWARDEN_LOG_LEVEL": "warn"})
    mix = wl.mix_workload(d, "chaos-mix", config, "realistic mix over the ten-policy config")
    requests = _requests(server, mix)
    faults = Faults(run, server, proxy, config, cache, switch)
    scale = run.options.duration / 4.0
    schedule: list[tuple[float, Any]] = [
        (20, faults.kill_worker), (35, faults.sighup_storm), (55, faults.pipeline_without_reading),
        (80, faults.connection_burst), (95, faults.silent_connections), (125, faults.stall_cluster_api),
        (165, faults.damaged_cache_reload), (185, faults.kill_worker), (200, faults.half_sent_probes),
        (215, faults.sighup_storm), (235, faults.garbage), (250, faults.kill_worker),
    ]
    end = 285 * scale
    clients = Clients(server.port, requests, run.clock)
    start = run.clock.now()
    initial_workers = {p.pid for p in faults.workers()}
    seen_workers = set(initial_workers)
    run.event("load starts")
    clients.start()
    running: list[threading.Thread] = []
    try:
        for at, fault in schedule:
            while run.clock.now() - start < at * scale:
                seen_workers |= {p.pid for p in faults.workers()}
                time.sleep(0.2)
            thread = threading.Thread(target=fault, daemon=True)
            thread.start()
            running.append(thread)
        while run.clock.now() - start < end:
            seen_workers |= {p.pid for p in faults.workers()}
            time.sleep(0.2)
    finally:
        clients.finish()
        for thread in running:
            thread.join(60)
        run.event("load stops")
        alive = server.process.poll() is None
        log = server.log()
        run.stop(server)
        proxy.close()
        api.stop()
    _report(run, clients.outcomes, faults, start, alive, log, len(seen_workers - initial_workers))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _requests(server: Any, mix: wl.Workload) -> list[tuple[str, bytes, str, str]]:
    """The mix (and the context-aware policy with every object), each with the answer it gets now."""
    bodies = {obj.name: obj.body() for obj in wl.mix_objects()}
    entries = list(mix.entries) + [("/validate/context-configmaps", name) for name in list(bodies)[:4]]
    expected: dict[tuple[str, str], str] = {}
    for path, name in entries:
        if (path, name) not in expected:
            for _ in range(50):  # the cluster cache lists the ConfigMaps on first use
                status, answer = server.post(path, bodies[name])
                expected[(path, name)] = wl.classify(status, answer)
                if not expected[(path, name)].startswith("error"):
                    break
                time.sleep(0.2)
    failing = {k: v for k, v in expected.items() if v.startswith("error")}
    if failing:
        raise RuntimeError(f"answers before any fault are errors: {failing}")
    return [(path, bodies[name], expected[(path, name)], orjson.loads(bodies[name])["request"]["uid"])
            for path, name in entries]


def _report(run: ScenarioRun, outcomes: list[Outcome], faults: Faults, start: float, alive: bool, log: str,
            restarts: int) -> None:
    failed = [o for o in outcomes if not o.ok]
    on_killed, in_flight = [], []
    for outcome in failed:
        for kill in faults.kills:
            victims = outcome.port in kill["ports"] or (
                outcome.what.startswith("error") and outcome.port not in kill["survivor_ports"])
            if victims and outcome.t0 <= kill["t"] + 1.0 and outcome.t1 >= kill["t"]:
                on_killed.append(outcome)
                if outcome.t0 <= kill["t"]:
                    in_flight.append(outcome)
                break
    other = [o for o in failed if o not in on_killed]
    sent, correct = len(outcomes), sum(o.ok for o in outcomes)
    wrong = [o for o in failed if o.what.startswith("wrong")]
    # Memory: total USS of the server's processes per sample, fitted against requests answered by then.
    totals: dict[float, float] = {}
    for sample in run.sampler.samples:
        if sample.server == "kwserver-chaos" and sample.t >= start + 10:
            totals[sample.t] = totals.get(sample.t, 0.0) + sample.uss / KIB
    ends = sorted(o.t1 for o in outcomes)
    xs, ys = [], []
    for t in sorted(totals):
        xs.append(float(_count_until(ends, t)))
        ys.append(totals[t])
    fit = linear_fit(xs, ys) if len(xs) > 2 else None
    stretches = _stretches(sorted(totals), xs, ys, [f["t"] for f in faults.log], start)
    last = stretches[-1] if stretches else None
    slope = last["slope_kib_per_10k"] if last else float("nan")
    seconds = (max(ends) - start) if ends else 0.0
    latencies = sorted((o.t1 - o.t0) * 1000 for o in outcomes if o.ok)
    run.data["chaos"] = {
        "requests_sent": sent, "answered_correctly": correct, "failed": len(failed),
        "failed_in_flight_on_a_killed_worker": len(in_flight),
        "failed_on_a_killed_workers_connection_after_the_kill": len(on_killed) - len(in_flight),
        "failed_otherwise": len(other), "wrong_answers": len(wrong),
        "failures": [{"t": round(o.t0 - start, 3), "port": o.port, "what": o.what,
                      "on_killed_worker": o in on_killed} for o in failed],
        "worker_restarts": restarts, "worker_kills": len(faults.kills), "server_alive_at_end": alive,
        "memory_slope_after_the_last_fault_kib_per_10k_requests": slope,
        "memory_slope_bound_kib_per_10k": MEMORY_SLOPE_BOUND_KIB_PER_10K,
        "memory_slope_whole_run_kib_per_10k_requests": fit.slope * 10_000 if fit else float("nan"),
        "memory_stretches_between_faults": stretches,
        "uss_mib_first_last": [ys[0] / KIB, ys[-1] / KIB] if ys else [],
        "seconds": seconds, "requests_per_second": sent / seconds if seconds else 0.0,
        "latency_ms_p50_p99": [_quantile(latencies, 0.5), _quantile(latencies, 0.99)],
        "faults": faults.log, "tracebacks_in_log": log.count("Traceback"),
    }
    run.data["fits"] = [{"file": "uss_vs_requests.png", "title": "total USS (master, workers, cluster cache) vs "
                         "requests answered", "x_label": "requests answered", "y_label": "total USS (KiB)",
                         "xs": xs, "ys": ys, "slope_unit": "KiB/request", **(fit.to_json() if fit else {})}]
    run.headline("chaos: requests sent / answered correctly / failed", f"{sent:,} / {correct:,} / {len(failed):,}",
                 f"{len(in_flight)} failed in flight on a killed worker, {len(on_killed) - len(in_flight)} sent on a "
                 f"killed worker's connection before the client saw it close, {len(other)} otherwise "
                 f"({len(wrong)} wrong answers); {len(faults.kills)} workers killed, {restarts} workers started "
                 f"(kills, reloads); server alive at the end: {alive}",
                 sent=sent, correct=correct, failed=len(failed), in_flight=len(in_flight), other=len(other))
    within = slope <= MEMORY_SLOPE_BOUND_KIB_PER_10K
    run.headline("chaos: memory slope after the last fault (total USS vs requests, workers warm)",
                 f"{slope:+.1f} KiB per 10,000 requests ({'within' if within else 'OUTSIDE'} the bound, "
                 f"+{MEMORY_SLOPE_BOUND_KIB_PER_10K:.0f})",
                 (f"{last['requests']:,} requests from {last['from_s']:.0f} s to {last['to_s']:.0f} s; USS "
                  f"{ys[0] / KIB:.1f} MiB at the start, {ys[-1] / KIB:.1f} MiB at the end of the run (faults step it: "
                  "see the table of stretches and chaos.png)") if last else "",
                 slope_kib_per_10k=slope)
    run.tables.append((
        f"Total USS between faults (fitted from {SETTLE_SECONDS:.0f} s after one fault to the next)",
        ["from (s)", "to (s)", "requests", "USS at start (MiB)", "slope (KiB per 10,000 requests)"],
        [[f"{s['from_s']:.0f}", f"{s['to_s']:.0f}", f"{s['requests']:,}", f"{s['uss_mib_start']:.1f}",
          f"{s['slope_kib_per_10k']:+.1f}"] for s in stretches]))
    run.tables.append(("Faults injected (seconds after the load started)", ["t (s)", "fault"],
                       [[f"{f['t'] - start:.1f}", f["fault"]] for f in faults.log]))
    if failed:
        run.tables.append(("Failed requests", ["t (s)", "on a killed worker's connection", "what"],
                           [[f"{o.t0 - start:.2f}", "yes" if o in on_killed else "no", o.what]
                            for o in failed[:50]]))
    if outcomes:
        run.data["lines"] = [_timeline(outcomes, faults, start, totals)]


def _stretches(times: list[float], xs: list[float], ys: list[float], faults: list[float],
               start: float) -> list[dict[str, float]]:
    """Memory fitted against requests in each stretch between two faults (after settling)."""
    found = []
    bounds = [*faults, times[-1] + 1] if times else []
    for begin, end in itertools.pairwise(bounds):
        points = [(x, y) for t, x, y in zip(times, xs, ys, strict=True) if begin + SETTLE_SECONDS <= t < end]
        if len(points) >= 10 and points[-1][0] > points[0][0]:
            fit = linear_fit([p[0] for p in points], [p[1] for p in points])
            found.append({"from_s": begin - start, "to_s": end - start, "requests": int(points[-1][0] - points[0][0]),
                          "uss_mib_start": points[0][1] / KIB, "slope_kib_per_10k": fit.slope * 10_000})
    return found


def _count_until(ends: list[float], t: float) -> int:
    import bisect

    return bisect.bisect_right(ends, t)


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _timeline(outcomes: list[Outcome], faults: Faults, start: float, totals: dict[float, float]) -> dict[str, Any]:
    """Answers and failures per second, p99 latency and memory, with every fault marked (report.plot_lines)."""
    end = max(o.t1 for o in outcomes)
    width = int(end - start) + 1
    correct, failed = [0] * width, [0] * width
    latencies: list[list[float]] = [[] for _ in range(width)]
    for o in outcomes:
        second = min(width - 1, max(0, int(o.t1 - start)))
        if o.ok:
            correct[second] += 1
            latencies[second].append((o.t1 - o.t0) * 1000)
        else:
            failed[second] += 1
    p99 = [_quantile(sorted(values), 0.99) if values else 0.0 for values in latencies]
    return {"file": "chaos.png", "title": "answers per second, p99 latency and total USS; dashed: each fault",
            "x_label": "seconds since the load started",
            "series": {"answered correctly /s": list(enumerate(correct)), "failed /s": list(enumerate(failed)),
                       "p99 latency (ms)": list(enumerate(p99)),
                       "total USS (MiB)": [(t - start, totals[t] / KIB) for t in sorted(totals)]},
            "marks": [(f["t"] - start, f["fault"]) for f in faults.log]}
