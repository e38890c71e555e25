"""A sweep's comparison: mean +- std over seeds as Markdown and CSV, and its plots."""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from simulations.sweep_spec import NO_DP, SweepSpec, collect, failed_runs

logger = logging.getLogger(__name__)

COMPARISON_MD = "comparison.md"
COMPARISON_CSV = "comparison.csv"
RUNS_CSV = "runs.csv"
METRICS = ("global_auc", "global_accuracy", "site_mean_auc", "site_mean_accuracy", "max_epsilon")
SEGMENTATION_METRICS = ("global_dice", "site_mean_dice", "max_epsilon")
LABELS = {"global_auc": "global AUC", "global_accuracy": "global accuracy", "site_mean_auc": "mean site AUC",
          "site_mean_accuracy": "mean site accuracy", "max_epsilon": "max ε spent", "global_dice": "global Dice",
          "site_mean_dice": "mean site Dice"}


def report_metrics(metric: str) -> tuple[str, ...]:
    """The comparison's columns for the sweep's ranking metric (``dice``: segmentation runs)."""
    return SEGMENTATION_METRICS if metric == "dice" else METRICS


def _stats(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan
    return float(np.mean(clean)), float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0


def comparison(rows: list[dict[str, Any]], *, grid_keys: list[str], metric: str = "auc") -> list[dict[str, Any]]:
    """Group runs by everything but the seed; mean and sample std of every metric of :func:`report_metrics`."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["scenario"], row["strategy"], row["epsilon"], *(row.get(k) for k in grid_keys))].append(row)
    table = []
    for key, members in groups.items():
        entry: dict[str, Any] = {"scenario": key[0], "strategy": key[1], "epsilon": key[2],
                                 **dict(zip(grid_keys, key[3:])), "seeds": len(members)}
        for column in report_metrics(metric):
            entry[f"{column}_mean"], entry[f"{column}_std"] = _stats([m[column] for m in members])
        table.append(entry)
    return table


def _pm(mean: float, std: float, digits: int = 3) -> str:
    return "n/a (no run reported it)" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def ranking_line(table: list[dict[str, Any]], *, metric: str) -> str:
    """``Ranked by global <metric>: 1. <group> (mean), ...`` (groups without a value last)."""
    key = f"global_{metric}_mean"

    def label(e: dict[str, Any]) -> str:
        eps = "no DP" if e["epsilon"] == NO_DP else f"ε {e['epsilon']}"
        grid = [str(v) for k, v in e.items() if k not in ("scenario", "strategy", "epsilon", "seeds")
                and not k.endswith(("_mean", "_std"))]
        return " / ".join([e["scenario"], e["strategy"], eps, *grid])

    ordered = sorted(table, key=lambda e: (math.isnan(e[key]), -e[key] if not math.isnan(e[key]) else 0.0))
    return (f"Ranked by global {LABELS.get(f'global_{metric}', metric).split(' ', 1)[1]}: "
            + ", ".join(f"{k}. {label(e)} ({_pm(e[key], e[f'global_{metric}_std'])})"
                        for k, e in enumerate(ordered, 1)))


def comparison_markdown(table: list[dict[str, Any]], *, grid_keys: list[str], metric: str = "auc") -> str:
    """The comparison as a Markdown table (columns of :func:`report_metrics`)."""
    columns = report_metrics(metric)
    head = ["scenario", "strategy", "ε target", *grid_keys, "seeds", *(LABELS[m] for m in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (3 + len(grid_keys)) + "---:|" * (1 + len(columns))]
    for e in table:
        cells = [e["scenario"], e["strategy"], "no DP" if e["epsilon"] == NO_DP else e["epsilon"],
                 *(str(e[k]) for k in grid_keys), str(e["seeds"])]
        cells += [_pm(e[f"{m}_mean"], e[f"{m}_std"], 2 if m == "max_epsilon" else 3) for m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    fields = list(rows[0])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def write_plots(rows: list[dict[str, Any]], out: Path, *, metric: str) -> list[Path]:
    """``rounds_<scenario>.png`` (metric per round, mean over seeds) and ``privacy_utility.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in sorted({r["scenario"] for r in rows}):
        curves: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
        for r in rows:
            if r["scenario"] == scenario:
                label = r["strategy"] + ("" if r["epsilon"] == NO_DP else f", ε={r['epsilon']}")
                curves[label].append(r["curve"])
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for label, runs in sorted(curves.items()):
            by_round: dict[int, list[float]] = defaultdict(list)
            for curve in runs:
                for rnd, value in curve:
                    by_round[rnd].append(value)
            xs = sorted(by_round)
            means = [np.nanmean(by_round[x]) for x in xs]
            ax.plot(xs, means, marker=".", label=f"{label} (n={len(runs)})")
        ax.set(xlabel="round", ylabel=f"global test {metric} (mean over seeds)",
               title=f"{scenario}: {metric} per round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out / f"rounds_{scenario}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    epsilons = {r["epsilon"] for r in rows if r["epsilon"] != NO_DP}
    if epsilons:
        written.append(_privacy_utility(rows, out, plt, metric))
    return written


def _privacy_utility(rows: list[dict[str, Any]], out: Path, plt: Any, metric: str = "auc") -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[f"{r['scenario']} / {r['strategy']}"][r["epsilon"]].append(r[f"global_{metric}"])
    for label, by_eps in sorted(groups.items()):
        points = sorted((float(e), _stats(v)) for e, v in by_eps.items() if e != NO_DP)
        if points:
            line = ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                               marker="o", capsize=3, label=label)
            if NO_DP in by_eps:
                ax.axhline(_stats(by_eps[NO_DP])[0], linestyle="--", color=line[0].get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set(xlabel="target ε per site (δ as configured)",
           ylabel=f"global test {LABELS[f'global_{metric}'][7:]} (mean ± std over seeds)",
           title="Privacy–utility (dashed: no DP)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / "privacy_utility.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep_report(spec: SweepSpec, root: Path) -> Path:
    """Write ``comparison.md``/``.csv``, ``runs.csv``, ``plots/`` and ``report.md`` into the sweep folder."""
    rows = collect(spec, root)
    grid_keys = list(spec.grid)
    table = comparison(rows, grid_keys=grid_keys, metric=spec.metric)
    markdown = comparison_markdown(table, grid_keys=grid_keys, metric=spec.metric)
    (root / COMPARISON_MD).write_text(markdown)
    _write_csv(root / COMPARISON_CSV, table)
    _write_csv(root / RUNS_CSV, [{k: v for k, v in r.items() if k != "curve"} for r in rows])
    plots = write_plots(rows, root / "plots", metric=spec.metric)
    lines = [f"# medfed sweep `{spec.name}`", "", f"Preset: `{spec.path}` (base `{spec.base.name}`); "
             f"{len(rows)} finished runs; mean ± sample std over seeds.", "",
             "Global = the global model on the pooled test split; mean site = unweighted mean over the sites' "
             "own test splits (final round).", "", markdown, ranking_line(table, metric=spec.metric), "",
             "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    failed = failed_runs(spec, root)
    if failed:
        lines += ["", "## Failed runs (left out above; `medfed sweep` runs them again)", ""]
        lines += [f"- `{run_id}`: {reason}" for run_id, reason in failed]
    lines += ["", f"Per-run numbers: `{RUNS_CSV}`; each run's own report: `runs/<run>/report.md`.", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
