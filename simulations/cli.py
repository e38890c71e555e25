"""The ``medfed`` command line (typer + rich, like Flower's own CLI)."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from certs.cli import certs_app
from client.site_cli import site_app
from dashboard.cli import register_dashboard_commands
from deploy.cli import deploy_app
from federation.config import ConfigError, to_yaml, valid_keys
from federation.tasks import get_task
from server.run_outputs import RunOutputs
from simulations.clinical_cli import GALLERY_OUTPUT, announce_outputs, register_clinical_commands, simulation_gallery
from simulations.harness import PRESETS_DIR, resolve_config, run_dir_of, simulate, start_simulation
from simulations.pretrain import register_pretrain_command
from simulations.research_cli import after_simulate, register_research_commands
from simulations.report import round_table, write_plots
from simulations.sweep_spec import failure_reason

app = typer.Typer(
    name="medfed",
    help="Federated learning for medical imaging across hospitals (Flower + MONAI + Opacus).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
app.add_typer(site_app, name="site", help="Hospital-side tools: check a DICOM site folder, make a demo site.")
register_clinical_commands(app)  # medfed predict / explain / clinical-report
register_research_commands(app)  # medfed sweep / report / baselines
register_pretrain_command(app)  # medfed pretrain: central, no DP, on data.public_fraction (model.init)
app.add_typer(certs_app, name="certs")  # consortium CA, SuperLink certificate, site keys
app.add_typer(deploy_app, name="deploy")  # SuperLink, Fleet-only proxy, SuperNodes
register_dashboard_commands(app, site_app)  # medfed dashboard, medfed site dashboard (live, read-only)

ConfigOpt = Annotated[
    Optional[str], typer.Option("--config", "-c", help="Preset YAML file, or a preset name from simulations/configs.")
]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a key: --set train.lr=0.1 (repeatable).")
]


def _setup_logging(verbose: bool) -> None:
    """medfed's own log through rich; Flower keeps its own handler (quiet unless verbose)."""
    import flwr.supercore.logger  # noqa: F401  (sets up the "flwr" logger before we adjust it)

    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, handlers=[RichHandler(console=console, show_path=False)], force=True)
    flower = logging.getLogger("flwr")
    flower.propagate = False
    flower.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@app.command("simulate")
def simulate_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run directory.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")] = False,
    baselines: Annotated[
        bool, typer.Option("--baselines", help="Also train pooled and local-only baselines and compare.")
    ] = False,
) -> None:
    """Run a whole federation on this machine with the real ClientApp and ServerApp.

    With no argument: the offline synthetic preset (3 hospitals, DP-SGD, FedAvg).
    """
    _setup_logging(verbose)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        resolved = start_simulation(
            config_path=config, overrides=set_ or [], resume=str(resume) if resume else None, verbose=verbose
        )
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))
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
            _fail(str(err))
    console.print(round_table(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    eps = summary["privacy"]["epsilon_per_site"]
    if eps:
        console.print("ε per site: " + ", ".join(f"{s} {e:.2f}" for s, e in sorted(eps.items())))
    # the ServerApp recorded the export, clinical report and model card in outputs.json; the harness's own follow
    outputs = RunOutputs.load(run_dir)
    plots = outputs.produce("plots", lambda: write_plots(run_dir))
    skipped = get_task(resolved.data.task).reports_skipped_reason  # segmentation: not adapted yet
    if skipped is not None:
        outputs.skip(GALLERY_OUTPUT, skipped)
        outputs.skip("research report", skipped)
    else:
        simulation_gallery(run_dir, outputs)  # simulation only: reads the simulated sites' images locally
        outputs.produce("research report", lambda: after_simulate(run_dir, baselines=baselines, plots=plots))
    console.print(f"[green]done[/] → {run_dir}")
    announce_outputs(outputs, exit_on_failure=False)  # only files that exist are named
    failure = failure_reason(run_dir)
    if failure is not None:  # every site failed or refused every round: not a result
        _fail(f"{run_dir}: {failure}. Fix the sites (their logs say why) and rerun; nothing was trained.")
    if outputs.failures():  # named above with their reasons; the run's records are kept
        raise typer.Exit(code=1)


@app.command("validate")
def validate_command(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check a config (preset + overrides) and print it resolved; all problems at once."""
    try:
        resolved = resolve_config(config_path=config, overrides=set_ or [])
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))
    console.print(to_yaml(resolved), end="")


@app.command("presets")
def presets_command() -> None:
    """List the shipped presets with the command that runs each."""
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        console.print(f"[bold]{path.stem}[/]: {first}")


@app.command("keys")
def keys_command() -> None:
    """List every config key that --set (or flwr run --run-config) accepts."""
    for key in valid_keys():
        console.print(key)


def main() -> None:
    """The ``medfed`` console script: run the command, then exit without tearing Python down.

    With torch, MONAI, Opacus and Ray loaded, the interpreter's own finalization
    (freeing every module) takes 2-3 s after a command has finished and written
    everything (docs/BENCHMARKS.md, P1). As at a normal exit, non-daemon threads are
    waited for and exit handlers run (Ray's shutdown, temporary directories,
    logging); output is flushed, and the process ends with the command's status.
    """
    try:
        app()
        status = 0
    except SystemExit as done:
        status = _exit_status(done.code)
    except BaseException:  # noqa: BLE001 - report like Python would, then exit 1
        traceback.print_exc()
        status = 1
    for thread in threading.enumerate():  # as at normal exit: wait for non-daemon threads
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers normal interpreter exit would run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _exit_status(code: object) -> int:
    """The process exit status for ``SystemExit(code)`` (None: 0; a message: printed, 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    main()
