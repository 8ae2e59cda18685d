"""The `ems` command: subcommand dispatch, help and errors."""
import os
import subprocess
import sys

import pytest

from ems import cli


def test_cli_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "replay" in out
    assert "build-model" in out


def test_cli_unknown_subcommand(capsys):
    assert cli.main(["serve-all"]) == 2
    err = capsys.readouterr().err
    assert "'serve-all'" in err
    assert "replay" in err


def test_cli_replay_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["replay", "--help"])
    assert exit_info.value.code == 0
    assert "--think-scale" in capsys.readouterr().out


def test_cli_replay_bad_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["replay", "--model", "m", "--in-flight", "0"])
    assert exit_info.value.code == 2
    assert "--in-flight" in capsys.readouterr().err


def test_cli_script_installed():
    """pip installs the `ems` script next to the interpreter (pyproject's project.scripts)."""
    script = os.path.join(os.path.dirname(sys.executable), "ems")
    assert os.path.exists(script), f"{script} is missing: reinstall with pip install -e ."
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "build-model" in result.stdout
