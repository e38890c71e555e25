"""The medfed command line: config problems, presets and keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from federation.config import valid_keys
from medfed.cli import _exit_status, app

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
            "from medfed.cli import main; sys.argv[0] = 'medfed'; "
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


#: Libraries only training, inference, plots or the simulation engine need.
HEAVY = ("torch", "monai", "opacus", "ray", "matplotlib", "scipy", "sklearn")


def _loaded_after(code: str) -> list[str]:
    """Which of :data:`HEAVY` a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return [name for name in done.stdout.strip().split(",") if name]


def test_the_cli_and_light_modules_load_without_the_training_stack() -> None:
    # `medfed --help`, keys, presets, certs, deploy and the site's policy/audit tools
    # must not pay for torch, MONAI, Opacus, Ray or matplotlib (6-8 s on a laptop).
    assert _loaded_after("import medfed.cli") == []
    assert _loaded_after("from federation.data import resolve_data_dir, DATA_DIR_ENV") == []
    assert _loaded_after("from federation.data.dicom import DEFAULT_KEY_COLUMN, read_labels") == []
    assert _loaded_after("import server.run_dir") == []
    # ...while the commands that need it still get it, through the same names.
    assert "torch" in _loaded_after("from federation.data import load_site_data")


def test_help_of_every_command_group_still_renders() -> None:
    for args in (["--help"], ["site", "--help"], ["site", "make-demo", "--help"], ["predict", "--help"],
                 ["certs", "--help"], ["deploy", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    assert "pneumoniamnist" in runner.invoke(app, ["site", "make-demo", "--help"]).output
