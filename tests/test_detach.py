"""`--daemon` and its files: the reference's daemon mode, through the command line."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import requests
import yaml

from tests.support.paths import policy_path
from tests.support.server import free_port, kwserver, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def config(tmp_path, compile_cache):
    policies = {"pod-privileged": {"module": policy_path("pod-privileged")}}
    (tmp_path / "policies.yml").write_text(yaml.safe_dump(policies))
    return tmp_path, {"KWSERVER_COMPILE_CACHE_DIR": str(compile_cache), "KUBEWARDEN_WORKERS": "1",
                      "KUBEWARDEN_BIND_ADDRESS": "127.0.0.1", "KUBEWARDEN_PORT": str(free_port()),
                      "KUBEWARDEN_READINESS_PROBE_PORT": str(free_port())}


def _ready(port: str) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readiness", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def test_the_server_detaches_writes_its_pid_and_logs_to_the_files(config):
    directory, env = config
    (directory / "run").mkdir()
    started = time.monotonic()
    result = kwserver("serve", "--daemon", "--daemon-pid-file", "run/kw.pid", "--daemon-stdout-file", "out.log",
                      "--daemon-stderr-file", "err.log", cwd=directory, env=env)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30  # the command returns once detached, not when the server stops
    pid = int((directory / "run" / "kw.pid").read_text())
    assert f"the daemon's pid is {pid}" in result.stderr
    daemon = psutil.Process(pid)
    try:
        # A session of its own, and not its leader (so it can never get a controlling terminal again).
        assert os.getsid(pid) not in (pid, os.getsid(0))
        wait_for(lambda: _ready(env["KUBEWARDEN_READINESS_PROBE_PORT"]), timeout=60)
        log = (directory / "err.log").read_text()
        assert "ready: API on 127.0.0.1" in log and "kwserver: master" in " ".join(daemon.cmdline())
        assert (directory / "out.log").exists()
        # `kwserver reload` finds it through the pid file.
        assert kwserver("reload", "--pid-file", "run/kw.pid", cwd=directory).returncode == 0
    finally:
        os.kill(pid, signal.SIGTERM)
        daemon.wait(timeout=30)
    assert not (directory / "run" / "kw.pid").exists()  # removed by the daemon as it exits


def test_a_pid_file_in_an_unwritable_directory_fails_before_detaching(config, tmp_path):
    directory, env = config
    if os.getuid() == 0:
        unwritable = "/sys"  # even root cannot create files there
    else:
        (tmp_path / "locked").mkdir(mode=0o555)
        unwritable = str(tmp_path / "locked")
    result = kwserver("serve", "--daemon", "--daemon-pid-file", f"{unwritable}/kw.pid", cwd=directory, env=env)
    assert result.returncode == 1
    assert f"Cannot daemonize: cannot write the pid file {unwritable}/kw.pid: Permission denied" in result.stderr
    assert not _ready(env["KUBEWARDEN_READINESS_PROBE_PORT"])


def test_an_output_file_that_cannot_be_created_fails_before_detaching(config):
    directory, env = config
    result = kwserver("serve", "--daemon", "--daemon-stderr-file", "missing/dir/err.log", cwd=directory, env=env)
    assert result.returncode == 1
    assert "Cannot create file for daemon stderr: missing/dir/err.log: No such file or directory" in result.stderr
    assert not (directory / "policy-server.pid").exists()


def test_the_daemon_variables_are_the_references():
    from kwserver.config import ServerSettings

    settings = ServerSettings.from_env({"KUBEWARDEN_DAEMON": "true", "KUBEWARDEN_DAEMON_PID_FILE": "p",
                                        "KUBEWARDEN_DAEMON_STDOUT_FILE": "o", "KUBEWARDEN_DAEMON_STDERR_FILE": "e"})
    assert (settings.daemon, settings.daemon_pid_file, settings.daemon_stdout_file,
            settings.daemon_stderr_file) == (True, "p", "o", "e")
    assert ServerSettings().daemon_pid_file == "policy-server.pid"
