"""The command-line edge: help, version, exit codes, and errors as one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlops import __version__
from mlops.cli import app
from mlops.config import load_config
from mlops.errors import ConfigError

from .conftest import Workspace, run_mlops

COMMANDS = ["synth", "download", "prepare", "train", "validate", "find-best", "evaluate", "predict", "serve", "drift"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(cli: CliRunner, command: str) -> None:
    result = cli.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "OVERRIDES" in result.output


def test_version(cli: CliRunner) -> None:
    result = cli.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_missing_source_is_one_line_exit_1(workspace: Workspace, tmp_path: Path) -> None:
    proc = run_mlops("prepare", str(tmp_path / "nowhere" / "Task04_Hippocampus"), env=workspace.env())
    assert proc.returncode == 1
    assert "Task04_Hippocampus: no such Decathlon task folder or .tar" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_default_source_points_to_download(workspace: Workspace) -> None:
    proc = run_mlops("prepare", env=workspace.env())
    assert proc.returncode == 1
    assert "run `mlops download` first" in proc.stderr


def test_bad_override_is_usage_error(cli: CliRunner) -> None:
    result = cli.invoke(app, ["prepare", "prepare.no_such_key=1"])
    assert result.exit_code == 2
    assert "no_such_key" in result.output


def test_unknown_command_is_usage_error(cli: CliRunner) -> None:
    assert cli.invoke(app, ["no-such-command"]).exit_code == 2


def test_every_config_group_composes() -> None:
    for group in ("hippocampus", "synthetic"):
        cfg = load_config([f"dataset={group}"])
        assert cfg.dataset.source and cfg.paths.raw.endswith("nnUNet_raw")
    with pytest.raises(ConfigError):
        load_config(["dataset=nope"])


def test_synth_cli(cli: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "Task777_Tiny"
    result = cli.invoke(app, ["synth", str(out), "--train", "3", "--test", "1", "--channels", "2"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "imagesTr").iterdir())) == 3
    assert len(list((tmp_path / "Task777_Tiny_labelsTs").iterdir())) == 1
    again = cli.invoke(app, ["synth", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
