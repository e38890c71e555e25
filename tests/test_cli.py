"""The medfed command line: config problems, presets and keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from federation.config import valid_keys
from simulations.cli import _exit_status, app

REPO = Path(__file__).resolve().parents[1]

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


def _console_script(*args: str) -> subprocess.CompletedProcess:
    """Run ``medfed`` through its console-script entry point, with an exit handler and a late thread."""
    code = ("import atexit, sys, threading, time; atexit.register(lambda: print('exit handler ran')); "
            "from simulations.cli import main; sys.argv[0] = 'medfed'; "
            "threading.Thread(target=lambda: (time.sleep(2), print('thread done', flush=True))).start(); main()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_console_script_keeps_exit_status_output_threads_and_exit_handlers() -> None:
    ok = _console_script("validate", "--set", "server.rounds=3")
    assert ok.returncode == 0, ok.stderr
    assert "rounds: 3" in ok.stdout and ok.stdout.rstrip().endswith("exit handler ran")
    assert "thread done" in ok.stdout  # non-daemon threads finish first, as at a normal exit
    bad = _console_script("validate", "--set", "train.lrr=1")
    assert bad.returncode == 2
    assert "train.lrr: unknown key" in bad.stdout + bad.stderr and "exit handler ran" in bad.stdout


def test_exit_status_of_system_exit_codes(capsys) -> None:
    assert [_exit_status(None), _exit_status(0), _exit_status(3)] == [0, 0, 3]
    assert _exit_status("no such file") == 1 and "no such file" in capsys.readouterr().err
