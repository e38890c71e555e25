"""The clinical report of a segmentation run: per-site and per-structure tables, worst site and spread.

Read from the run directory alone (``sites.jsonl``: each site's latest evaluation
aggregates; ``export/model.json``: the structures' names; ``clinical/gallery/index.json``
in simulation), never re-evaluated: every number is an aggregate a site computed on its
own test cases and sent (:mod:`federation.metrics.segmentation`): mean Dice per
structure with a percentile-bootstrap interval, HD95 mean and median (voxels), the
signed and absolute relative volume error, and case counts; a statistic over fewer
than 5 cases was never sent and shows as ``n/a``. Across sites: the unweighted mean
over the sites that reported a value, the worst site and the spread (best - worst).
Writes ``clinical/report.md``, ``clinical/segmentation.json`` and ``clinical/site_dice.png``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from server.clinical_plots import _bars, _plt, _save
from server.fairness import NO_SITE_VALUE, NOT_REPORTED, latest_site_rows
from server.run_dir import _clean

logger = logging.getLogger(__name__)

SEGMENTATION_FILE = "segmentation.json"
DICE_PLOT = "site_dice.png"
NOTICE = (
    "> **Research software — not for clinical use.** Every number below was computed by a site on its own "
    "test cases; only aggregates left the site, never a per-case value, and no statistic over fewer than 5 "
    "cases was sent."
)


def _value(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _interval(metrics: dict[str, Any], name: str) -> dict[str, Any]:
    """``{"value", "lo", "hi", "n"}`` of a Dice metric (``name`` = ``dice`` or ``dice-c``)."""
    return {"value": _value(metrics, name), "lo": _value(metrics, f"{name}-lo"), "hi": _value(metrics, f"{name}-hi"),
            "n": _value(metrics, f"{name}-n")}


def _structure(metrics: dict[str, Any], c: int) -> dict[str, Any]:
    return {"dice": _interval(metrics, f"dice-{c}"), "hd95": _value(metrics, f"hd95-{c}"),
            "hd95_median": _value(metrics, f"hd95-{c}-median"), "hd95_n": _value(metrics, f"hd95-{c}-n"),
            "voldiff": _value(metrics, f"voldiff-{c}"), "voldiff_abs": _value(metrics, f"voldiff-{c}-abs")}


def _across(values: dict[str, float | None], *, lower_is_better: bool = False) -> dict[str, Any]:
    """Mean over the sites with a value, worst and best site, spread; ``na`` when none has one."""
    present = {s: v for s, v in values.items() if v is not None}
    if not present:
        return {"sites": 0, "mean": None, "worst": None, "best": None, "spread": None, "na": NO_SITE_VALUE}
    order = sorted(present, key=lambda s: present[s], reverse=lower_is_better)
    worst, best = order[0], order[-1]
    return {"sites": len(present), "mean": sum(present.values()) / len(present),
            "worst": {"name": worst, "value": present[worst]}, "best": {"name": best, "value": present[best]},
            "spread": abs(present[best] - present[worst])}


def segmentation_summary(rows: dict[str, dict[str, Any]], *, label_names: list[str]) -> dict[str, Any]:
    """Per-site and per-structure aggregates and their across-site summary.

    Args:
        rows: Site -> its latest evaluation (``{"round": r, "metrics": {...}}``, :func:`latest_site_rows`).
        label_names: Class names, background first (``class-c`` where missing).
    """
    classes = len(label_names)
    found = [int(k.split("-")[1]) for m in rows.values() for k in m["metrics"] if k.startswith("dice-")
             and k.split("-")[1].isdigit()]
    names = {c: (label_names[c] if c < classes else f"class-{c}") for c in range(1, max([classes - 1, *found]) + 1)}
    sites = {site: {"round": row["round"], "cases": _value(row["metrics"], "num-examples"),
                    "dice": _interval(row["metrics"], "dice"),
                    "structures": {names[c]: _structure(row["metrics"], c) for c in names}}
             for site, row in rows.items()}
    across: dict[str, Any] = {"dice": _across({s: v["dice"]["value"] for s, v in sites.items()})}
    for name in names.values():
        per = {s: v["structures"][name] for s, v in sites.items()}
        across[name] = {"dice": _across({s: p["dice"]["value"] for s, p in per.items()}),
                        "hd95": _across({s: p["hd95"] for s, p in per.items()}, lower_is_better=True),
                        "voldiff_abs": _across({s: p["voldiff_abs"] for s, p in per.items()}, lower_is_better=True)}
    return {"structures": list(names.values()), "sites": sites, "across_sites": across}


def _f(x: float | None, digits: int = 3) -> str:
    return f"n/a ({NOT_REPORTED})" if x is None else f"{x:.{digits}f}"


def fmt_dice(d: dict[str, Any]) -> str:
    """``0.812 [0.700, 0.900]``, the value alone without an interval, ``n/a (<reason>)`` without a value."""
    if d["value"] is None:
        return f"n/a ({NOT_REPORTED})"
    return f"{d['value']:.3f}" if d["lo"] is None else f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _n(x: float | None) -> str:
    return "–" if x is None else str(int(x))


def _across_cell(e: dict[str, Any], digits: int = 3) -> list[str]:
    if e["worst"] is None:
        return [f"n/a ({e['na']})", "n/a", "n/a"]
    return [f"{e['mean']:.{digits}f} ({e['sites']} sites)", f"{e['worst']['name']} {e['worst']['value']:.{digits}f}",
            f"{e['spread']:.{digits}f}"]


def site_table(summary: dict[str, Any]) -> list[str]:
    """Markdown: one row per site, its cases and mean Dice, then each structure's Dice (intervals)."""
    structures = summary["structures"]
    lines = ["| site | round | cases | mean Dice [95% CI] | " + " | ".join(f"{s} Dice" for s in structures) + " |",
             "|---|---|---|---|" + "---|" * len(structures)]
    for site, v in summary["sites"].items():
        cells = [fmt_dice(v["structures"][s]["dice"]) for s in structures]
        lines.append(f"| {site} | {v['round']} | {_n(v['cases'])} | {fmt_dice(v['dice'])} | "
                     + " | ".join(cells) + " |")
    return lines


def structure_tables(summary: dict[str, Any]) -> list[str]:
    """Markdown: per structure, each site's Dice, HD95 and volume error, then the across-site row."""
    lines: list[str] = []
    for name in summary["structures"]:
        lines += [f"### {name}", "", "| site | cases | Dice [95% CI] | HD95 mean / median (voxels) | "
                  "volume error signed / absolute |", "|---|---|---|---|---|"]
        for site, v in summary["sites"].items():
            p = v["structures"][name]
            lines.append(f"| {site} | {_n(p['dice']['n'])} | {fmt_dice(p['dice'])} | {_f(p['hd95'], 2)} / "
                         f"{_f(p['hd95_median'], 2)} | {_f(p['voldiff'])} / {_f(p['voldiff_abs'])} |")
        lines.append("")
    return lines


def across_table(summary: dict[str, Any]) -> list[str]:
    """Markdown: mean over sites, worst site and spread of every compared metric."""
    across = summary["across_sites"]
    lines = ["| metric | mean over sites | worst site | spread (best − worst) |", "|---|---|---|---|",
             "| mean Dice | " + " | ".join(_across_cell(across["dice"])) + " |"]
    for name in summary["structures"]:
        lines += [f"| {name} Dice | " + " | ".join(_across_cell(across[name]["dice"])) + " |",
                  f"| {name} HD95 (voxels) | " + " | ".join(_across_cell(across[name]["hd95"], 2)) + " |",
                  f"| {name} absolute volume error | " + " | ".join(_across_cell(across[name]["voldiff_abs"])) + " |"]
    return lines


def plot_site_dice(summary: dict[str, Any], path: Path) -> Path:
    """Per site: mean Dice and each structure's Dice with their bootstrap intervals."""
    plt = _plt()
    sites = summary["sites"]
    fig, ax = plt.subplots(figsize=(max(4.6, 1.2 * len(sites) + 2), 3.6))
    series = {"mean Dice": [v["dice"] for v in sites.values()]}
    series |= {f"{s} Dice": [v["structures"][s]["dice"] for v in sites.values()] for s in summary["structures"]}
    _bars(ax, list(sites), series)
    ax.set_title("Dice per site (95% bootstrap intervals)" if sites else "no site metrics", fontsize=9)
    return _save(fig, path)


def _gallery(out: Path, gallery_dir: str, index_name: str) -> list[str]:
    index = out / gallery_dir / index_name
    if not index.is_file():
        return []
    lines = ["## Contour gallery (simulation only)", "",
             "> Drawn by the simulation harness, which can read every simulated site's images on this machine. "
             "In a real deployment images never leave a site and no gallery reaches the coordinator; a site runs "
             "`medfed predict` on its own machine instead.", ""]
    for entry in json.loads(index.read_text()):
        lines += [f"**{entry['site']}** — {entry['caption']}", "",
                  f"![{entry['site']}]({gallery_dir}/{entry['file']})", ""]
    return lines


def write_segmentation_report(run: Path, *, out: Path, report_name: str, gallery: tuple[str, str],
                              dataset: str, redraw_plots: bool = True) -> Path:
    """Write ``report_name``, :data:`SEGMENTATION_FILE` and :data:`DICE_PLOT` into ``out`` (see the module docstring).

    Args:
        run: The run directory.
        out: The report folder (``clinical/``, created).
        report_name: The report's file name.
        gallery: ``(folder, index file)`` of the simulation's contour gallery inside ``out``.
        dataset: ``data.dataset`` (named in the report).
        redraw_plots: False keeps an existing plot (a report rewritten to add the gallery).
    """
    rows = latest_site_rows(run)
    meta_file = run / "export" / "model.json"
    labels = list(json.loads(meta_file.read_text()).get("label_names", [])) if meta_file.is_file() else []
    summary = segmentation_summary(rows, label_names=labels)
    out.mkdir(exist_ok=True)
    (out / SEGMENTATION_FILE).write_text(json.dumps(_clean(summary), indent=2, allow_nan=False))
    plot = out / DICE_PLOT
    if redraw_plots or not plot.is_file():
        plot_site_dice(summary, plot)
    lines = [f"# Clinical report — run `{run.name}` (segmentation)", "", NOTICE, "",
             f"Task: segmentation of {', '.join(summary['structures']) or 'n/a'} in `{dataset}`. Dice per case "
             "(mean over the structures its ground truth holds), then mean over cases with a 95% percentile-"
             "bootstrap interval; HD95 in voxels over the cases where both masks hold the structure; volume "
             "error (|predicted| − |true|) / |true|.", "", "## Per-site performance", ""]
    lines += site_table(summary) if summary["sites"] else [
        "n/a (no site sent an evaluation: every site failed or refused, or no round was evaluated)"]
    lines += ["", "## Per structure", "", *structure_tables(summary), "## Across sites", "", *across_table(summary),
              "", "## Plots", "", f"![{plot.stem}]({plot.name})", "", *_gallery(out, *gallery)]
    report = out / report_name
    tmp = report.with_suffix(".tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    tmp.replace(report)
    logger.info("segmentation clinical report: %s", report)
    return report


def card_lines(summary: dict[str, Any]) -> list[str]:
    """The model card's evaluation section of a segmentation run."""
    if not summary["sites"]:
        return ["n/a (no site sent an evaluation)"]
    return [*site_table(summary), "", *across_table(summary)]
