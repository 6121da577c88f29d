"""The pre-fork daemon: memory sharing across workers, gunicorn.conf.py, `kwserver check`."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from tests.support.paths import REPO, SERVER_FIXTURES, load_json, policy_path

pytestmark = pytest.mark.integration

PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
SLEEP_100MS = load_json(SERVER_FIXTURES / "pod_sleep_100ms.json")
RAW_REVIEW = load_json(SERVER_FIXTURES / "raw_review.json")
RAW_SETTINGS = {"forbiddenResources": ["banana"], "defaultResource": "hay"}
POLICIES = {
    "pod-privileged": {"module": policy_path("pod-privileged")},
    "pod-privileged-monitor": {"module": policy_path("pod-privileged"), "policyMode": "monitor"},
    "raw-mutation": {"module": policy_path("raw-mutation"), "allowedToMutate": True, "settings": RAW_SETTINGS},
    "raw-validation": {"module": policy_path("raw-validation"),
                       "settings": {"validUsers": ["tonio"], "validActions": ["eats"], "validResources": ["hay"]}},
    "sleep": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 1}},
}
REQUESTS = [
    ("/validate/pod-privileged", PRIVILEGED), ("/validate/pod-privileged-monitor", PRIVILEGED),
    ("/validate_raw/raw-mutation", RAW_REVIEW), ("/validate_raw/raw-validation", RAW_REVIEW),
    ("/validate/sleep", SLEEP_100MS),
]


def _server_processes(server):
    master = psutil.Process(server.process.pid)
    return [master, *master.children()]


def _connection_per_worker(server, workers: int) -> dict[int, http.client.HTTPConnection]:
    """One keep-alive connection pinned to each worker (a connection stays on the worker that accepted it).

    Extra connections are held open while searching: the workers balance open connections, so the
    ones holding more leave the next accept to the others.
    """
    pinned: dict[int, http.client.HTTPConnection] = {}
    extra: list[http.client.HTTPConnection] = []
    try:
        for _ in range(400):
            if len(pinned) == workers:
                return pinned
            worker_pids = {p.pid for p in _server_processes(server)[1:]}  # workers may still be starting
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.connect()
            _post(conn, *REQUESTS[0])  # answered, so accepted
            local = conn.sock.getsockname()
            owner = next((pid for pid in worker_pids
                          if any(c.raddr and tuple(c.raddr) == local for c in psutil.Process(pid).net_connections())),
                         None)
            if owner is not None and owner not in pinned:
                pinned[owner] = conn
            else:
                extra.append(conn)
        raise AssertionError(f"could not reach every worker: {sorted(pinned)}")
    finally:
        for conn in extra:
            conn.close()


def _post(conn: http.client.HTTPConnection, path: str, body) -> dict:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200
    return json.loads(reply.read())


def _total_pss_after_full_use(run_server, workers: int) -> float:
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": str(workers)})
    for conn in _connection_per_worker(server, workers).values():
        for _ in range(20):
            for path, body in REQUESTS:
                _post(conn, path, body)
        conn.close()
    return sum(p.memory_full_info().pss for p in _server_processes(server))


def test_memory_is_shared_across_workers(run_server):
    one = _total_pss_after_full_use(run_server, 1)
    four = _total_pss_after_full_use(run_server, 4)
    print(f"PSS ratio {four / one:.3f}: 1 worker {one / 2**20:.1f} MiB, 4 workers {four / 2**20:.1f} MiB")
    assert four < 1.5 * one, f"4 workers: {four / 2**20:.1f} MiB, 1 worker: {one / 2**20:.1f} MiB"


def test_workers_have_descriptive_titles(run_server):
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "2"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a just-forked worker still carries the master's title
        titles = [" ".join(p.cmdline()) for p in _server_processes(server)[1:]]
        if len(titles) == 2 and all(t.startswith("kwserver: worker") for t in titles):
            break
        time.sleep(0.1)
    assert len(titles) == 2 and all(t.startswith("kwserver: worker") and "5 policies" in t for t in titles), titles
    assert " ".join(_server_processes(server)[0].cmdline()).startswith("kwserver: master [5 policies")


def test_gunicorn_conf_py(run_server):
    server = run_server(POLICIES, command=[sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py")],
                        env={"KUBEWARDEN_WORKERS": "1"})
    assert _post(http.client.HTTPConnection("127.0.0.1", server.port, timeout=30),
                 *REQUESTS[0])["response"]["allowed"] is False


def _check(tmp_path, policies) -> subprocess.CompletedProcess:
    config = tmp_path / "policies.yml"
    config.write_text(json.dumps(policies))
    return subprocess.run([sys.executable, "-m", "kwserver", "check", "--policies", str(config)],
                          capture_output=True, text=True, timeout=120,
                          env={"KWSERVER_COMPILE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})


GROUP = {"expression": "pod_privileged() && !sleep()", "message": "m", "policies": {
    "pod_privileged": {"module": policy_path("pod-privileged")},
    "sleep": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 1}}}}


def test_check_accepts_a_valid_configuration(tmp_path):
    result = _check(tmp_path, {**POLICIES, "group": GROUP})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pod-privileged: ok" in result.stdout.splitlines()
    assert "group: ok (group)" in result.stdout.splitlines()
    assert "6 entries, 4 unique modules, 0 error(s)" in result.stdout


def test_check_reports_every_problem(tmp_path):
    result = _check(tmp_path, {
        **POLICIES,
        "bad-settings": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": "abc"}},
        "missing-module": {"module": str(tmp_path / "nope.wasm")},
        "not-wasm": {"module": str(REPO / "README.md")},
        "bad-group": {**GROUP, "policies": {**GROUP["policies"], "sleep": {
            "module": policy_path("sleeping"), "settings": {"sleepMilliseconds": "abc"}}}},
    })
    assert result.returncode == 1
    assert "bad-group: ERROR: Policy settings are invalid" in result.stdout
    assert "pod-privileged: ok" in result.stdout.splitlines()
    assert "bad-settings: ERROR: Policy settings are invalid" in result.stdout
    # A local file is not downloaded: the message says the file is missing.
    assert f"missing-module: ERROR: bootstrap failure: missing-module: module file {tmp_path / 'nope.wasm'} " \
           "does not exist" in result.stdout.splitlines()
    assert f"not-wasm: ERROR: bootstrap failure: not-wasm: module file {REPO / 'README.md'} is not a WebAssembly " \
           "module (it does not start with the \\0asm magic)" in result.stdout.splitlines()


def test_check_names_the_policies_yml_key_of_a_settings_type_error(tmp_path):
    """The guest's parser error points into the settings JSON kwserver handed it ("line 1 column N"); check
    names the key in policies.yml."""
    library = REPO / "policies" / "dist"
    result = _check(tmp_path, {
        "caps": {"module": str(library / "capabilities-psp.wasm"), "settings": {"allowed_capabilities": "CHOWN"}},
        "group": {"expression": "users()", "message": "no", "policies": {"users": {
            "module": str(library / "user-group-psp.wasm"),
            "settings": {"run_as_user": {"rule": "RunAsAny"}, "run_as_group": {"rule": 3}}}}},
    })
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("caps: ERROR: Policy settings are invalid: ") and "at line 1 column" in line
               and line.endswith("(in policies.yml: policy 'caps', settings.allowed_capabilities)") for line in lines)
    assert any(line.startswith("group: ERROR: Policy settings are invalid: ") and line.endswith(
        "(in policies.yml: policy group 'group' member 'users', settings.run_as_group.rule)") for line in lines)
    assert result.stderr == ""  # said once, on stdout


def test_check_and_serve_warn_about_unknown_keys(run_server, tmp_path):
    policies = {"p": {"module": policy_path("pod-privileged"), "policymode": "monitor"},
                "g": {"expression": "m()", "message": "no", "policies": {"m": {
                    "module": policy_path("pod-privileged"), "setings": {}}}}}
    warnings = ["policy 'p': unknown key `policymode` is ignored; did you mean `policyMode`?",
                "policy group 'g' member 'm': unknown key `setings` is ignored; did you mean `settings`?"]
    result = _check(tmp_path, policies)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.removeprefix("warning: ") for line in result.stdout.splitlines() if line.startswith("warning:")] == \
        warnings
    # The reference ignores unknown policy keys: the server starts, warns, and the policy runs in protect mode.
    server = run_server(policies)
    assert all(warning in server.log() for warning in warnings), server.log()
    assert server.post("/validate/p", PRIVILEGED).json()["response"]["allowed"] is False


@pytest.mark.parametrize("taken", ["api", "readiness", "metrics"])
def test_a_port_in_use_stops_the_server_at_once_with_one_line(taken, tmp_path):
    """As a busy readiness port always did: one line naming the port and the flag, before any policy loads
    (gunicorn alone retries a busy API port for 5 s)."""
    import socket

    from tests.support.server import free_port

    ports = {"api": free_port(), "readiness": free_port(), "metrics": free_port()}
    busy = socket.socket()
    busy.bind(("127.0.0.1", ports[taken]))
    busy.listen()
    config = tmp_path / "policies.yml"
    config.write_text(json.dumps(POLICIES))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "kwserver", "serve", "--policies", str(config), "--addr", "127.0.0.1",
             "--port", str(ports["api"]), "--readiness-probe-port", str(ports["readiness"]),
             "--metrics-port", str(ports["metrics"])],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={**os.environ, "KWSERVER_COMPILE_CACHE_DIR": str(tmp_path / "cache")})
    finally:
        busy.close()
    assert result.returncode == 1
    what, flag = {"api": ("the admission API", "--port"), "readiness": ("readiness", "--readiness-probe-port"),
                  "metrics": ("metrics", "--metrics-port")}[taken]
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"cannot serve {what} on 127.0.0.1:{ports[taken]}: Address already in use (another server? choose a port "
        f"with {flag})"), result.stderr
    # Not gunicorn's retries (each logs "Connection in use"), and before any policy was loaded.
    assert "Connection in use" not in result.stderr and "loaded" not in result.stderr


def test_check_rejects_an_unparsable_file(tmp_path):
    result = _check(tmp_path, {"g": {"expression": "nope(", "message": "m",
                                     "policies": {"a": {"module": policy_path("sleeping")}}}})
    # check collects every problem: the invalid expression is the group's error, as with --continue-on-errors.
    assert result.returncode == 1 and "g: ERROR: " in result.stdout and "invalid expression" in result.stdout


def test_serve_with_a_gunicorn_config_file(run_server, tmp_path):
    tuning = tmp_path / "tuning.py"
    tuning.write_text("keepalive = 5\nproc_name = 'tuned'\n")
    server = run_server(POLICIES, args=["--gunicorn-config", str(tuning)], env={"KUBEWARDEN_WORKERS": "1"})
    assert _post(http.client.HTTPConnection("127.0.0.1", server.port, timeout=30),
                 *REQUESTS[0])["response"]["allowed"] is False
    assert "Control socket" not in server.log()


def test_a_burst_of_keep_alive_connections_spreads_over_the_workers(run_server):
    from concurrent.futures import ThreadPoolExecutor

    slow = json.loads(json.dumps(SLEEP_100MS))
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "2"})
    _connection_per_worker(server, 2)  # both workers are up
    connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(16)]
    for conn in connections:  # all in the listen backlog at once, as in a reconnect storm
        conn.connect()
    with ThreadPoolExecutor(len(connections)) as pool:
        answers = [pool.submit(_post, conn, "/validate/sleep", slow) for conn in connections]
    # .result() raises here what a thread raised (a failed assert in a thread is otherwise only a warning).
    assert [answer.result()["response"]["allowed"] for answer in answers] == [True] * len(connections)
    held = [sum(1 for c in worker.net_connections() if c.status == "ESTABLISHED" and c.laddr.port == server.port)
            for worker in _server_processes(server)[1:]]
    for conn in connections:
        conn.close()
    print("held", held)
    assert sum(held) >= 16 and max(held) <= 12, held


EFFECTIVE_SETTINGS = r"""
import json, sys
from gunicorn.app.base import Application
from kwserver.config import ServerSettings
from kwserver.server.daemon import Daemon, KwserverApplication

daemon = Daemon(ServerSettings.from_env())
served = KwserverApplication(daemon)


class GunicornDashC(Application):
    # What `gunicorn -c gunicorn.conf.py` loads, without gunicorn's own command line.
    def load_config(self):
        self.load_config_from_file(sys.argv[1])

    def load(self):
        pass


direct = GunicornDashC()
served_values = {k: s.value for k, s in served.cfg.settings.items()}
direct_values = {k: s.value for k, s in direct.cfg.settings.items()}
print(json.dumps({
    "differ": sorted(k for k in served_values if served_values[k] is not direct_values[k]
                     and served_values[k] != direct_values[k]),
    "loglevel": served_values["loglevel"], "workers": served_values["workers"],
    "ssl_context": served_values["ssl_context"].__module__,
}))
"""


@pytest.mark.parametrize("tls", [False, True])
def test_kwserver_serve_and_gunicorn_conf_py_have_identical_settings(tmp_path, tls):
    env = {**os.environ, "KUBEWARDEN_LOG_LEVEL": "warn", "KUBEWARDEN_WORKERS": "3",
           "KWSERVER_WORKER_MAX_REQUESTS": "50"}
    if tls:
        env.update(KUBEWARDEN_CERT_FILE=str(tmp_path / "c.pem"), KUBEWARDEN_KEY_FILE=str(tmp_path / "k.pem"))
    out = subprocess.run([sys.executable, "-c", EFFECTIVE_SETTINGS, str(REPO / "gunicorn.conf.py")], env=env,
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["differ"] == []
    assert (result["loglevel"], result["workers"]) == ("warning", 3)
    assert (result["ssl_context"] == "kwserver.server.gunicorn_config") is tls
