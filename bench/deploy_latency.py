"""Round latency of a real localhost deployment against the same rounds in simulation.

Run from the repository root (needs nginx; a few minutes)::

    python bench/deploy_latency.py                 # 3 sites, default CNN, tiny data, 4 rounds
    python bench/deploy_latency.py --rounds 6 --repeats 2 --out /tmp/latency.json

Variants, run one after the other in each repeat (same config, data and seeds):

* ``simulation``: ``medfed simulate`` (Flower's simulation engine, Ray actors that
  stay alive between rounds);
* ``deploy-flower``: a consortium on 127.0.0.1 (SuperLink behind the nginx Fleet
  proxy, 3 SuperNodes, TLS + node authentication) with Flower 1.42's own timing:
  3 s grid pull interval, 3 s SuperNode idle poll, 1 s SuperExec task poll;
* ``deploy-medfed``: the same consortium with medfed's defaults
  (``server.poll_interval=0.5``, ``--poll-interval 0.5`` for SuperNodes/SuperExec);
* ``deploy-fast``: the same with 0.1 s everywhere (what polling alone can give).

A round is train + evaluate on every site plus central evaluation; its latency
is the difference of consecutive round timestamps in ``rounds.jsonl`` (rounds
2..R: round 1 also installs the FAB). ``clientapp-import`` is the cold start every
deployed message pays (a fresh ``flwr-clientapp`` process importing the app).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Stats, loadavg, machine, run_fresh_python  # noqa: E402

SITES = ("site-1", "site-2", "site-3")
BASE = ["data.num_samples=120", "strategy.min_sites=3", "server.round_timeout=300.0"]


def _round_latencies(run_dir: Path) -> list[float]:
    times = [json.loads(line)["time"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(times[1:], times[2:])]  # rounds 2..R


def run_simulation(out: Path, rounds: int) -> list[float]:
    """``medfed simulate`` with the shared config; per-round latencies of rounds 2..R."""
    medfed = str(Path(sys.executable).parent / "medfed")
    sets = [*BASE, f"server.rounds={rounds}", f"server.out_dir={out}", "server.run_name=sim"]
    cmd = [medfed, "simulate", *[arg for s in sets for arg in ("--set", s)]]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=3600)
    return _round_latencies(out / "sim")


def run_deployment(out: Path, rounds: int, poll: float, certs: Path) -> list[float]:
    """A localhost consortium (``poll`` 0 = Flower's own intervals); per-round latencies of rounds 2..R."""
    from deploy.local import CONNECTION, LocalConsortium

    with LocalConsortium(workdir=out / "work", certs=certs, app_dir=REPO, poll_interval=poll) as lc:
        lc.start_superlink()
        lc.start_proxy()
        lc.wait_listening(lc.superlink_port)
        lc.wait_listening(lc.proxy_port)
        lc.write_connection()
        lc.register(*SITES)
        for index, site in enumerate(SITES):
            lc.start_supernode(site, index=index, num_sites=len(SITES))
        for site in SITES:
            lc.wait_log(f"supernode-{site}", "SuperNode ID:", timeout=300)
        run_config = " ".join(
            [*BASE, f"server.rounds={rounds}", f"server.poll_interval={poll}", f'server.out_dir="{out}"',
             'server.run_name="deploy"']
        )
        started = lc.flwr("run", ".", CONNECTION, "--run-config", run_config, timeout=600)
        if started.returncode != 0:
            raise RuntimeError(started.stdout + started.stderr)
        deadline = time.monotonic() + 300 * (rounds + 2)
        while not (out / "deploy" / "summary.json").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment run did not finish; logs in {out / 'work' / 'logs'}")
            time.sleep(1)
    return _round_latencies(out / "deploy")


def clientapp_import(repeats: int = 3) -> dict[str, dict]:
    """Wall and CPU seconds a fresh process needs to import Flower's ClientApp runner and medfed's ClientApp.

    CPU seconds hardly depend on what else the machine runs; wall seconds do.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        seconds, cpu_seconds, _ = run_fresh_python(["-c", "import flwr.supernode.cli.flwr_clientapp, client.app"],
                                                   repo=REPO)
        wall.append(seconds)
        cpu.append(cpu_seconds)
    return {"wall": Stats(wall).as_dict(), "cpu": Stats(cpu).as_dict()}


def _provision(root: Path) -> Path:
    from certs import create_ca, create_server_certificate, create_site_keys

    create_ca(out_dir=root / "ca")
    create_server_certificate(ca_dir=root / "ca", hosts=["127.0.0.1"], out_dir=root / "server")
    for site in SITES:
        create_site_keys(name=site, out_dir=root / "sites" / site)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--variants", nargs="*", default=["simulation", "deploy-flower", "deploy-medfed", "deploy-fast"]
    )
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON result here.")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    polls = {"deploy-flower": 0.0, "deploy-medfed": 0.5, "deploy-fast": 0.1}
    latencies: dict[str, list[float]] = {v: [] for v in args.variants}
    loads: dict[str, list[float]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="medfed-latency-") as tmp:
        certs = _provision(Path(tmp) / "certs")
        for repeat in range(args.repeats):
            for variant in args.variants:
                out = Path(tmp) / f"{variant}-{repeat}"
                loads[variant].append(loadavg())
                if variant == "simulation":
                    latencies[variant] += run_simulation(out, args.rounds)
                else:
                    latencies[variant] += run_deployment(out, args.rounds, polls[variant], certs)
                print(f"{variant} repeat {repeat}: {[round(x, 2) for x in latencies[variant]]}", file=sys.stderr)
    result = {
        "machine": machine(),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "clientapp_import_s": clientapp_import(),
        "round_latency_s": {v: Stats(s).as_dict() for v, s in latencies.items() if s},
        "loadavg_at_start": loads,
    }
    if "simulation" in latencies and latencies["simulation"]:
        sim = statistics.median(latencies["simulation"])
        result["ratio_to_simulation"] = {
            v: statistics.median(s) / sim for v, s in latencies.items() if s and v != "simulation"
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
