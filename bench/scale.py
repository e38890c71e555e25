"""P3: time and peak memory of a simulated federation with 10, 30 and 100 sites.

Run from the repository root::

    python bench/scale.py                          # 10, 30, 100 sites x 2 rounds, 2 repeats
    python bench/scale.py --sites 10 30 --rounds 2 --repeats 1 --per-site 60

Every site holds the same number of training images (``--per-site``; the synthetic
dataset grows with the federation, as a federation of more hospitals has more
data), so the work per site is constant and a federation that scales well takes
time and memory growing at most linearly in the number of sites. Each run is
``medfed simulate`` as a command; memory is sampled every 0.25 s over the whole
process tree (the CLI, the ServerApp, Ray's GCS/raylet and every worker): peak
RSS summed over processes (counts shared pages once per process, so it
overstates) and peak PSS (shared pages split between their users: the memory
really used).
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

from _common import REPO, Stats, TreeMemorySampler, loadavg, machine, say, write_json

MB = 2**20
TRAIN_FRACTION = 0.8  # the synthetic dataset keeps 20 % of its images as the test split


def run_once(sites: int, rounds: int, per_site: int, extra: list[str], tmp: str) -> dict:
    """One ``medfed simulate`` run; wall time, peak tree memory, per-round times."""
    name = f"scale-{sites}"
    samples = int(round(per_site * sites / TRAIN_FRACTION))
    overrides = [f"data.num_sites={sites}", f"server.rounds={rounds}", f"data.num_samples={samples}",
                 f"strategy.min_sites={sites}", *extra, f"server.out_dir={tmp}", f"server.run_name={name}"]
    command = [str(Path(sys.executable).with_name("medfed")), "simulate"]
    for item in overrides:
        command += ["--set", item]
    load = loadavg()
    start = time.perf_counter()
    with TreeMemorySampler(os.getpid(), interval=0.25) as memory:
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        say("\n".join(done.stderr.splitlines()[-40:]))
        raise SystemExit(f"medfed simulate failed with {sites} sites")
    rows = [json.loads(line) for line in (Path(tmp) / name / "rounds.jsonl").read_text().splitlines() if line]
    times = [row["time"] for row in rows]
    aggregated = [len(row.get("sites", {})) for row in rows[1:]]
    return {"sites": sites, "wall": wall, "peak_rss_mb": memory.peak_rss / MB, "peak_pss_mb": memory.peak_pss / MB,
            "processes": memory.peak_processes, "round_seconds": [b - a for a, b in zip(times, times[1:])],
            "sites_per_round": aggregated, "load": load}


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line ``y = a + b x``: ``(a, b)``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-site", type=int, default=60, help="training images per site")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    info = machine()
    say(f"P3 scale: sites {args.sites}, {args.rounds} rounds, {args.per_site} training images per site, "
        f"overrides {args.sets}\nmachine: {info}")
    runs: dict[int, list[dict]] = {n: [] for n in args.sites}
    for repeat in range(args.repeats):
        for sites in args.sites:
            with tempfile.TemporaryDirectory(prefix="medfed-scale-") as tmp:
                row = run_once(sites, args.rounds, args.per_site, args.sets, tmp)
            runs[sites].append(row)
            say(f"  repeat {repeat + 1} {sites:4d} sites: {row['wall']:7.1f} s, peak RSS {row['peak_rss_mb']:6.0f} MB, "
                f"PSS {row['peak_pss_mb']:6.0f} MB, {row['processes']} processes, rounds "
                f"{[round(r, 1) for r in row['round_seconds']]}, sites per round {row['sites_per_round']}, "
                f"load {row['load']}")

    base = args.sites[0]
    summary = {}
    say("")
    for sites in args.sites:
        wall = Stats([r["wall"] for r in runs[sites]])
        rss = Stats([r["peak_rss_mb"] for r in runs[sites]])
        pss = Stats([r["peak_pss_mb"] for r in runs[sites]])
        growth = wall.median / Stats([r["wall"] for r in runs[base]]).median
        say(f"{sites:4d} sites: time {wall.fmt()}  ({growth:.2f}x the {base}-site time for {sites / base:.1f}x the sites)"
            f"; peak RSS {rss.fmt('MB', 0)}; peak PSS {pss.fmt('MB', 0)}")
        summary[sites] = {"wall": wall.as_dict(), "peak_rss_mb": rss.as_dict(), "peak_pss_mb": pss.as_dict(),
                          "time_ratio_to_smallest": growth}
    if len(args.sites) >= 2:
        xs = [float(n) for n in args.sites]
        t0, t1 = _slope(xs, [summary[n]["wall"]["median"] for n in args.sites])
        m0, m1 = _slope(xs, [summary[n]["peak_pss_mb"]["median"] for n in args.sites])
        say(f"fit: time = {t0:.1f} s + {t1:.2f} s/site; peak PSS = {m0:.0f} MB + {m1:.1f} MB/site")
        summary["fit"] = {"time_fixed_s": t0, "time_per_site_s": t1, "pss_fixed_mb": m0, "pss_per_site_mb": m1}
    write_json(args.json, {"machine": info, "args": vars(args), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
