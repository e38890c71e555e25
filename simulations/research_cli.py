"""The research harness's ``medfed`` commands: ``sweep``, ``report`` and ``baselines``.

Registered on the main typer app by :func:`register_research_commands`;
``medfed simulate --baselines`` calls :func:`after_simulate`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from federation.config import ConfigError
from federation.console import console

logger = logging.getLogger(__name__)


def after_simulate(run_dir: Path, *, baselines: bool, plots: list[Path] | None = None) -> Path:
    """Train the baselines (when asked) and write the run's ``report.md``; returns the report path.

    ``plots``: the run's plots if already written (see :func:`write_run_report`).
    """
    from simulations.harness import resolve_config
    from simulations.research_report import write_run_report

    if baselines:
        from simulations.baselines import BASELINES_MD, run_baselines

        console.print("training baselines (pooled, local-only) on the same data and model…")
        run_baselines(resolve_config(resume=str(run_dir)), run_dir=run_dir)
        console.print((run_dir / BASELINES_MD).read_text())
    return write_run_report(run_dir, plots=plots)


def run_baselines_only(run_dir: Path) -> Path:
    """Train the baselines of a finished run and write ``baselines.md`` (a run without a research report)."""
    from simulations.baselines import BASELINES_MD, run_baselines
    from simulations.harness import resolve_config

    console.print("training baselines (pooled, local-only) on the same data and model…")
    run_baselines(resolve_config(resume=str(run_dir)), run_dir=run_dir)
    console.print((run_dir / BASELINES_MD).read_text())
    return run_dir / BASELINES_MD


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def sweep_command(
    preset: Annotated[Path, typer.Argument(help="Sweep preset YAML (see simulations/configs/sweeps/).")],
    out_dir: Annotated[Optional[str], typer.Option("--out-dir", help="Override the preset's out_dir.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and list the runs; run nothing.")] = False,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Rewrite the comparison of finished runs.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run strategies x privacy budgets x seeds (x scenarios); finished runs are skipped, then compare."""
    from simulations.sweep import expand, load_sweep, run_sweep, sweep_dir, validate_sweep
    from simulations.sweep_report import write_sweep_report

    try:
        spec = load_sweep(preset)
        runs = expand(spec)
        validate_sweep(spec)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    root = sweep_dir(spec, out_dir)
    console.print(f"[bold]sweep {spec.name}[/]: {len(runs)} runs → {root}")
    if dry_run:
        for run in runs:
            console.print(f"  {run.run_id}")
        return
    if report_only:
        console.print(f"report: {write_sweep_report(spec, root)}")
        return
    done = {"n": 0}

    def on_run(run, status: str) -> None:  # noqa: ANN001
        if status in ("skipped", "done"):
            done["n"] += status == "done"
        console.print(f"  [{status}] {run.run_id}")

    try:
        root = run_sweep(spec, out_dir=out_dir, on_run=on_run, verbose=verbose)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
    console.print((root / "comparison.md").read_text())
    console.print(f"[green]done[/] → {root / 'report.md'}")


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    baselines: Annotated[bool, typer.Option("--baselines", help="Also train the pooled/local baselines.")] = False,
) -> None:
    """(Re)write a run's report.md and plots, optionally training its baselines first."""
    if not (run_dir / "config.yaml").is_file():
        _fail(f"{run_dir} is not a medfed run directory (no config.yaml)")
    console.print(f"report: {after_simulate(run_dir.resolve(), baselines=baselines)}")


def baselines_command(
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="Preset YAML file or name.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key (repeatable).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for baselines.json / baselines.md.")] = Path("baselines"),
) -> None:
    """Train only the pooled and local-only baselines of a config (no federated run)."""
    from simulations.baselines import BASELINES_MD, run_baselines, write_baselines
    from simulations.harness import resolve_config

    try:
        resolved = resolve_config(config_path=config, overrides=set_ or [])
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))
    results = run_baselines(resolved)
    write_baselines(out, results, sites=[f"site-{k + 1}" for k in range(resolved.data.num_sites)])
    console.print((out / BASELINES_MD).read_text())


def register_research_commands(app: typer.Typer) -> None:
    """Add ``sweep``, ``report`` and ``baselines`` to the ``medfed`` app."""
    app.command("sweep")(sweep_command)
    app.command("report")(report_command)
    app.command("baselines")(baselines_command)
