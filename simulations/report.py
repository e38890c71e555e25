"""Read a run directory back: a per-round table and PNG plots."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from federation.tasks import headline_metric
from server.run_dir import CONFIG_FILE, PRIVACY_FILE, ROUNDS_FILE, SITES_FILE, read_jsonl

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:  # not applicable (round 0 trains nothing) or not sent
        return "–"
    if isinstance(value, float) and math.isnan(value):  # undefined, e.g. the AUC of a one-class split
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def headline(run_dir: Path) -> tuple[str, str]:
    """The run's headline metric and its label: ``("auc", "AUC")``, or ``("dice", "Dice")`` for segmentation."""
    path = run_dir / CONFIG_FILE
    task = "classification"
    if path.is_file():
        task = str(((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("task", task))
    metric = headline_metric(task)
    return metric, {"auc": "AUC", "dice": "Dice"}.get(metric, metric)


def round_table(run_dir: Path) -> Table:
    """One row per round: global headline metric (AUC, or Dice)/accuracy/loss, site mean of it, max ε, who took part."""
    rounds = read_jsonl(run_dir / ROUNDS_FILE)
    epsilon = _epsilon_by_round(run_dir)
    metric, label = headline(run_dir)
    table = Table(title=f"medfed run {run_dir.name}")
    for column in ("round", f"global {label}", "global acc", "global loss", f"site {label}", "train loss", "max ε",
                   "sites", "refused/failed"):
        table.add_column(column, justify="right")
    for row in rounds:
        rnd = row["round"]
        glob = row.get("global") or {}
        evaluate = row.get("evaluate") or {}
        train = row.get("train") or {}
        eps = epsilon.get(rnd, {})
        issues = len(row.get("refused") or {}) + len(row.get("failed") or {})
        table.add_row(
            str(rnd),
            _fmt(glob.get(metric)),
            _fmt(glob.get("accuracy")),
            _fmt(glob.get("loss")),
            _fmt(evaluate.get(metric)),
            _fmt(train.get("train-loss")),
            _fmt(max(eps.values()) if eps else None, 2),
            str(len(row.get("sites") or {})) if rnd else "–",
            str(issues) if rnd else "–",
        )
    return table


def _epsilon_by_round(run_dir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for row in read_jsonl(run_dir / PRIVACY_FILE):
        if isinstance(row.get("epsilon"), (int, float)):
            out[int(row["round"])][row["site"]] = float(row["epsilon"])
    return out


def _site_series(run_dir: Path, phase: str, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for row in read_jsonl(run_dir / SITES_FILE):
        value = (row.get("metrics") or {}).get(metric)  # None: undefined (one-class split) or not sent
        if row.get("phase") == phase and isinstance(value, (int, float)) and math.isfinite(value):
            series[row["site"]][0].append(int(row["round"]))
            series[row["site"]][1].append(float(value))
    return dict(sorted(series.items()))


def write_plots(run_dir: Path) -> list[Path]:
    """Save ``global_auc.png``, ``site_auc.png`` (segmentation: ``global_dice.png``, ``site_dice.png``) and ``epsilon.png`` under ``plots/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    metric, label = headline(run_dir)
    rounds = [r for r in read_jsonl(run_dir / ROUNDS_FILE)
              if isinstance((r.get("global") or {}).get(metric), (int, float))]
    written = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["round"] for r in rounds], [r["global"][metric] for r in rounds], marker="o")
    ax.set(xlabel="round", ylabel=f"test {label} (global model, pooled test set)", title=f"Global {label} per round")
    ax.grid(alpha=0.3)
    save(fig, f"global_{metric}.png")

    for phase, series, name, axis_label in (
        ("evaluate", metric, f"site_{metric}.png", f"{label} on the site's own test split"),
        ("train", "epsilon", "epsilon.png", "ε spent (δ as configured)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for site, (xs, ys) in _site_series(run_dir, phase, series).items():
            ax.plot(xs, ys, marker=".", label=site)
        ax.set(xlabel="round", ylabel=axis_label, title=f"{axis_label.split(' (')[0]} per site")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        save(fig, name)
    return written
