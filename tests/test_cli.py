"""The medfed command line: config problems, presets and keys."""

from __future__ import annotations

from typer.testing import CliRunner

from federation.config import valid_keys
from simulations.cli import app

runner = CliRunner()


def test_validate_reports_every_problem_with_exit_code_2() -> None:
    result = runner.invoke(app, ["validate", "--set", "train.lrr=1", "--set", "data.partition=zipf"])
    assert result.exit_code == 2
    assert "train.lrr: unknown key" in result.output
    assert "data.partition" in result.output and "'iid', 'dirichlet'" in result.output


def test_validate_prints_the_resolved_default_preset() -> None:
    result = runner.invoke(app, ["validate", "--set", "server.rounds=3"])
    assert result.exit_code == 0, result.output
    assert "dataset: synthetic" in result.output and "rounds: 3" in result.output


def test_simulate_with_an_unknown_preset_fails_cleanly() -> None:
    result = runner.invoke(app, ["simulate", "--config", "no-such-preset"])
    assert result.exit_code == 2
    assert "presets:" in result.output and "synthetic" in result.output


def test_presets_and_keys() -> None:
    presets = runner.invoke(app, ["presets"])
    assert "pneumonia_dirichlet_dp" in presets.output and "medfed simulate --config" in presets.output
    keys = runner.invoke(app, ["keys"]).output.split()
    assert keys == valid_keys()
