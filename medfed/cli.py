"""The ``medfed`` command line: one index of command groups, mounted one way.

Each group lives in the package it serves and exposes ``register_*_commands(app)``,
which adds its commands (or its sub-app) to the app it is given; all of them print
through the one console of :mod:`federation.console`. Group modules import only
typer, rich and light modules at the top, so ``medfed --help`` stays fast
(tests/test_cli.py, bench/cli_latency.py); torch, MONAI, Ray and Flower's engine are
imported inside the commands that need them.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from collections.abc import Callable

import typer

from certs.cli import register_certs_commands
from client.site_cli import register_site_commands
from dashboard.cli import register_dashboard_commands
from deploy.cli import register_deploy_commands
from simulations.cli import register_simulation_commands
from simulations.clinical_cli import register_clinical_commands
from simulations.pretrain import register_pretrain_command
from simulations.research_cli import register_research_commands

#: Every command group, in the order ``medfed --help`` lists them. A group that adds a
#: command to another's sub-app (dashboard -> ``site dashboard``) comes after it.
COMMAND_GROUPS: tuple[Callable[[typer.Typer], None], ...] = (
    register_simulation_commands,  # simulate, validate, presets, keys      (researchers: simulations/)
    register_research_commands,  # sweep, report, baselines                  (simulations/)
    register_pretrain_command,  # pretrain: central, no DP, data.public_fraction (simulations/)
    register_clinical_commands,  # predict, explain, clinical-report          (clinicians: simulations/)
    register_site_commands,  # site check/make-demo/policy-check/audit        (hospitals: client/)
    register_certs_commands,  # certs: consortium CA, SuperLink certificate, site keys (certs/)
    register_deploy_commands,  # deploy: SuperLink, Fleet-only proxy, SuperNodes (deploy/)
    register_dashboard_commands,  # dashboard, site dashboard (live, read-only) (dashboard/)
)


app = typer.Typer(
    name="medfed",
    help="Federated learning for medical imaging across hospitals (Flower + MONAI + Opacus).",
    no_args_is_help=True,
    add_completion=False,
)
for _register in COMMAND_GROUPS:  # once per process: the groups' sub-apps are module-level
    _register(app)


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
