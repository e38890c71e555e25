"""The ``medfed`` front door: one index of command groups, one way of mounting, one console."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import typer

import medfed.cli
import simulations.cli
from federation.console import command_group, console

REPO = Path(__file__).resolve().parents[1]
GROUP_MODULES = ("simulations/cli.py", "simulations/research_cli.py", "simulations/pretrain.py",
                 "simulations/clinical_cli.py", "client/site_cli.py", "certs/cli.py", "deploy/cli.py",
                 "dashboard/cli.py")


def _names(app: typer.Typer) -> tuple[list[str], list[str]]:
    return [c.name for c in app.registered_commands], [g.name for g in app.registered_groups]


def test_every_command_and_group_is_mounted_once_from_the_index() -> None:
    commands, groups = _names(medfed.cli.app)
    assert commands == ["simulate", "validate", "presets", "keys", "sweep", "report", "baselines", "pretrain",
                        "predict", "explain", "clinical-report", "dashboard"]
    assert groups == ["site", "certs", "deploy"]
    site = [c.name for c in command_group(medfed.cli.app, "site").registered_commands]
    assert "dashboard" in site and "check" in site and site.count("dashboard") == 1


def test_console_script_and_old_names_point_at_the_front_door() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"medfed": "medfed.cli:main"}
    assert "medfed*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert simulations.cli.app is medfed.cli.app and simulations.cli.main is medfed.cli.main


def test_groups_mount_one_way_and_print_through_the_shared_console() -> None:
    for path in GROUP_MODULES:
        text = (REPO / path).read_text()
        assert "Console(" not in text, f"{path} builds its own Console"
        assert re.search(r"^def register_\w+\(app: typer\.Typer\) -> None:", text, re.M), path
        assert "from federation.console import" in text, path
    assert medfed.cli.__dict__.get("console") is None  # the front door prints nothing of its own
    assert console.file is sys.stdout


def test_a_group_added_to_a_group_not_yet_mounted_is_a_clear_error() -> None:
    try:
        command_group(typer.Typer(), "site")
    except LookupError as err:
        assert "no command group 'site' is mounted (mounted: [])" in str(err)
    else:  # pragma: no cover
        raise AssertionError("expected LookupError")


def test_python_dash_m_medfed_runs_without_loading_the_sweep_runner_or_training_stack() -> None:
    code = ("import sys, medfed.cli; "
            "print(sorted(m for m in ('simulations.sweep', 'torch', 'ray', 'monai') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    keys = subprocess.run([sys.executable, "-m", "medfed", "keys"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert keys.returncode == 0, keys.stderr
    assert keys.stdout.split()[:2] == ["name", "seed"]
