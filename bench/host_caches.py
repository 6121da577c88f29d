"""The `caches` scenario: what policies can make the server remember.

Two measurements against a local HTTPS Kubernetes API (tests/support/kube_api.py):

- **Distinct lookups.** The API holds LOOKUPS ConfigMaps; a waPC policy calls `get_resource` on the one a
  request names (digits the guest copies from the request into its payload), so every request is a new
  answer to cache. Total PSS (master + workers + cluster cache) after a warm-up and after LOOKUPS distinct
  lookups, for this build and for the base commit BASE_COMMIT (its `get_resource` / `can_i` answers were
  dropped only when the same name was asked again), run from a `git archive` of it on PYTHONPATH.
- **Field masks.** The API holds OBJECTS Pods; a policy lists them all, once with `field_masks:
  [spec.containers.image]` and once without. PSS of the cluster cache process with the list loaded.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import wasmtime
import yaml

from bench.context_aware import _wat, pss_mib
from bench.harness import ScenarioRun
from bench.servers import Server, free_port
from bench.stats import fmt
from bench.steps import scenario

BASE_COMMIT = "4ecc251"
LOOKUPS = 100_000
OBJECTS = 10_000
NAMESPACE = "bench"
CLIENTS = 4
DIGITS = 6
NAME_AT = len('{"request":{"n":"')  # where the guest finds the name's digits in the ValidationRequest
MASK = ["spec.containers.image"]
PODS = [{"apiVersion": "v1", "kind": "Pod"}]
CONFIGMAPS = [{"apiVersion": "v1", "kind": "ConfigMap"}]
_VALID, _ACCEPT, _REJECT = '{"valid":true}', '{"accepted":true}', '{"accepted":false,"message":"host call failed"}'


def host_call_policy_wat(operation: str, payload: bytes, copy_to: int | None = None) -> str:
    """validate: one Kubernetes host call, then accept (reject when it failed). With `copy_to`, the DIGITS
    bytes of the request at NAME_AT are first copied into the payload at that offset."""
    texts = {0: "kubewarden", 64: "kubernetes", 128: operation, 4096: _VALID, 4128: _ACCEPT, 4160: _REJECT,
             1024: payload.decode()}
    data = "\n".join(f'  (data (i32.const {at}) "{_wat(text)}")' for at, text in texts.items())
    n = {at: len(text.encode()) for at, text in texts.items()}
    copy = "" if copy_to is None else f"""
    (call $request (i32.const 8192) (i32.const 16384))
    (memory.copy (i32.const {1024 + copy_to}) (i32.const {16384 + NAME_AT}) (i32.const {DIGITS}))"""
    return f"""(module
  (import "wapc" "__guest_request" (func $request (param i32 i32)))
  (import "wapc" "__guest_response" (func $respond (param i32 i32)))
  (import "wapc" "__host_call" (func $host_call (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
{data}
  (func (export "__guest_call") (param $op_len i32) (param $msg_len i32) (result i32)
    (if (i32.eq (local.get $op_len) (i32.const 17))
      (then (call $respond (i32.const 4096) (i32.const {n[4096]})) (return (i32.const 1)))){copy}
    (if (call $host_call (i32.const 0) (i32.const {n[0]}) (i32.const 64) (i32.const {n[64]})
                         (i32.const 128) (i32.const {n[128]}) (i32.const 1024) (i32.const {n[1024]}))
      (then (call $respond (i32.const 4128) (i32.const {n[4128]})))
      (else (call $respond (i32.const 4160) (i32.const {n[4160]}))))
    (i32.const 1)))"""


def module(directory: Path, name: str, wat: str) -> str:
    from tests.support.modules import annotated

    return annotated(directory, name, wasmtime.wat2wasm(wat), "kubewarden-wapc", policyType="raw",
                     protocolVersion="v1")


def write_config(directory: Path, name: str, policies: dict[str, Any]) -> Path:
    path = directory / f"policies-{name}.yml"
    path.write_text(yaml.safe_dump(policies))
    return path


# --- distinct lookups --------------------------------------------------------------------------------

def lookup_config(directory: Path) -> Path:
    payload = json.dumps({"api_version": "v1", "kind": "ConfigMap", "name": "cm-" + "0" * DIGITS,
                          "namespace": NAMESPACE, "disable_cache": False}, separators=(",", ":")).encode()
    copy_to = payload.index(b"cm-") + 3
    return write_config(directory, "lookups", {"lookup": {
        "module": module(directory, "lookup", host_call_policy_wat("get_resource", payload, copy_to)),
        "contextAwareResources": CONFIGMAPS, "hostCapabilities": ["kubernetes/get_resource"],
        "timeoutEvalSeconds": 10}})


def fill_configmaps(api: Any, count: int) -> None:
    api.put("v1", "Namespace", NAMESPACE)
    for i in range(count):
        api.put("v1", "ConfigMap", f"cm-{i:0{DIGITS}d}", NAMESPACE, metadata={"labels": {"app": f"app-{i % 50}"}},
                data={"owner": f"team-{i % 17}", "endpoint": f"https://service-{i}.{NAMESPACE}.svc:8443"})


def lookups(server: Server, names: range) -> int:
    """POST one request per name, CLIENTS connections at once; the count of answers that were not accepts."""
    failures, lock, todo = [0], threading.Lock(), iter(names)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                conn.request("POST", "/validate_raw/lookup", body=f'{{"request":{{"n":"{i:0{DIGITS}d}"}}}}',
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or b'"allowed":true' not in body:
                    with lock:
                        failures[0] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures[0]


def answers_cached(metrics_port: int) -> float | None:
    """The cluster cache's answer entries from /metrics (this build only)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except OSError:
        return None
    found = re.search(r'^kwserver_host_cache_entries\{cache="cluster_answers"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def flood(run: ScenarioRun, name: str, config: Path, env: dict[str, str]) -> dict[str, Any]:
    metrics_port = free_port()
    server = run.kwserver(name, config, workers=2, env={**env, "KWSERVER_METRICS_PORT": str(metrics_port)})
    failures = lookups(server, range(LOOKUPS, LOOKUPS + 2_000))  # warm-up: other names than the flood's
    time.sleep(6.0)  # the warm-up's answers expire (5 s) on a bounded build
    curve = [{"lookups": 0, "pss": pss_mib(server), "answers": answers_cached(metrics_port)}]
    started, step = time.monotonic(), LOOKUPS // 5
    for done in range(step, LOOKUPS + 1, step):
        failures += lookups(server, range(done - step, done))
        curve.append({"lookups": done, "pss": pss_mib(server), "answers": answers_cached(metrics_port)})
        run.event(f"{name}: {done} lookups")
    seconds = time.monotonic() - started
    run.stop(server)
    return {"curve": curve, "failures": failures, "seconds": seconds, "rate": LOOKUPS / seconds}


# --- field masks -------------------------------------------------------------------------------------

def fill_pods(api: Any, count: int) -> None:
    """Pods the size of a real workload's: two containers, probes, env, mounts, status."""
    for i in range(count):
        containers = [{
            "name": name, "image": f"registry.example.com/team-{i % 17}/{name}:1.{i % 40}.0",
            "ports": [{"containerPort": 8080 + k, "protocol": "TCP", "name": f"http-{k}"} for k in range(2)],
            "env": [{"name": f"SETTING_{k}", "value": f"value-{i}-{k}"} for k in range(6)],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}, {"name": "token", "mountPath": "/var/run"}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10},
            "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True}}
            for name in ("app", "sidecar")]
        api.put("v1", "Pod", f"pod-{i:05d}", NAMESPACE,
                metadata={"labels": {"app": f"app-{i % 50}", "pod-template-hash": f"{i * 7919 % 99991:05x}"}},
                spec={"containers": containers, "serviceAccountName": "default", "nodeName": f"node-{i % 20}",
                      "volumes": [{"name": "config", "configMap": {"name": f"app-{i % 50}"}},
                                  {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                                      "path": "token", "expirationSeconds": 3607}}]}}]},
                status={"phase": "Running", "podIP": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                        "conditions": [{"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                                       for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
                        "containerStatuses": [{"name": c["name"], "ready": True, "restartCount": 0,
                                               "image": c["image"], "imageID": f"sha256:{i:064x}",
                                               "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
                                              for c in containers]})


def mask_config(directory: Path, masks: list[str] | None) -> Path:
    payload: dict[str, Any] = {"api_version": "v1", "kind": "Pod", "namespace": NAMESPACE}
    if masks:
        payload["field_masks"] = masks
    name = "masked" if masks else "whole"
    wat = host_call_policy_wat("list_resources_by_namespace", json.dumps(payload).encode())
    return write_config(directory, name, {"pods": {
        "module": module(directory, name, wat), "contextAwareResources": PODS,
        "hostCapabilities": ["kubernetes/list_resources_by_namespace"], "timeoutEvalSeconds": 30}})


def list_memory(run: ScenarioRun, name: str, config: Path, env: dict[str, str]) -> dict[str, Any]:
    server = run.kwserver(name, config, workers=1, env=env)
    time.sleep(1.0)
    empty = pss_mib(server)
    deadline = time.monotonic() + 300
    while True:  # a call gives up after 10 s; the list goes on loading in the cache meanwhile
        status, body = server.post("/validate_raw/pods", b'{"request":{"uid":"u"}}', timeout=60)
        if status == 200 and b'"allowed":true' in body:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: the list policy answered {status} {body[:300]!r}")
        time.sleep(1.0)
    time.sleep(2.0)
    loaded = pss_mib(server)
    run.stop(server)
    return {"empty": empty, "loaded": loaded}


# --- the scenario ------------------------------------------------------------------------------------

@scenario("caches", "what policies can make the server remember",
          f"A waPC policy looks up a different ConfigMap on every request ({LOOKUPS:,} distinct `get_resource` "
          f"calls, {CLIENTS} clients, 2 workers): total PSS before and after, this build against the base commit "
          f"{BASE_COMMIT} (unbounded answer cache). A policy lists {OBJECTS:,} Pods with and without "
          f"`field_masks: {MASK}` (1 worker): PSS of the cluster cache process holding them.")
def caches(run: ScenarioRun) -> None:
    from tests.support.kube_api import KubeApi

    work = run.work / "caches"
    work.mkdir(parents=True, exist_ok=True)
    api = KubeApi(work).start()
    try:
        env = {"KUBECONFIG": str(api.kubeconfig(work / "kubeconfig"))}
        fill_configmaps(api, LOOKUPS + 2_000)
        config = lookup_config(work)
        # Kept in run.data as they come: a failure later still leaves them in results.json.
        floods: dict[str, Any] = {}
        masks: dict[str, Any] = {}
        run.data["caches"] = {"lookups": LOOKUPS, "objects": OBJECTS, "floods": floods, "masks": masks}
        floods["this build"] = flood(run, "lookups", config, env)
        base = run.checkout(BASE_COMMIT)
        if base is None:
            run.notes.append(f"The base commit {BASE_COMMIT} is not in this checkout's history: no baseline.")
        else:
            floods[f"base {BASE_COMMIT}"] = flood(run, "lookups-base", config, {**env, "PYTHONPATH": str(base)})
        fill_pods(api, OBJECTS)
        masks["whole objects"] = list_memory(run, "list-whole", mask_config(work, None), env)
        masks[f"field_masks {MASK}"] = list_memory(run, "list-masked", mask_config(work, MASK), env)
    finally:
        api.stop()
    report(run, floods, masks)


def report(run: ScenarioRun, floods: dict[str, dict[str, Any]], masks: dict[str, dict[str, Any]]) -> None:
    rows = []
    for label, result in floods.items():
        curve = result["curve"]
        first, last = curve[0]["pss"], curve[-1]["pss"]
        rows.append([label, fmt(first["total"], 1), fmt(last["total"], 1), fmt(last["total"] - first["total"], 1),
                     f"{fmt(first['cache'], 1)} → {fmt(last['cache'], 1)}",
                     f"{fmt(first['workers'], 1)} → {fmt(last['workers'], 1)}",
                     fmt(curve[-1]["answers"]), fmt(result["rate"]), str(result["failures"])])
    run.tables.append((f"PSS (master + workers + cluster cache) around {LOOKUPS:,} distinct get_resource lookups, MiB",
                       ["build", "after warm-up", f"after {LOOKUPS:,}", "growth", "cluster cache", "workers",
                        "answers kept", "lookups/s", "failed"], rows))
    curve_rows = [[label, *(fmt(point["pss"]["total"], 1) for point in result["curve"])]
                  for label, result in floods.items()]
    steps = [f"{point['lookups']:,}" for point in next(iter(floods.values()))["curve"]]
    run.tables.append(("Total PSS as the distinct lookups go, MiB", ["build", *steps], curve_rows))
    growth = {label: r["curve"][-1]["pss"]["total"] - r["curve"][0]["pss"]["total"] for label, r in floods.items()}
    after = {label: r["curve"][-1]["pss"]["total"] for label, r in floods.items()}
    run.headline(f"server PSS after {LOOKUPS:,} distinct get_resource lookups",
                 ", ".join(f"{label}: {after[label]:.1f} MiB ({growth[label]:+.1f})" for label in floods),
                 **{f"after_mib[{label}]": value for label, value in after.items()},
                 **{f"growth_mib[{label}]": value for label, value in growth.items()})
    mask_rows = [[label, fmt(m["empty"]["cache"], 1), fmt(m["loaded"]["cache"], 1),
                  fmt(m["loaded"]["cache"] - m["empty"]["cache"], 1), fmt(m["loaded"]["total"], 1)]
                 for label, m in masks.items()]
    run.tables.append((f"PSS of the cluster cache holding {OBJECTS:,} Pods, MiB",
                       ["list", "cache process, empty", "with the list", "cost of the list", "server total"],
                       mask_rows))
    cost = {label: m["loaded"]["cache"] - m["empty"]["cache"] for label, m in masks.items()}
    whole, masked = cost.values()
    share = f"; the mask keeps {masked / whole:.0%} of the list's cost" if whole > 0 else ""
    run.headline(f"cluster cache PSS for {OBJECTS:,} Pods", ", ".join(
        f"{label}: {masks[label]['loaded']['cache']:.1f} MiB (+{value:.1f})" for label, value in cost.items()) + share,
        **{f"cache_mib[{label}]": m["loaded"]["cache"] for label, m in masks.items()},
        **{f"cost_mib[{label}]": value for label, value in cost.items()})
