"""Ray worker processes of a simulation end without tearing Python down.

A simulated site's worker process holds torch, MONAI, Opacus, SciPy and the
site's data and model. When the run ends, Flower asks each site actor to exit
(``ray.actor.exit_actor()``) and the interpreter then frees every module and
object one by one: ~2 CPU-s per worker on the 2-core dev box, after the run, while
the command writes its plots and reports (and, in a sweep, while the next run
starts). Everything a site keeps is written and synced per message (audit log,
privacy ledger), so nothing is lost by skipping that teardown.

:func:`exit_without_teardown` is the Ray ``worker_process_setup_hook`` the harness
gives its workers (stdlib only: it runs first thing in every worker).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys


def _exit_now() -> None:
    """Flush what Python buffers (log handlers, stdout, stderr), then end the process."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced stream: nothing to flush
            pass
    os._exit(0)


def exit_without_teardown() -> None:
    """Make this process end right after the exit handlers registered from now on have run.

    Handlers run last-in first-out, so the ones registered later (the site's own,
    Ray's per-actor ones) run first; those registered before (none that hold data
    in a fresh Ray worker) are skipped with the module teardown.
    """
    atexit.register(_exit_now)
