"""How long a ``medfed`` command takes before it does anything: start-up of the CLI.

Run from the repository root::

    python bench/cli_latency.py                       # this checkout, 7 repeats
    python bench/cli_latency.py --repo /tmp/old-wt    # another checkout (e.g. a git worktree of an older commit)

Each command runs as ``python -m medfed ARGS`` in a fresh interpreter
(what the ``medfed`` console script runs), with the checkout first on
``PYTHONPATH``, from start to exit, ``--repeats`` times; all commands and the two
baselines are interleaved in every repeat. Baselines measured in the same run:
``python -c pass`` (the interpreter's own start-up, the floor of any command) and
``python -c "import torch"`` (what a command that loads the training stack pays
at least). The table gives the median (min-max) and the ratio to ``python -c pass``.

Commands that only print or check files (``--help``, ``keys``, ``presets``,
``certs``, ``deploy``, the site's ``policy-check``/``audit`` help) should be near
the floor; ``validate`` checks dataset and model names against their registries,
which load torch and MONAI, so it is not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import REPO, Stats, loadavg, machine, ratio, run_fresh_python, say, write_json

COMMANDS: list[list[str]] = [
    ["--help"],
    ["keys"],
    ["presets"],
    ["certs", "--help"],
    ["deploy", "--help"],
    ["site", "policy-check", "--help"],
    ["simulate", "--help"],
    ["validate"],
]
BASELINES = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to time (default: this one)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    repo = args.repo.resolve()
    runs = {name: [] for name in BASELINES} | {"medfed " + " ".join(cmd): [] for cmd in COMMANDS}
    info = machine()
    say(f"CLI latency of {repo}, {args.repeats} repeats, interleaved\nmachine: {info}")
    loads = []
    for _ in range(args.repeats):
        loads.append(loadavg())
        for name, argv in BASELINES.items():
            runs[name].append(run_fresh_python(argv, repo=repo)[0])
        for cmd in COMMANDS:
            runs["medfed " + " ".join(cmd)].append(run_fresh_python(["-m", "medfed", *cmd], repo=repo)[0])
    floor = runs["python -c pass"]
    say(f"\n{'command':36s} {'wall, median (min-max)':26s} ratio to python -c pass")
    summary = {}
    for name, seconds in runs.items():
        say(f"{name:36s} {Stats(seconds).fmt():26s} {ratio(seconds, floor).fmt('x')}")
        summary[name] = {"wall": Stats(seconds).as_dict(), "ratio_to_python": ratio(seconds, floor).as_dict()}
    say(f"load average during the runs: {min(loads)}-{max(loads)}")
    write_json(args.json, {"machine": info, "repo": str(repo), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
