"""`kwserver top` and `kwserver reload` find running servers by themselves, on any ports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.paths import SERVER_FIXTURES, load_json, policy_path
from tests.support.server import wait_for

pytestmark = pytest.mark.integration

PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
POLICIES = {"pod-privileged": {"module": policy_path("pod-privileged")}}


def kwserver(runtime: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "KWSERVER_RUNTIME_DIR": str(runtime)}
    return subprocess.run([sys.executable, "-m", "kwserver", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def master_of(status: dict) -> int:
    return next(p["pid"] for p in status["processes"] if p["role"] == "master")


def serve(run_server, runtime: Path):
    # Every port is a free one, never the defaults (the metrics port is not 9090).
    return run_server(POLICIES, env={"KWSERVER_RUNTIME_DIR": str(runtime), "KUBEWARDEN_WORKERS": "1"})


def add_policy(server) -> None:
    config = Path(server.log_path).parent / "policies.yml"
    config.write_text(yaml.safe_dump({**POLICIES, "added": POLICIES["pod-privileged"]}))


def test_top_and_reload_find_the_only_server(run_server, tmp_path):
    runtime = tmp_path / "run"
    server = serve(run_server, runtime)
    assert server.metrics_port != 9090

    top = kwserver(runtime, "top", "--once", "--json")
    assert top.returncode == 0, top.stderr
    assert master_of(json.loads(top.stdout)) == server.process.pid
    assert "total PSS" in kwserver(runtime, "top", "--once").stdout

    add_policy(server)
    reload = kwserver(runtime, "reload")
    assert reload.returncode == 0, reload.stderr
    assert f"asked kwserver master {server.process.pid} to reload" in reload.stdout
    wait_for(lambda: server.post("/validate/added", PRIVILEGED).status_code == 200)


def test_several_servers_are_listed_and_chosen_by_pid_or_url(run_server, tmp_path):
    runtime = tmp_path / "run"
    first, second = serve(run_server, runtime), serve(run_server, runtime)

    for command in (["top", "--once"], ["reload"]):
        result = kwserver(runtime, *command)
        assert result.returncode == 1
        assert "found 2 running kwserver masters, choose one with --pid or --url" in result.stderr
        for server in (first, second):
            assert (f"pid {server.process.pid}: API 127.0.0.1:{server.port}, "
                    f"metrics http://127.0.0.1:{server.metrics_port}, policies ") in result.stderr

    top = kwserver(runtime, "top", "--once", "--json", "--pid", str(second.process.pid))
    assert top.returncode == 0, top.stderr
    assert master_of(json.loads(top.stdout)) == second.process.pid
    top = kwserver(runtime, "top", "--once", "--json", "--url", f"http://127.0.0.1:{first.metrics_port}")
    assert master_of(json.loads(top.stdout)) == first.process.pid
    # A pid that is not a kwserver master is refused, never signalled (SIGHUP ends most programs).
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for command in (["top", "--once"], ["reload"]):
            refused = kwserver(runtime, *command, "--pid", str(bystander.pid))
            assert refused.returncode == 1
            assert f"no running kwserver master has pid {bystander.pid}; running:" in refused.stderr
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()

    add_policy(first)
    add_policy(second)
    reload = kwserver(runtime, "reload", "--url", f"http://127.0.0.1:{first.metrics_port}")
    assert reload.returncode == 0, reload.stderr
    wait_for(lambda: first.post("/validate/added", PRIVILEGED).status_code == 200)
    assert second.post("/validate/added", PRIVILEGED).status_code == 404


def test_a_stopped_or_killed_server_is_not_found(run_server, tmp_path):
    runtime = tmp_path / "run"
    server = serve(run_server, runtime)
    assert [path.name for path in runtime.iterdir()] == [f"{server.process.pid}.json"]
    server.process.terminate()
    server.process.wait(timeout=30)
    assert list(runtime.iterdir()) == []  # removed on exit

    # A master killed without cleaning up leaves its state behind; a process that no longer exists.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state = {"pid": gone.pid, "started": 0.0, "addr": "127.0.0.1", "port": 1, "readiness_port": 2,
             "metrics_port": 3, "policies": "/nowhere/policies.yml", "version": "0"}
    (runtime / f"{gone.pid}.json").write_text(json.dumps(state))
    result = kwserver(runtime, "top", "--once")
    assert result.returncode == 1
    assert f"pid {gone.pid}" not in result.stderr and "/nowhere" not in result.stderr
