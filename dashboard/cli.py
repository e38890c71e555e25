"""``medfed dashboard`` and ``medfed site dashboard``: serve the dashboard with uvicorn.

Mounted by the main CLI (:func:`register_dashboard_commands`). FastAPI and uvicorn
load only when a command runs, so ``medfed --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dashboard.security import is_loopback, new_token
from federation.console import command_group, console


HostOpt = Annotated[str, typer.Option(
    "--host", help="Address to bind. Anything but 127.0.0.1/localhost/::1 requires the access token it prints.")]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _token_for(host: str) -> str | None:
    """None on a loopback address; else a fresh token, announced once."""
    if is_loopback(host):
        return None
    token = new_token()
    console.print(f"[bold yellow]binding to {host}[/]: every request must carry this access token "
                  "(printed only now; the URL below sets it as a cookie):")
    console.print(f"  token: {token}")
    return token


def _serve(app, *, host: str, port: int, token: str | None) -> None:  # noqa: ANN001 - a FastAPI app
    import uvicorn  # noqa: PLC0415 - only when serving

    shown = f"[{host}]" if ":" in host else host
    console.print(f"dashboard (read-only): http://{shown}:{port}/" + (f"?token={token}" if token else "")
                  + "   (Ctrl+C stops it)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def dashboard_command(
    runs_dirs: Annotated[Optional[list[Path]], typer.Argument(
        help="Folders holding run directories (server.out_dir), sweeps, or one run. Default: runs.")] = None,
    host: HostOpt = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8050,
) -> None:
    """Watch runs live in a browser: runs list, rounds as they happen, ε per site, sweeps (read-only)."""
    roots = runs_dirs or [Path("runs")]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        _fail(f"no such folder: {', '.join(missing)} (pass the folder runs are written to, server.out_dir)")
    from dashboard.app import create_app  # noqa: PLC0415 - FastAPI only when serving

    token = _token_for(host)
    _serve(create_app(roots, token=token), host=host, port=port, token=token)


def site_dashboard_command(
    state_dir: Annotated[Path, typer.Argument(
        help="The site's state dir (node config 'state-dir', or one site's folder in it).")],
    policy: Annotated[Optional[Path], typer.Option(
        "--policy", help="The site policy YAML (node config 'policy'): its lifetime budget is shown.")] = None,
    host: HostOpt = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8051,
) -> None:
    """A hospital's own view: ε per run and over its lifetime against the policy, refusals, errors.

    Reads only this machine's site state; never contacts the coordinator.
    """
    if not state_dir.is_dir():
        _fail(f"no such folder: {state_dir} (pass the node config's state-dir)")
    from client.policy import PolicyError  # noqa: PLC0415
    from dashboard.app import create_site_app  # noqa: PLC0415 - FastAPI only when serving
    from dashboard.site_state import load_budget  # noqa: PLC0415

    try:
        budget = load_budget(policy)
    except (PolicyError, FileNotFoundError) as err:
        _fail(str(err))
        return
    token = _token_for(host)
    _serve(create_site_app(state_dir, budget=budget, token=token), host=host, port=port, token=token)


def register_dashboard_commands(app: typer.Typer) -> None:
    """Add ``dashboard`` to the ``medfed`` app and ``dashboard`` to its ``site`` group (mounted before)."""
    app.command("dashboard")(dashboard_command)
    command_group(app, "site").command("dashboard")(site_dashboard_command)
