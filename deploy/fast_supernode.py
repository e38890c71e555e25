"""``flower-supernode`` with a shorter idle poll: ``python -m deploy.fast_supernode --poll-interval 0.5 -- ARGS``.

Flower 1.42's SuperNode asks the SuperLink for work and, when there is none,
sleeps a hard-coded 3 s (``flwr/supernode/start_client_internal.py``); it also
waits in fixed 0.5 s steps for the ClientApp's reply. A round message therefore
sits up to 3 s at the SuperLink before a site even sees it. This launcher caps
those sleeps (in that module only) at ``--poll-interval`` seconds and sets
Flower's own ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (how often the SuperExec looks
for a ClientApp to start, default 1 s) to the same value, then runs Flower's
unchanged ``flower-supernode`` entry point with ARGS. medfed pins flwr to 1.42.x;
the patch checks that the module still looks as expected and refuses otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time as _time
from types import ModuleType

POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class CappedSleepTime:
    """Stands in for the ``time`` module inside one Flower module: ``sleep`` is capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        """Sleep ``min(seconds, cap)``."""
        _time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):  # noqa: ANN204 - time.time, time.monotonic, ...
        return getattr(_time, name)


def patch_supernode_polling(interval: float) -> ModuleType:
    """Cap the SuperNode's polling sleeps at ``interval`` seconds (this process only).

    Returns:
        The patched Flower module.

    Raises:
        RuntimeError: When the installed flwr does not have the expected module layout.
    """
    if not 0 < interval <= 3:
        raise ValueError(f"--poll-interval must be in (0, 3] seconds, got {interval}")
    from federation.flower_internals import supernode_polling_module  # noqa: PLC0415

    module = supernode_polling_module()  # the patch target

    if getattr(module, "time", None) is not _time and not isinstance(getattr(module, "time", None), CappedSleepTime):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer uses the time module as in flwr 1.42; "
            "run flower-supernode directly (without --poll-interval)"
        )
    module.time = CappedSleepTime(interval)  # type: ignore[attr-defined]
    return module


def main(argv: list[str] | None = None) -> None:
    """Parse ``--poll-interval``, patch, then hand the remaining arguments to flower-supernode."""
    parser = argparse.ArgumentParser(prog="python -m deploy.fast_supernode", description=__doc__.splitlines()[0])
    parser.add_argument("--poll-interval", type=float, default=0.5, help="Seconds between idle polls (Flower: 3).")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    os.environ.setdefault(POLL_ENV, str(args.poll_interval))
    patch_supernode_polling(args.poll_interval)
    from federation.flower_internals import flower_supernode_main  # noqa: PLC0415

    flower_supernode = flower_supernode_main()  # after the patch

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
