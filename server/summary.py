"""The final summary of a run, built from the records in its run directory."""

from __future__ import annotations

import math
from typing import Any

from federation.config import ExperimentConfig
from federation.tasks import headline_metric
from server.run_dir import PRIVACY_FILE, SITES_FILE, RunDirectory, read_jsonl


def build_summary(*, run: RunDirectory, config: ExperimentConfig) -> dict[str, Any]:
    """Summarize a run: final and best global metrics, last metrics and ε of every site.

    Args:
        run: The run directory whose records are summarized.
        config: The run's config.
    """
    rounds = run.rounds()
    completed = [r for r in rounds if r.get("round", 0) > 0]
    final = rounds[-1]["global"] if rounds else {}
    headline = headline_metric(config.data.task)  # auc, or dice for segmentation
    best = max(  # a round without a global AUC (not evaluated, or undefined: NaN) is not a candidate
        (r for r in rounds if isinstance((r.get("global") or {}).get(headline), (int, float))
         and math.isfinite(r["global"][headline])),
        key=lambda r: r["global"][headline],
        default=None,
    )
    site_eval: dict[str, dict[str, float]] = {}
    for row in read_jsonl(run.path / SITES_FILE):
        if row.get("phase") == "evaluate":
            site_eval[row["site"]] = row.get("metrics") or {}
    epsilon: dict[str, float] = {}
    for row in read_jsonl(run.path / PRIVACY_FILE):
        if isinstance(row.get("epsilon"), (int, float)):
            epsilon[row["site"]] = row["epsilon"]
    return {
        "run": run.name,
        "dataset": config.data.dataset,
        "task": config.data.task,
        "model": config.model.name,
        "strategy": config.strategy.name,
        "privacy": {
            "enabled": config.privacy.enabled,
            "target_epsilon": config.privacy.target_epsilon,
            "delta": config.privacy.target_delta,
            "epsilon_per_site": epsilon,
            "max_epsilon": max(epsilon.values(), default=0.0),
        },
        "rounds_planned": config.server.rounds,
        "rounds_completed": len(completed),
        "rounds_aggregated": sum(1 for r in completed if r.get("aggregated")),
        "final_global": final,
        "best_round": best["round"] if best else None,
        f"best_global_{headline}": best["global"][headline] if best else None,
        "final_site_evaluate": site_eval,
        "refusals": {r["round"]: r["refused"] for r in completed if r.get("refused")},
        "failures": {r["round"]: r["failed"] for r in completed if r.get("failed")},
        "seconds": rounds[-1].get("time") if rounds else 0.0,
    }
