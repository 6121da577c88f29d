"""The `context` scenario: a context-aware policy served from the one cluster cache of the server.

A local HTTPS Kubernetes API (tests/support/kube_api.py) holds `OBJECTS` ConfigMaps; a waPC policy lists them all
(`list_resources_by_namespace`, 4 MB of JSON per call) on every request, copies the answer into its memory
and accepts. Measured: total PSS (master + workers + cluster cache) at 1 and 4 workers before and after the
cache loaded, the latency of the list call through a worker's proxy (CacheProxy on the cache's socket),
requests/s of the context-aware policy vs pod-privileged in the same run, and the cost of importing
lightkube in a fresh process.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import wasmtime
import yaml

from bench import workloads as wl
from bench.harness import MIB, ScenarioRun
from bench.sampler import snapshot
from bench.stats import fmt
from bench.steps import scenario

OBJECTS = 10_000
NAMESPACE = "bench"
LIST_CALLS = 300
CONFIGMAPS = [{"apiVersion": "v1", "kind": "ConfigMap"}]
_VALID, _ACCEPT, _REJECT = '{"valid":true}', '{"accepted":true}', '{"accepted":false,"message":"host call failed"}'


def list_policy_wat(payload: bytes) -> str:
    """validate: one host call, the answer copied into memory (grown only when needed), accept."""
    texts = {0: "kubewarden", 64: "kubernetes", 128: "list_resources_by_namespace", 4096: _VALID,
             4128: _ACCEPT, 4160: _REJECT, 1024: payload.decode()}
    data = "\n".join(f'  (data (i32.const {at}) "{_wat(text)}")' for at, text in texts.items())
    n = {at: len(text.encode()) for at, text in texts.items()}
    return f"""(module
  (import "wapc" "__guest_response" (func $respond (param i32 i32)))
  (import "wapc" "__host_call" (func $host_call (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wapc" "__host_response_len" (func $response_len (result i32)))
  (import "wapc" "__host_response" (func $response (param i32)))
  (memory (export "memory") 2)
{data}
  (func (export "__guest_call") (param $op_len i32) (param $msg_len i32) (result i32) (local $need i32)
    (if (i32.eq (local.get $op_len) (i32.const 17))
      (then (call $respond (i32.const 4096) (i32.const {n[4096]})) (return (i32.const 1))))
    (if (call $host_call (i32.const 0) (i32.const {n[0]}) (i32.const 64) (i32.const {n[64]})
                         (i32.const 128) (i32.const {n[128]}) (i32.const 1024) (i32.const {n[1024]}))
      (then
        (local.set $need (i32.sub (i32.add (i32.shr_u (i32.add (call $response_len) (i32.const 65535))
                                                      (i32.const 16)) (i32.const 1)) (memory.size)))
        (if (i32.gt_s (local.get $need) (i32.const 0)) (then (drop (memory.grow (local.get $need)))))
        (call $response (i32.const 65536))
        (call $respond (i32.const 4128) (i32.const {n[4128]})))
      (else (call $respond (i32.const 4160) (i32.const {n[4160]}))))
    (i32.const 1)))"""


def _wat(text: str) -> str:
    return "".join(c if c.isalnum() or c in " {}:,._-/" else f"\\{ord(c):02x}" for c in text)


def fill(api: Any) -> None:
    api.put("v1", "Namespace", NAMESPACE)
    for i in range(OBJECTS):
        api.put("v1", "ConfigMap", f"config-{i:05d}", NAMESPACE,
                metadata={"labels": {"app": f"app-{i % 50}", "tier": "backend"},
                          "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}" * 100}},
                data={"setting": f"value-{i}", "endpoint": f"https://service-{i % 97}.{NAMESPACE}.svc:8443",
                      "flags": "alpha,beta,gamma"})


def config(directory: Path, pod_privileged: str) -> Path:
    from tests.support.modules import annotated

    payload = json.dumps({"api_version": "v1", "kind": "ConfigMap", "namespace": NAMESPACE}).encode()
    module = annotated(directory, "list-configmaps", wasmtime.wat2wasm(list_policy_wat(payload)),
                       "kubewarden-wapc", protocolVersion="v1")
    path = directory / "policies-context.yml"
    path.write_text(yaml.safe_dump({
        "context": {"module": module, "contextAwareResources": CONFIGMAPS, "timeoutEvalSeconds": 10,
                    "hostCapabilities": ["kubernetes/list_resources_by_namespace"]},
        "plain": {"module": pod_privileged},
    }))
    return path


def pss_mib(server: Any) -> dict[str, float]:
    """Total PSS and its parts: master, workers, cluster cache."""
    parts = {"total": 0.0, "master": 0.0, "workers": 0.0, "cache": 0.0}
    for sample in snapshot(server.name, server.pid):
        try:
            cache = "cluster cache" in " ".join(psutil.Process(sample.pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        part = "master" if sample.role == "master" else "cache" if cache else "workers"
        parts[part] += sample.pss / MIB
        parts["total"] += sample.pss / MIB
    return parts


def cache_socket(server: Any) -> str:
    for child in psutil.Process(server.pid).children(recursive=True):
        if "cluster cache" in " ".join(child.cmdline()):
            for connection in child.net_connections(kind="unix"):
                if str(connection.laddr).endswith("cache.sock"):
                    return connection.laddr
    raise RuntimeError(f"{server.name} has no cluster cache process")


def proxy_latency_ms(path: str) -> list[float]:
    from kwserver.cluster.cache_proxy import CacheProxy

    proxy, times = CacheProxy(path), []
    for _ in range(LIST_CALLS):
        started = time.perf_counter()
        proxy.list("v1", "ConfigMap", NAMESPACE, None, None, 10.0)
        times.append((time.perf_counter() - started) * 1000)
    proxy.close()
    return times


def lightkube_import_cost() -> dict[str, float]:
    probe = ("import time, psutil; p = psutil.Process(); r = p.memory_info().rss; t = time.perf_counter();"
             "import lightkube.config.kubeconfig, lightkube.config.client_adapter;"
             "print(time.perf_counter() - t, (p.memory_info().rss - r) / 1048576)")
    runs = [tuple(map(float, subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                            check=True).stdout.split())) for _ in range(5)]
    return {"seconds": statistics.median(r[0] for r in runs), "rss_mib": statistics.median(r[1] for r in runs)}


def wait_loaded(server: Any, workload: wl.Workload, run: ScenarioRun) -> None:
    outcomes = run.preflight(server, workload)
    if set(outcomes) != {"accept"}:
        raise RuntimeError(f"{server.name} answered {dict(outcomes)} to {workload.name}")


@scenario("context", "a context-aware policy served from the server's one cluster cache",
          "A waPC policy lists 10,000 ConfigMaps (from a local HTTPS Kubernetes API) on every request: total PSS "
          "at 1 and 4 workers with the cache empty and loaded, list latency through the worker proxy, req/s "
          "against pod-privileged in the same server, lightkube import cost.")
def context(run: ScenarioRun) -> None:
    from tests.support.kube_api import KubeApi

    work = run.work / "context"
    work.mkdir(parents=True, exist_ok=True)
    api = KubeApi(work).start()
    try:
        fill(api)
        env = {"KUBECONFIG": str(api.kubeconfig(work / "kubeconfig"))}
        policies = config(work, str(Path(wl.__file__).resolve().parent.parent / "tests/policies/pod-privileged.wasm"))
        context_load = wl.single_request(work, "pod-context", "context", wl.POD_UNPRIVILEGED,
                                         f"5.4 KB Pod to a policy that lists {OBJECTS} ConfigMaps")
        plain_load = wl.single_request(work, "pod-plain", "plain", wl.POD_UNPRIVILEGED, "5.4 KB Pod, pod-privileged")
        memory: dict[str, dict[str, dict[str, float]]] = {}
        latency: list[float] = []
        for workers in (1, 4):
            server = run.kwserver(f"context-{workers}w", policies, workers=workers, env=env)
            time.sleep(1.0)
            before = pss_mib(server)
            wait_loaded(server, context_load, run)
            run.warm_every_worker(server, context_load, connections=workers * 2)
            time.sleep(1.0)
            memory[f"{workers}"] = {"without_cache": before, "with_cache": pss_mib(server)}
            if workers == 1:
                latency = proxy_latency_ms(cache_socket(server))
            run.stop(server)
        server = run.kwserver("context-rps", policies, workers=run.options.workers, env=env)
        wait_loaded(server, context_load, run)
        for workload, label in ((context_load, "context-aware"), (plain_load, "plain")):
            run.warm_every_worker(server, workload, connections=run.options.connections)
            run.load(server, workload, label=label, series="rps")
        run.stop(server)
    finally:
        api.stop()
    ordered = sorted(latency)
    median, p99 = statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]
    rps = {label: statistics.median(p.rps for p in run.select(series="rps", label=label))
           for label in ("context-aware", "plain")}
    imports = lightkube_import_cost()
    run.data["context"] = {"objects": OBJECTS, "pss": memory, "list_latency_ms": latency, "rps": rps,
                           "lightkube_import": imports}
    rows = []
    for w, m in memory.items():
        empty, full = m["without_cache"], m["with_cache"]
        rows.append([w, fmt(empty["total"], 1), fmt(full["total"], 1), fmt(full["total"] - empty["total"], 1),
                     *(f"{fmt(empty[part], 1)} → {fmt(full[part], 1)}" for part in ("master", "workers", "cache"))])
    run.tables.append(("PSS (master + workers + cluster cache), MiB", [
        "workers", "cache empty", f"{OBJECTS} objects cached", "cost", "master", "workers", "cluster cache"], rows))
    run.headline("PSS of a 10,000-object cache", ", ".join(
        f"{w} worker(s): +{m['with_cache']['total'] - m['without_cache']['total']:.1f} MiB"
        for w, m in memory.items()),
        **{f"cost_{w}w_mib": m["with_cache"]["total"] - m["without_cache"]["total"] for w, m in memory.items()})
    run.headline(f"list of {OBJECTS} ConfigMaps through the worker proxy", f"median {median:.2f} ms, p99 {p99:.2f} ms",
                 median_ms=median, p99_ms=p99)
    run.headline("context-aware vs plain policy", f"{rps['context-aware']:.0f} vs {rps['plain']:.0f} req/s",
                 **rps)
    cost = f"{imports['seconds'] * 1000:.0f} ms, {imports['rss_mib']:.1f} MiB RSS"
    run.headline("lightkube import per process", cost, **imports)
