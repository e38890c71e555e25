"""The one rich console of the ``medfed`` command line, shared by every command group.

Each command group (``simulations/cli.py``, ``client/site_cli.py``, ``certs/cli.py``,
...) prints through :data:`console` and mounts itself on the front door
(``medfed/cli.py``) with a ``register_*_commands(app)`` function. This module holds
no application code, so every group can import it downward.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

#: Everything the commands print for the user (stdout).
console = Console()
#: For commands whose stdout carries a result meant for a pipe (``medfed deploy``'s checked commands).
stderr_console = Console(stderr=True)


def fail(message: str, *, code: int = 2) -> NoReturn:
    """Print ``error: message`` and end the command with ``code`` (2: bad input)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=code)


def command_group(app: typer.Typer, name: str) -> typer.Typer:
    """The sub-app mounted on ``app`` as ``name`` (for a group that adds a command to another's group).

    Raises:
        LookupError: When no group ``name`` is mounted yet (the front door's index orders the groups).
    """
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    mounted = sorted(info.name for info in app.registered_groups if info.name)
    raise LookupError(f"no command group {name!r} is mounted (mounted: {mounted}); register it first")
