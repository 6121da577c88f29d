import pytest

from kwserver.commands.cli import main


@pytest.mark.parametrize("command", ["serve", "check", "annotate", "inspect", "top", "reload", "run"])
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
