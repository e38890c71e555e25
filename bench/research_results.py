"""Measure the research harness against its targets (numbers for docs/RESULTS.md).

    python bench/research_results.py --out /tmp/medfed-results heart attack shift

* ``heart``: Fed-Heart-Disease natural split with FLamby's protocol
  (``sweeps/heart_flamby.yaml``: FedAvg and FedAdam, 5 seeds) plus the pooled and
  local-only baselines per seed (FLamby's: Adam, lr 0.001, 50 epochs, batch 4);
  mean per-site test accuracy against FLamby's published numbers.
* ``attack``: ``sweeps/robust_attack.yaml`` (5 PneumoniaMNIST sites, site-5 scales
  its update x10): global test AUC clean vs attacked per strategy.
* ``shift``: ``pneumonia_shift.yaml`` (5 sites, strong MONAI acquisition shift) with
  pooled / local-only / federated side by side (``--set`` trims it for a CPU).

Every step is resumable (finished runs are skipped). Results go to
``<out>/results.json`` and are printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simulations.baselines import BASELINES_JSON, read_baselines, run_baselines, write_baselines  # noqa: E402
from simulations.harness import resolve_config, simulate  # noqa: E402
from simulations.sweep import SWEEPS_DIR, collect, load_sweep, run_sweep, sweep_dir  # noqa: E402

FLAMBY = {"pooled": 0.735, "fedavg": 0.685, "fedadam": 0.726}
"""FLamby's Fed-Heart-Disease mean per-client test accuracy (as cited in issue 3)."""
SHIFT_SETTINGS = ["data.max_train_samples=2000", "server.rounds=8", "train.num_threads=1"]
"""CPU-sized: 2000 training images (of 4708), 8 rounds."""


def _mean_std(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if not math.isnan(v)]
    return {"mean": statistics.fmean(clean), "std": statistics.stdev(clean) if len(clean) > 1 else 0.0,
            "n": len(clean)}


def heart(out: Path) -> dict[str, Any]:
    """FedAvg/FedAdam sweep plus pooled/local baselines per seed."""
    spec = load_sweep(SWEEPS_DIR / "heart_flamby.yaml")
    root = run_sweep(spec, out_dir=str(out))
    rows = collect(spec, root)
    result: dict[str, Any] = {}
    for strategy in spec.strategies:
        mine = [r for r in rows if r["strategy"] == strategy]
        result[strategy] = {"site_mean_accuracy": _mean_std([r["site_mean_accuracy"] for r in mine]),
                            "global_accuracy": _mean_std([r["global_accuracy"] for r in mine])}
    pooled, local = [], []
    for seed in spec.seeds:
        folder = out / "heart-baselines" / f"seed-{seed}"
        config = resolve_config(config_path="heart_natural", overrides=[f"seed={seed}"])
        if (folder / BASELINES_JSON).is_file():
            results = read_baselines(folder)
        else:
            results = run_baselines(config)
            write_baselines(folder, results, sites=[f"site-{k + 1}" for k in range(4)])
        pooled.append(results[0].mean_over_sites("accuracy"))
        own = [r.per_site[r.method.split(":")[1]]["accuracy"] for r in results if r.method.startswith("local:")]
        local.append(statistics.fmean(own))
    result["pooled"] = {"site_mean_accuracy": _mean_std(pooled)}
    result["local_own_site"] = {"site_mean_accuracy": _mean_std(local)}
    result["flamby"] = FLAMBY
    return result


def attack(out: Path) -> dict[str, Any]:
    """Clean vs attacked global AUC per strategy."""
    spec = load_sweep(SWEEPS_DIR / "robust_attack.yaml")
    root = run_sweep(spec, out_dir=str(out))
    rows = collect(spec, root)
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        table.setdefault(row["strategy"], {})[row["scenario"]] = row["global_auc"]
    for values in table.values():
        values["drop"] = values.get("clean", math.nan) - values.get("scaled-x10", math.nan)
    return {"global_auc": table, "sweep": str(root)}


def shift(out: Path) -> dict[str, Any]:
    """PneumoniaMNIST, strong feature shift: pooled, local-only and federated."""
    run = out / "pneumonia-shift"
    if (run / "summary.json").is_file():
        config = resolve_config(resume=str(run))
    else:
        config = resolve_config(config_path="pneumonia_shift", overrides=[
            *SHIFT_SETTINGS, f"server.out_dir={out}", "server.run_name=pneumonia-shift"])
        simulate(config)
    results = read_baselines(run) if (run / BASELINES_JSON).is_file() else run_baselines(config, run_dir=run)
    table = {}
    for r in results:
        table[r.method] = {"per_site_accuracy": {s: m["accuracy"] for s, m in r.per_site.items()},
                           "mean_site_accuracy": r.mean_over_sites("accuracy"),
                           "mean_site_auc": r.mean_over_sites("auc"), "overall_auc": r.overall.get("auc")}
    return {"settings": SHIFT_SETTINGS, "methods": table, "run": str(run)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/medfed-results"))
    parser.add_argument("steps", nargs="*", default=["heart", "attack", "shift"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for step in args.steps:
        results[step] = {"heart": heart, "attack": attack, "shift": shift}[step](args.out)
        path.write_text(json.dumps(results, indent=2, default=str))
        print(json.dumps({step: results[step]}, indent=2, default=str), flush=True)


if __name__ == "__main__":
    main()
