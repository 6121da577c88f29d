"""Operating the daemon: metrics, `kwserver top`, a pool that follows the load, reloads and recycling."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import wasmtime
import yaml

from kwserver.evaluation.modes import annotate
from kwserver.observability.endpoints import Readiness
from tests.support.paths import SERVER_FIXTURES, TEST_POLICIES, load_json, policy_path
from tests.support.server import Load, metrics_text, published_metrics, sample, wait_for

pytestmark = pytest.mark.integration

PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
UNPRIVILEGED = load_json(SERVER_FIXTURES / "pod_without_privileged_containers.json")
RAW_REVIEW = load_json(SERVER_FIXTURES / "raw_review.json")
SLEEP_100MS = load_json(SERVER_FIXTURES / "pod_sleep_100ms.json")
POD_PRIVILEGED = {"module": policy_path("pod-privileged")}


def workers_of(server) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children()


def test_metrics_have_the_reference_names_and_survive_a_dead_worker(run_server):
    server = run_server({
        "pod-privileged": POD_PRIVILEGED,
        "raw-validation": {"module": policy_path("raw-validation"), "policyMode": "monitor",
                           "settings": {"validUsers": ["x"], "validActions": ["x"], "validResources": ["x"]}},
        "broken": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": "abc"}},
    }, args=["--continue-on-errors"], env={"KUBEWARDEN_WORKERS": "2"})
    wait_for(lambda: len(workers_of(server)) == 2)  # readiness needs one worker, not all
    for _ in range(3):
        assert server.post("/validate/pod-privileged", PRIVILEGED).status_code == 200
    assert server.post("/audit/pod-privileged", UNPRIVILEGED).status_code == 200
    assert server.post("/validate_raw/raw-validation", RAW_REVIEW).status_code == 200
    assert server.post("/validate/broken", SLEEP_100MS).status_code == 200

    text = published_metrics(server, served=6)
    evaluations = "kubewarden_policy_evaluations_total"
    assert sample(text, evaluations, policy_name="pod-privileged", policy_mode="protect", resource_kind="Pod",
                  resource_request_operation="CREATE", accepted="false", mutated="false",
                  request_origin="validate", resource_namespace="default") == 3
    assert sample(text, evaluations, policy_name="pod-privileged", accepted="true", request_origin="audit") == 1
    # Monitor mode records the policy's own (vanilla) decision; raw requests have no kind or origin.
    assert sample(text, evaluations, policy_name="raw-validation", policy_mode="monitor", accepted="false",
                  resource_kind="", request_origin="") == 1
    assert sample(text, evaluations, policy_name="broken", initialization_error="") == 0
    assert sample(text, evaluations, policy_name="broken") == 1
    assert "Policy settings are invalid" in next(
        line for line in text.splitlines() if line.startswith(evaluations + "{") and 'policy_name="broken"' in line)
    assert sample(text, "kubewarden_policy_evaluation_latency_milliseconds_count", policy_name="pod-privileged") == 4
    assert sample(text, "kubewarden_policy_evaluation_latency_milliseconds_bucket", policy_name="pod-privileged",
                  le="10000.0") == 4
    assert sample(text, "kwserver_workers") == 2
    assert sample(text, "kwserver_process_memory_bytes", role="master", kind="pss") > 0
    assert sample(text, "kwserver_instance_cache_events_total", event="miss") >= 1

    dashboard = (Path(__file__).parent.parent / "deploy/grafana/kwserver-dashboard.json").read_text()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    for name in set(re.findall(r"\b(?:kubewarden|kwserver)_[a-z_]+", dashboard)) - {"kwserver"}:
        assert name in exported, f"the dashboard uses {name}, which the server does not export"

    # A worker dies: its counts stay, its files go, gunicorn replaces it.
    victim = workers_of(server)[0]
    victim.kill()
    wait_for(lambda: len(workers_of(server)) == 2 and victim.pid not in {p.pid for p in workers_of(server)})
    wait_for(lambda: not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"kwserver-metrics-*/*_{victim.pid}.db")))
    text = metrics_text(server)
    assert sample(text, evaluations, policy_name="pod-privileged", request_origin="validate") == 3
    # The surviving worker holds at most one idle instance per module it used.
    assert sample(text, "kwserver_policy_instances") <= 2


def test_top_once_json(run_server):
    server = run_server({"pod-privileged": POD_PRIVILEGED}, env={"KUBEWARDEN_WORKERS": "2"})
    wait_for(lambda: len(workers_of(server)) == 2)
    server.post("/validate/pod-privileged", PRIVILEGED)
    published_metrics(server, served=1)
    result = subprocess.run(
        [sys.executable, "-m", "kwserver", "top", "--once", "--json", "--url", f"http://127.0.0.1:{server.metrics_port}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    roles = sorted(p["role"] for p in status["processes"])
    assert roles == ["master", "worker", "worker"]
    assert status["totals"]["pss"] == sum(p["pss"] for p in status["processes"])
    assert sum(p["requests"] for p in status["processes"]) == 1
    assert status["modules"] == 1 and status["compiled_module_bytes"] > 0
    text = subprocess.run(
        [sys.executable, "-m", "kwserver", "top", "--once", "--url", f"http://127.0.0.1:{server.metrics_port}"],
        capture_output=True, text=True, timeout=60).stdout
    assert "total PSS" in text and "master" in text


def test_top_metrics_and_titles_name_the_policies(run_server):
    """Where users read them, instances are named after their policies (the first two sharing a module and how
    many more), and a worker's title counts what `kwserver top --json` counts."""
    policies = {name: POD_PRIVILEGED for name in ("alpha", "beta", "gamma")}
    policies["own"] = {**POD_PRIVILEGED, "ownInstance": True}
    server = run_server(policies, env={"KUBEWARDEN_WORKERS": "1"})
    for name in [*policies, "alpha", "own", "beta"]:
        assert server.post(f"/validate/{name}", PRIVILEGED).status_code == 200
    text = published_metrics(server, served=7)
    assert sample(text, "kwserver_policy_instances", instance="alpha, beta +1 more") == 1
    assert sample(text, "kwserver_policy_instances", instance="own") == 1
    assert "module:" not in text
    url = f"http://127.0.0.1:{server.metrics_port}"
    status = json.loads(subprocess.run([sys.executable, "-m", "kwserver", "top", "--json", "--url", url],
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
    worker = next(p for p in status["processes"] if p["role"] == "worker")
    assert worker["instances"] == {"alpha, beta +1 more": 1, "own": 1} and worker["requests"] == 7
    title = wait_for(lambda: (t := " ".join(psutil.Process(worker["pid"]).cmdline())).endswith("7 requests") and t)
    assert title.startswith("kwserver: worker 1 [4 policies")
    table = subprocess.run([sys.executable, "-m", "kwserver", "top", "--once", "--url", url],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    row = next(line for line in table.splitlines() if line.split()[:2] == [str(worker["pid"]), "worker"])
    assert row.endswith("  alpha, beta +1 more (1); own (1)"), row



def test_pool_grows_under_load_and_shrinks_back_when_idle(run_server):
    slow_pod = json.loads(json.dumps(SLEEP_100MS))
    slow_pod["request"]["object"]["metadata"]["annotations"]["kubewarden.sleep_duration_milliseconds"] = 150
    server = run_server({"sleep": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 1}}},
                        env={"KUBEWARDEN_WORKERS": "1", "KWSERVER_MIN_WORKERS": "1", "KWSERVER_MAX_WORKERS": "3",
                             "KWSERVER_SCALE_UP_AFTER_SECONDS": "1", "KWSERVER_SCALE_DOWN_AFTER_SECONDS": "2"})
    with Load(server, "/validate/sleep", slow_pod) as load:
        wait_for(lambda: len(workers_of(server)) >= 2, timeout=40)
    wait_for(lambda: len(workers_of(server)) == 1, timeout=40)
    assert load.failures == []
    assert "growing the pool" in server.log() and "shrinking the pool from" in server.log()


def test_reload_under_load_loses_nothing_and_refuses_an_invalid_config(run_server, tmp_path):
    server = run_server({"pod-privileged": POD_PRIVILEGED}, env={"KUBEWARDEN_WORKERS": "2"})
    config = Path(server.log_path).parent / "policies.yml"
    master = server.process.pid
    with Load(server, "/validate/pod-privileged", PRIVILEGED, threads=2) as load:
        assert server.post("/validate/pod-privileged-2", PRIVILEGED).status_code == 404
        config.write_text(yaml.safe_dump({"pod-privileged": POD_PRIVILEGED, "pod-privileged-2": POD_PRIVILEGED}))
        reload = subprocess.run([sys.executable, "-m", "kwserver", "reload", "--pid", str(master)],
                                capture_output=True, text=True, timeout=30)
        assert reload.returncode == 0, reload.stderr
        wait_for(lambda: requests.post(server.url + "/validate/pod-privileged-2", json=PRIVILEGED,
                                       timeout=10).status_code == 200)
        # The unchanged module was neither compiled nor loaded again.
        assert "1 unique modules (" in server.log() and "1 reused, compile cache 0 hit / 0 miss" in server.log()
        served_before_invalid = load.count
        config.write_text(yaml.safe_dump({"pod-privileged": POD_PRIVILEGED,
                                          "group": {"expression": "nope(", "message": "m",
                                                    "policies": {"a": POD_PRIVILEGED}}}))
        os.kill(master, signal.SIGHUP)
        wait_for(lambda: "reload refused" in server.log())
        wait_for(lambda: load.count > served_before_invalid + 20)
    assert load.failures == []
    assert requests.post(server.url + "/validate/pod-privileged-2", json=PRIVILEGED, timeout=10).status_code == 200
    assert load.count > 50


@pytest.fixture
def leaky_policy(tmp_path) -> str:
    source = TEST_POLICIES / "leaky"
    wasm = wasmtime.wat2wasm((source / "leaky.wat").read_text())
    path = tmp_path / "leaky.wasm"
    path.write_bytes(annotate(wasm, yaml.safe_load((source / "metadata.yml").read_text())))
    return str(path)


def test_workers_over_the_memory_ceiling_are_recycled_without_failed_requests(run_server, leaky_policy):
    server = run_server({"leaky": {"module": leaky_policy}}, env={  # reused: a fresh instance would not leak
        "KUBEWARDEN_WORKERS": "1", "KWSERVER_WORKER_MAX_USS_MIB": "80", "KWSERVER_FRESH_INSTANCE_PER_REQUEST": "false",
        "KWSERVER_INSTANCE_KEEP_MEMORY_MIB": "1024", "KWSERVER_POLICY_MEMORY_LIMIT_MIB": "1024"})
    first = workers_of(server)[0].pid
    session = requests.Session()
    for _ in range(60):
        reply = session.post(server.url + "/validate_raw/leaky", json=RAW_REVIEW, timeout=30)
        assert reply.status_code == 200 and reply.json()["response"]["allowed"] is True
        time.sleep(0.05)
    wait_for(lambda: workers_of(server) and workers_of(server)[0].pid != first)
    assert "above the 80.0 MiB ceiling: recycling it" in server.log()
    reply = session.post(server.url + "/validate_raw/leaky", json=RAW_REVIEW, timeout=30)
    assert reply.status_code == 200


def test_readiness_waits_for_a_worker():
    """gunicorn announces `when_ready` before its first fork; the probe must not say ready in that gap."""
    workers: dict[int, object] = {}
    readiness = Readiness(lambda: bool(workers))
    readiness.ready.set()
    assert readiness.route()[0] == 503
    workers[1] = object()
    assert readiness.route()[0] == 200
    readiness.ready.clear()
    assert readiness.route()[0] == 503


def _readiness(server) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{server.readiness_port}/readiness", timeout=2).status_code
    except requests.ConnectionError:
        return None  # the master stopped its endpoints


def test_unready_on_sigterm_and_in_flight_requests_complete(run_server):
    server = run_server({"sleep": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 1}}},
                        env={"KUBEWARDEN_WORKERS": "1", "KUBEWARDEN_POLICY_TIMEOUT": "10",
                             "KUBEWARDEN_LOG_LEVEL": "info"})
    slow = json.loads(json.dumps(SLEEP_100MS))
    slow["request"]["object"]["metadata"]["annotations"]["kubewarden.sleep_duration_milliseconds"] = 2000
    result = {}
    thread = threading.Thread(target=lambda: result.update(reply=server.post("/validate/sleep", slow)))
    thread.start()
    # The evaluation has started once the policy logs its sleep (metrics are published only between
    # evaluations).
    wait_for(lambda: "sleeping for 2000 milliseconds" in server.log(), interval=0.05)
    assert _readiness(server) == 200
    server.process.send_signal(signal.SIGTERM)

    def unready():
        status = _readiness(server)
        return None if status == 200 else (thread.is_alive(), status)

    # Unready while the in-flight request is still being served (the endpoints stop only after the drain).
    assert wait_for(unready, timeout=10, interval=0.05) == (True, 503)
    thread.join(timeout=30)
    assert result["reply"].status_code == 200 and result["reply"].json()["response"]["allowed"] is True
    assert server.process.wait(timeout=30) == 0


def test_workers_are_recycled_after_max_requests_without_failed_requests(run_server):
    server = run_server({"pod-privileged": POD_PRIVILEGED},
                        env={"KUBEWARDEN_WORKERS": "1", "KWSERVER_WORKER_MAX_REQUESTS": "20"})
    pids = set()
    for _ in range(100):
        reply = requests.post(server.url + "/validate/pod-privileged", json=PRIVILEGED, timeout=30)
        assert reply.status_code == 200 and reply.json()["response"]["allowed"] is False
        pids.update(p.pid for p in workers_of(server))
    assert len(pids) >= 4, pids  # 100 requests, recycled every 20-22


def test_labels_from_requests_are_bounded_by_an_overflow_series(run_server):
    server = run_server({"pod-privileged": POD_PRIVILEGED},
                        env={"KUBEWARDEN_WORKERS": "1", "KWSERVER_METRIC_SERIES_LIMIT": "20"})
    for index in range(60):
        review = {**PRIVILEGED, "request": {**PRIVILEGED["request"], "namespace": f"ns-{index}"}}
        assert server.post("/validate/pod-privileged", review).status_code == 200
    text = published_metrics(server, served=60)
    series = [line for line in text.splitlines() if line.startswith("kubewarden_policy_evaluations_total{")]
    assert len(series) == 20
    assert sample(text, "kubewarden_policy_evaluations_total") == 60
    overflow = sample(text, "kubewarden_policy_evaluations_total", otel_metric_overflow="true")
    assert overflow == 60 - 19 and sample(text, "kubewarden_policy_evaluation_latency_milliseconds_count",
                                          otel_metric_overflow="true") == overflow


@pytest.mark.parametrize("text", ["", "# every policy commented out\n", "{}\n", "---\n"])
def test_a_policies_file_without_policies_is_refused_by_serve_check_and_reload(run_server, tmp_path, text):
    from kwserver.config import NO_POLICIES
    from tests.support.server import kwserver

    empty = tmp_path / "empty.yml"
    empty.write_text(text)
    checked = kwserver("check", "--policies", str(empty), cwd=tmp_path)
    assert checked.returncode == 1 and NO_POLICIES in checked.stderr
    refused = run_server({"pod-privileged": POD_PRIVILEGED}, wait=False, args=["--policies", str(empty)])
    assert refused.process.wait(timeout=60) == 1 and NO_POLICIES in refused.log()
    # A reload with a truncated file keeps the running configuration (and readiness) in service.
    server = run_server({"pod-privileged": POD_PRIVILEGED}, env={"KUBEWARDEN_WORKERS": "1"})
    (Path(server.log_path).parent / "policies.yml").write_text(text)
    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in server.log() and NO_POLICIES in server.log())
    time.sleep(1)  # a reload that had been accepted would have replaced the worker by now
    assert server.post("/validate/pod-privileged", PRIVILEGED).json()["response"]["allowed"] is False
    assert requests.get(f"http://127.0.0.1:{server.readiness_port}/readiness", timeout=5).status_code == 200
