"""The README's first steps, as a new user takes them: its server command, then its "Try it" curl commands,
read from README.md and run as written (only the port is a free one), each answer compared with the one the
README shows."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.server import free_port, stop_process, wait_ready_on

pytestmark = pytest.mark.integration

README = (REPO / "README.md").read_text()
README_ADDRESS = "127.0.0.1:3000"


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)


def serve_arguments() -> list[str]:
    """The arguments of `kwserver serve` in the README's first command."""
    first = _blocks(README)[0].splitlines()[0]
    return shlex.split(first.split("kwserver serve", 1)[1])


def try_it() -> list[tuple[list[str], dict]]:
    """The commands of "Try it", each with the answer shown under it."""
    section = README.split("## Try it", 1)[1]
    lines = _blocks(section)[0].splitlines()
    steps = []
    for command, shown in zip(lines[::2], lines[1::2], strict=True):
        assert command.startswith("curl ") and shown.startswith("# {"), (command, shown)
        steps.append((shlex.split(command), json.loads(shown[2:])))
    return steps


def test_the_readme_shows_an_acceptance_a_rejection_and_monitor_mode():
    answers = [shown["response"] for _, shown in try_it()]
    assert [answer["allowed"] for answer in answers] == [True, False, True]
    assert "monitor" in README.split("## Try it", 1)[1].split("```")[2]


def test_try_it_against_the_readme_server(compile_cache, tmp_path):
    port, readiness, metrics = free_port(), free_port(), free_port()
    log_path = tmp_path / "server.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("KUBEWARDEN_", "KWSERVER_"))},
           "KUBEWARDEN_PORT": str(port), "KUBEWARDEN_READINESS_PROBE_PORT": str(readiness),
           "KWSERVER_METRICS_PORT": str(metrics), "KUBEWARDEN_WORKERS": "1",
           "KWSERVER_COMPILE_CACHE_DIR": str(compile_cache)}
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "kwserver", "serve", *serve_arguments()], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready_on(readiness, server, log_path.read_text)
        for command, shown in try_it():
            command = [part.replace(README_ADDRESS, f"127.0.0.1:{port}") for part in command]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout) == shown, command
        # Monitor mode: accepted, and the rejection is in the log as the README says.
        assert re.search(r"policy evaluation \(monitor mode\): policy clusterwide-no-host-namespace-sharing, "
                         r"allowed False, status \{'message': 'Pod has host PID enabled", log_path.read_text())
    finally:
        stop_process(server)


def test_the_readme_run_command_evaluates_the_example_offline(compile_cache):
    """`kwserver run` on the example policies.yml, as the README suggests after "Try it"."""
    command = re.search(r"`(kwserver run\s+deploy/examples/policies\.yml[^`]*)`", README, re.S).group(1).split()
    env = {**os.environ, "KWSERVER_COMPILE_CACHE_DIR": str(compile_cache)}
    done = subprocess.run([sys.executable, "-m", "kwserver", *command[1:]], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    names = re.findall(r"kwserver\.commands\.offline: (\S+):$", done.stderr, re.M)
    assert len(answers) == len(names) == 10
    rejected = {name: answer["status"]["message"] for name, answer in zip(names, answers, strict=True)
                if not answer["allowed"]}
    assert rejected == {"clusterwide-no-privileged-pod": "Privileged container is not allowed"}
    assert all(Path(REPO / part).exists() for part in command if part.startswith("deploy/"))
