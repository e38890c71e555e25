"""The researchers' simulation commands: ``medfed simulate``, ``validate``, ``presets``, ``keys``.

Mounted on the front door (``medfed/cli.py``) by :func:`register_simulation_commands`.
``simulations.cli.app`` and ``simulations.cli.main`` still name the whole ``medfed``
app and its console script (older scripts and tests import them from here).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from federation.config import ConfigError, to_yaml, valid_keys
from federation.console import console, fail
from federation.tasks import get_task
from server.run_outputs import RunOutputs
from simulations.clinical_cli import announce_outputs, simulation_gallery
from simulations.harness import PRESETS_DIR, resolve_config, run_dir_of, simulate, start_simulation
from simulations.research_cli import after_simulate, run_baselines_only
from simulations.report import round_table, write_plots
from simulations.sweep_spec import failure_reason

ConfigOpt = Annotated[
    Optional[str], typer.Option("--config", "-c", help="Preset YAML file, or a preset name from simulations/configs.")
]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a key: --set train.lr=0.1 (repeatable).")
]


def _setup_logging(verbose: bool) -> None:
    """medfed's own log through rich; Flower keeps its own handler (quiet unless verbose)."""
    from federation.flower_internals import flower_logger  # noqa: PLC0415 - Flower only when a command runs

    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, handlers=[RichHandler(console=console, show_path=False)], force=True)
    flower = flower_logger()  # set up by Flower first, then adjusted
    flower.propagate = False
    flower.setLevel(logging.DEBUG if verbose else logging.WARNING)


def simulate_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run directory.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")] = False,
    baselines: Annotated[
        bool, typer.Option("--baselines", help="Also train pooled and local-only baselines and compare.")
    ] = False,
    ray_address: Annotated[
        Optional[str],
        typer.Option("--ray-address", help="Run the sites on this Ray cluster (host:port of `ray start --head`)."),
    ] = None,
) -> None:
    """Run a whole federation with the real ClientApp and ServerApp (here, or on a Ray cluster).

    With no argument: the offline synthetic preset (3 hospitals, DP-SGD, FedAvg).
    """
    _setup_logging(verbose)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        resolved = start_simulation(
            config_path=config,
            overrides=[*(set_ or []), *([f"simulation.ray_address={ray_address}"] if ray_address else [])],
            resume=str(resume) if resume else None,
            verbose=verbose,
        )
    except (ConfigError, FileNotFoundError) as err:
        fail(str(err))
    run_dir = run_dir_of(resolved)
    dp = (
        f"DP-SGD target ε={resolved.privacy.target_epsilon}, δ={resolved.privacy.target_delta}"
        if resolved.privacy.enabled
        else "no DP"
    )
    console.print(
        f"[bold]medfed[/] {resolved.data.num_sites} sites · {resolved.data.dataset} ({resolved.data.partition}) · "
        f"{resolved.model.name} · {resolved.strategy.name} · {dp} · {resolved.server.rounds} rounds\n"
        f"run directory: {run_dir}"
    )
    progress = Progress(
        TextColumn("[bold blue]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
    )
    with progress:
        task = progress.add_task("rounds", total=resolved.server.rounds, status="starting sites…")

        last = {"status": ""}  # rounds without evaluation (server.eval_every) keep the last value

        def on_round(row: dict) -> None:
            auc = (row.get("global") or {}).get("auc")
            if auc is not None:
                last["status"] = f"global AUC {auc:.4f} (round {row['round']})"
            progress.update(task, completed=row["round"], status=last["status"])

        try:
            simulate(resolved, on_round=on_round, verbose=verbose)
        except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
            progress.stop()
            fail(str(err))
    console.print(round_table(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    eps = summary["privacy"]["epsilon_per_site"]
    if not resolved.privacy.enabled:  # a site without DP-SGD records 0 spent, which is no guarantee at all
        console.print("no differential privacy (privacy.enabled=false): the updates carry no ε guarantee")
    elif eps:
        console.print("ε per site: " + ", ".join(f"{s} {e:.2f}" for s, e in sorted(eps.items())))
    # the ServerApp recorded the export, clinical report and model card in outputs.json; the harness's own follow
    outputs = RunOutputs.load(run_dir)
    plots = outputs.produce("plots", lambda: write_plots(run_dir))
    skipped = get_task(resolved.data.task).reports_skipped_reason  # a task the research report does not know
    simulation_gallery(run_dir, outputs)  # simulation only: reads the simulated sites' images locally
    if skipped is not None:
        outputs.skip("research report", skipped)
        if baselines:  # pooled vs local-only vs federated, compared by the task's metric (Dice)
            outputs.produce("baselines", lambda: run_baselines_only(run_dir))
    else:
        outputs.produce("research report", lambda: after_simulate(run_dir, baselines=baselines, plots=plots))
    console.print(f"[green]done[/] → {run_dir}")
    announce_outputs(outputs, exit_on_failure=False)  # only files that exist are named
    failure = failure_reason(run_dir)
    if failure is not None:  # every site failed or refused every round: not a result
        fail(f"{run_dir}: {failure}. Fix the sites (their logs say why) and rerun; nothing was trained.")
    if outputs.failures():  # named above with their reasons; the run's records are kept
        raise typer.Exit(code=1)


def validate_command(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check a config (preset + overrides) and print it resolved; all problems at once."""
    try:
        resolved = resolve_config(config_path=config, overrides=set_ or [])
    except (ConfigError, FileNotFoundError) as err:
        fail(str(err))
    console.print(to_yaml(resolved), end="")


def presets_command() -> None:
    """List the shipped presets with the command that runs each."""
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        console.print(f"[bold]{path.stem}[/]: {first}")


def keys_command() -> None:
    """List every config key that --set (or flwr run --run-config) accepts."""
    for key in valid_keys():
        console.print(key)


def register_simulation_commands(app: typer.Typer) -> None:
    """Add ``simulate``, ``validate``, ``presets`` and ``keys`` to the ``medfed`` app."""
    app.command("simulate")(simulate_command)
    app.command("validate")(validate_command)
    app.command("presets")(presets_command)
    app.command("keys")(keys_command)


def __getattr__(name: str) -> Any:  # noqa: ANN401 - the front door's objects, for older imports
    """``app``, ``main`` and ``_exit_status`` of :mod:`medfed.cli` (imported on first use: no cycle)."""
    if name in ("app", "main", "_exit_status"):
        import medfed.cli  # noqa: PLC0415

        return getattr(medfed.cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # pragma: no cover - `python -m simulations.cli` as before
    from medfed.cli import main

    main()
