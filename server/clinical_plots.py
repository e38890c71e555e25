"""PNG plots of the clinical report, drawn from the aggregate site numbers only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from server.fairness import COMPARED

RATE_LABELS = {"roc-auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity",
               "op-accuracy": "accuracy"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def error_bars(values: list[dict[str, Any]]) -> np.ndarray:
    """``(2, N)`` non-negative distances from each value to its interval's ends (0 where there is none).

    An interval's end can sit a rounding error on the wrong side of its value (a
    Wilson bound of 1e-17 for a rate of 0) or be missing: neither may break the plot.
    """
    v = np.array([np.nan if _missing(d.get("value")) else d["value"] for d in values], dtype=float)
    lo = np.array([np.nan if _missing(d.get("lo")) else d["lo"] for d in values], dtype=float)
    hi = np.array([np.nan if _missing(d.get("hi")) else d["hi"] for d in values], dtype=float)
    return np.clip(np.nan_to_num(np.vstack([v - lo, hi - v])), 0.0, None).reshape(2, len(values))


def plot_roc(sites: dict[str, Any], path: Path) -> Path:
    """ROC curve per site from its 21-point grid (best TPR at FPR <= x)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    grid = np.linspace(0.0, 1.0, 21)
    for site, view in sites.items():
        tpr = np.asarray(view["roc_tpr"], dtype=float)
        auc = view["rates"]["roc-auc"]
        if np.isnan(tpr).all():  # listed in the legend with the reason, without a curve
            ax.plot([], [], " ", label=f"{site}: no curve, AUC n/a ({auc.get('na', 'no ROC points sent')})")
            continue
        interval = "" if _missing(auc.get("lo")) or _missing(auc.get("hi")) or _missing(auc.get("value")) else \
            f" [{_fmt(auc['lo'])}, {_fmt(auc['hi'])}]"
        ax.step(grid, tpr, where="post", label=f"{site} AUC {_fmt(auc.get('value'))}{interval}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC per site (site test splits)",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def plot_reliability(sites: dict[str, Any], path: Path) -> Path:
    """Reliability diagram per site (bins with at least min_group_size samples)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for site, view in sites.items():
        pts = [(b["conf"], b["obs"]) for b in view["reliability"] if not (math.isnan(b["conf"]) or math.isnan(b["obs"]))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label=f"{site} ECE {_fmt(view['ece'])}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect calibration")
    ax.set(xlabel="mean predicted P(positive)", ylabel="observed fraction positive",
           title="Reliability diagram per site", xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")
    return _save(fig, path)


def _bars(ax: Any, names: list[str], series: dict[str, list[dict[str, float]]]) -> None:
    width = 0.8 / max(1, len(series))
    x = np.arange(len(names))
    for i, (rate, values) in enumerate(series.items()):
        v = np.array([np.nan if _missing(d.get("value")) else d["value"] for d in values], dtype=float)
        offset = x + (i - (len(series) - 1) / 2) * width
        ax.bar(offset, np.nan_to_num(v), width, yerr=error_bars(values), capsize=2, label=RATE_LABELS.get(rate, rate))
        for position in offset[np.isnan(v)]:  # the reason is in the report's table
            ax.text(position, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.22)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6, ncols=len(series), loc="upper center")


def plot_site_bars(sites: dict[str, Any], path: Path) -> Path:
    """AUC, sensitivity, specificity and accuracy per site with their intervals."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.6, 1.2 * len(sites) + 2), 3.6))
    _bars(ax, list(sites), {rate: [v["rates"][rate] for v in sites.values()] for rate in COMPARED})
    ax.set_title("Per-site metrics (95% intervals)" if sites else "no site metrics", fontsize=9)
    return _save(fig, path)


def plot_subgroup_bars(sites: dict[str, Any], labels: dict[str, str], path: Path) -> Path | None:
    """Per site and released subgroup: AUC, sensitivity, specificity with intervals (None if no subgroup)."""
    rows = [(f"{site} {labels.get(g, g)}", gv) for site, v in sites.items() for g, gv in v["subgroups"].items()]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.8))
    _bars(ax, [r[0] for r in rows], {rate: [gv[rate] for _, gv in rows] for rate in COMPARED[:3]})
    ax.set_title("Subgroups per site (groups below the minimum size are never sent)", fontsize=9)
    return _save(fig, path)
