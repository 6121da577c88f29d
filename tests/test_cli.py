import pytest

from kwserver.cli import main


@pytest.mark.parametrize("command", ["serve", "check", "annotate", "inspect", "top", "reload"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kwserver" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "wasmtime" in capsys.readouterr().out
