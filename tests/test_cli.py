import pytest

from kwserver.commands.cli import main


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

    manifest = Path(__file__).parent.parent / "deploy/kubernetes/kwserver.yaml"
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(manifest.read_text())}
    container = documents["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    settings = settings_from_args(build_parser().parse_args(["serve", *container["args"]]), environ={})
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"https": settings.port, "readiness": settings.readiness_probe_port}  # metrics on readiness
    annotations = documents["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_listener_port)
    assert settings.tls and settings.autoscaling
    assert yaml.safe_load(documents["ConfigMap"]["data"]["policies.yml"])


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
