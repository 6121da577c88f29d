import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kwserver.commands.cli import main
from tests.support.paths import REPO

EXAMPLE = REPO / "deploy" / "examples" / "policies.yml"
REQUESTS = REPO / "deploy" / "examples" / "requests"


@pytest.mark.parametrize("command", ["serve", "check", "annotate", "inspect", "top", "reload", "run", "docs"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kwserver" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "wasmtime" in capsys.readouterr().out


def test_kubernetes_manifest_runs_kwserver_with_valid_flags():
    from pathlib import Path

    import yaml

    from kwserver.commands.cli import build_parser
    from kwserver.config import settings_from_args
    from kwserver.server.sizing import worker_plan

    manifest = Path(__file__).parent.parent / "deploy/kubernetes/kwserver.yaml"
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(manifest.read_text())}
    container = documents["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    settings = settings_from_args(build_parser().parse_args(["serve", *container["args"]]), environ={})
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"https": settings.port, "readiness": settings.readiness_probe_port}  # metrics on readiness
    annotations = documents["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_listener_port)
    assert settings.tls and worker_plan(settings).autoscaling
    assert yaml.safe_load(documents["ConfigMap"]["data"]["policies.yml"])


def test_serve_help_lists_every_setting_under_its_topic(capsys):
    from kwserver.config import SETTING_GROUPS, SETTINGS

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: kwserver serve [options]\n")
    # Sections in the declared order, each holding the flags of the settings that name it.
    sections = dict(re.findall(r"^(\S[^\n]*):\n(.*?)(?=^\S|\Z)", text, re.M | re.S))
    assert [title for title in sections if title in SETTING_GROUPS.values()] == list(SETTING_GROUPS.values())
    for setting in SETTINGS:
        assert setting.group in SETTING_GROUPS, f"{setting.name} names no --help section"
        if not setting.hidden:
            assert re.search(rf"^  {setting.flag}\b", sections[SETTING_GROUPS[setting.group]], re.M), setting.flag


SIGPIPE_STATUS = 128 + signal.SIGPIPE


@pytest.mark.parametrize("command,status", [
    (["manifests", "--policies", str(EXAMPLE), "--image", "registry.example/kwserver:1"], SIGPIPE_STATUS),
    (["inspect", str(REPO / "policies" / "dist" / "echo.wasm")], SIGPIPE_STATUS),
    (["check", "--policies", str(EXAMPLE)], SIGPIPE_STATUS),
    (["run", str(REPO / "policies" / "dist" / "pod-privileged.wasm"), "-r", str(REQUESTS / "privileged-pod.json")],
     SIGPIPE_STATUS),
    (["serve", "--help"], 0),  # argparse ignores write errors of --help and --version
    (["--version"], 0),
])
def test_a_reader_that_goes_away_is_not_an_error(command, status, tmp_path):
    """`kwserver ... | head`: the reader closed the pipe; the command stops quietly with the shell's SIGPIPE
    status, as coreutils do."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the first write: every write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "kwserver", *command], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "KWSERVER_COMPILE_CACHE_DIR": str(tmp_path / "cache")})
    finally:
        os.close(write_end)
    assert done.returncode == status
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kwserver", "run", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, "KWSERVER_COMPILE_CACHE_DIR": str(cwd / "cache")})


@pytest.mark.parametrize("request_doc,why", [
    ([1, 2], "Invalid request object: expected an AdmissionReview"),
    ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"},
     "invalid AdmissionReview object: it has no `request`; expected an AdmissionReview"),
    # An envelope without its kind is read as a bare request, as kwctl reads it: the error says so.
    ({"request": {"uid": "1"}}, "missing field `uid`; a document is read as an AdmissionReview only when its `kind` "
                                "is AdmissionReview, and otherwise as a bare request; expected an AdmissionReview"),
    ({"uid": "1"}, "missing field `kind`; expected an AdmissionReview ({\"apiVersion\": \"admission.k8s.io/v1\", "
                   "\"kind\": \"AdmissionReview\", \"request\": {...}}) or its bare request (an AdmissionRequest: uid"),
])
def test_run_says_what_request_it_takes(request_doc, why, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps(request_doc))
    done = _run(str(REPO / "policies" / "dist" / "pod-privileged.wasm"), "-r", str(request), cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert why in done.stderr, done.stderr


def test_run_says_what_policy_it_takes(tmp_path):
    deployment = tmp_path / "deployment.yml"
    deployment.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n")
    done = _run(str(deployment), "-r", str(REQUESTS / "pod.json"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        'Error: invalid apiVersion Some("apps/v1"): the policy is a Wasm module (path, file://, registry:// or '
        "https:// URL), a YAML file of Kubewarden policy resources (apiVersion policies.kubewarden.io/v1, kind "
        "AdmissionPolicy, ClusterAdmissionPolicy, AdmissionPolicyGroup, ClusterAdmissionPolicyGroup) or a policies.yml")


@pytest.mark.parametrize("text", ["", "{}\n", "---\n---\n"])
def test_run_refuses_a_yaml_file_without_policies(text, tmp_path):
    empty = tmp_path / "policies.yml"
    empty.write_text(text)
    done = _run(str(empty), "-r", str(REQUESTS / "pod.json"), cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"Error: {empty} holds no policy: the policy is a Wasm module"), done.stderr


def test_run_takes_a_policies_yml_with_paths_relative_to_it(tmp_path):
    """The issue's first attempt: `kwserver run deploy/examples/policies.yml -r req.json`, from elsewhere."""
    done = _run(str(EXAMPLE), "-r", str(REQUESTS / "privileged-pod.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    names = re.findall(r"kwserver\.commands\.offline: (\S+):$", done.stderr, re.M)
    assert names == list(yaml.safe_load(EXAMPLE.read_text()))
    verdicts = dict(zip(names, (answer["allowed"] for answer in answers), strict=True))
    assert verdicts["clusterwide-no-privileged-pod"] is False and verdicts["clusterwide-no-host-namespace-sharing"]


def test_docs_writes_the_command_line_reference_as_markdown(tmp_path):
    from kwserver.config import SETTINGS
    from tests.support.server import kwserver

    result = kwserver("docs", "-o", "cli.md", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "cli.md").read_text()
    for command in ("serve", "check", "annotate", "inspect", "pull", "push", "verify", "top", "reload", "run",
                    "manifests", "docs"):
        assert f"## `kwserver {command}`" in text, command
    serve = text.split("## `kwserver serve`")[1].split("\n## ")[0]
    for setting in SETTINGS:
        if not setting.hidden:
            assert f"`{setting.flag}" in serve and setting.env in serve, setting.name
    assert "* `--port <PORT>` — Port of the admission API [default: 3000, env: KUBEWARDEN_PORT]" in serve
    assert "**Usage:** `kwserver annotate [OPTIONS] <module>`" in text


def test_docs_needs_a_file_it_can_create(tmp_path):
    from tests.support.server import kwserver

    missing = kwserver("docs", cwd=tmp_path)
    assert missing.returncode == 2 and "the following arguments are required: --output/-o" in missing.stderr
    result = kwserver("docs", "--output", "no/such/dir/cli.md", cwd=tmp_path)
    assert result.returncode == 1
    assert "error: cannot create file no/such/dir/cli.md: No such file or directory" in result.stderr
