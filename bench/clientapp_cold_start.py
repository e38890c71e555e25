"""What a deployed site pays per message: a fresh ClientApp process that imports the app and handles it.

Run from the repository root (about 30 s per repeat)::

    python bench/clientapp_cold_start.py                      # this checkout, 5 repeats
    python bench/clientapp_cold_start.py --against /tmp/old-wt   # and an older checkout (a git worktree), interleaved

In a Flower 1.42 deployment the SuperNode's SuperExec starts a fresh
``flwr-clientapp`` process for every message (docs/BENCHMARKS.md, deployment
latency). Each case is one fresh interpreter that imports Flower's ClientApp
runner and medfed's ``client.app``, then hands the app one message, as Flower
would: an ``evaluate`` message, or a ``train`` message with DP-SGD (tiny synthetic
site: 2 sites, 160 samples, CNN width 4, so that start-up dominates, as it does for
a real site's evaluation). Baselines in the same run: ``python -c pass`` and the
import of Flower's ClientApp runner alone (the floor of any Flower ClientApp).

Reported: wall and CPU seconds (user + system of the child, which hardly depend on
other load), median (min-max) over ``--repeats`` interleaved repeats, and whether
the process had loaded Opacus when it exited. With ``--against``, every case also
runs from that checkout in the same repeats (each case back to back, the two
checkouts taking turns to go first), and the ratio this / that is given per repeat
(median, min-max): the machine's drift cancels out.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import REPO, Stats, loadavg, machine, ratio, run_fresh_python, say, write_json

RUNNER = "import flwr.supernode.cli.flwr_clientapp"

#: One message through medfed's ClientApp in a fresh process; prints whether Opacus got loaded.
CASE = """
import sys, tempfile, time
{runner}
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import app
from federation.config import load_config, to_flat
from federation.models import build_model

config = load_config(None, {overrides!r})
# The global weights arrive by message in a deployment; here they are built without the DP check.
weights = build_model(config.model, in_channels=1, num_classes=2, dp=False).state_dict()
disk = tempfile.mkdtemp(prefix="medfed-cold-")  # a deployed site: its own data and state folders
node_config = {{"site-name": "site-1", "data-dir": disk, "state-dir": disk, "partition-id": 0, "num-partitions": 2}}
context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=to_flat(config))
content = RecordDict({{"arrays": ArrayRecord(weights),
                      "config": ConfigRecord({{"server-round": 1, "run-name": "cold"}})}})
metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=600.0, message_type="{kind}")
reply = app(Message(content=content, metadata=metadata), context)
assert not reply.has_error(), reply.error
print("opacus loaded" if "opacus" in sys.modules else "no opacus")
"""


def _run(code: str, repo: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of ``python -c code`` with ``repo`` first on the path, and its last stdout line."""
    wall, cpu, out = run_fresh_python(["-c", code], repo=repo, env={"FLWR_TELEMETRY_ENABLED": "0"})
    return wall, cpu, (out.strip().splitlines() or [""])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to time (default: this one)")
    parser.add_argument("--against", type=Path, default=None, help="also time this checkout, interleaved")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    repos = {"this": args.repo.resolve()}
    if args.against is not None:
        repos["against"] = args.against.resolve()
    info = machine()
    say(f"ClientApp cold start, {args.repeats} repeats, interleaved: "
        + ", ".join(f"{k} = {v}" for k, v in repos.items()) + f"\nmachine: {info}")
    with tempfile.TemporaryDirectory(prefix="medfed-cold-") as tmp:
        overrides = ["data.num_sites=2", "data.num_samples=160", "model.width=4", "train.batch_size=16",
                     f"server.out_dir={tmp}", f"simulation.site_state_dir={tmp}/disks"]
        cases = {
            "python -c pass": "pass",
            "Flower ClientApp runner import": RUNNER,
            "evaluate message": CASE.format(runner=RUNNER, overrides=overrides, kind="evaluate"),
            "train message (DP)": CASE.format(runner=RUNNER, overrides=overrides, kind="train"),
        }
        walls = {(r, n): [] for r in repos for n in cases}
        cpus = {(r, n): [] for r in repos for n in cases}
        notes = {(r, n): "" for r in repos for n in cases}
        loads = []
        for repeat in range(args.repeats):
            loads.append(loadavg())
            order = list(repos.items())[:: 1 if repeat % 2 == 0 else -1]  # alternate who goes first
            for name, code in cases.items():
                for which, repo in order:
                    wall, cpu, last = _run(code, repo)
                    walls[which, name].append(wall)
                    cpus[which, name].append(cpu)
                    if name not in ("python -c pass", "Flower ClientApp runner import"):
                        notes[which, name] = last
    say(f"\n{'case':40s} {'wall, median (min-max)':26s} {'CPU, median (min-max)':26s}")
    summary = {}
    for name in cases:
        for which in repos:
            key = (which, name)
            label = f"{name} [{which}]" if len(repos) > 1 else name
            say(f"{label:40s} {Stats(walls[key]).fmt():26s} {Stats(cpus[key]).fmt():26s} {notes[key]}")
            summary[label] = {"wall": Stats(walls[key]).as_dict(), "cpu": Stats(cpus[key]).as_dict(),
                              "opacus": notes[key]}
        if len(repos) > 1:
            cpu_ratio = ratio(cpus["this", name], cpus["against", name])
            say(f"{'':40s} this / against: wall {ratio(walls['this', name], walls['against', name]).fmt('x')}, "
                f"CPU {cpu_ratio.fmt('x')}")
            summary[f"{name} ratio"] = {"wall": ratio(walls["this", name], walls["against", name]).as_dict(),
                                        "cpu": cpu_ratio.as_dict()}
    say(f"load average during the runs: {min(loads)}-{max(loads)}")
    write_json(args.json, {"machine": info, "repos": {k: str(v) for k, v in repos.items()}, "summary": summary})


if __name__ == "__main__":
    main()
