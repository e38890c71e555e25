"""The clinical report of a run: Markdown + PNG plots + ``fairness.json`` under ``clinical/``.

Built from the run directory alone (``config.yaml``, ``sites.jsonl``, optional
``export/model.json`` and ``clinical/gallery/index.json``), so it can be rebuilt at
any time (``medfed clinical-report RUN_DIR``). Every number in it is an aggregate a
site computed on its own test split and sent in its evaluate reply.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation.config import ExperimentConfig, load_config
from federation.metrics.clinical import ClinicalSettings, age_band_labels
from server.clinical_plots import plot_reliability, plot_roc, plot_site_bars, plot_subgroup_bars
from server.fairness import COMPARED, NO_SITE_VALUE, NOT_REPORTED, fairness_summary, latest_site_rows
from server.run_dir import CONFIG_FILE, _clean

logger = logging.getLogger(__name__)

CLINICAL_DIR = "clinical"
REPORT_FILE = "report.md"
FAIRNESS_FILE = "fairness.json"
GALLERY_DIR = "gallery"
GALLERY_INDEX = "index.json"
NOTICE = (
    "> **Research software — not for clinical use.** Every number below was computed by a site on its own "
    "test split; only aggregates left the site, and subgroups smaller than the minimum size were never sent."
)


def group_labels(settings: ClinicalSettings) -> dict[str, str]:
    """Readable names of subgroup keys: ``sex-f`` -> ``female``, ``age-1`` -> ``age 18-39``."""
    labels = {"sex-f": "female", "sex-m": "male", "sex-o": "other sex"}
    labels |= {f"age-{k}": f"age {band}" for k, band in enumerate(age_band_labels(settings.age_edges))}
    return labels


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def na(reason: str | None) -> str:
    """How every report shows a number that cannot exist: ``n/a (<reason>)``."""
    return f"n/a ({reason})" if reason else "n/a"


def fmt_interval(d: dict[str, Any] | None) -> str:
    """``0.812 [0.700, 0.900]``; the value alone without an interval; ``n/a (<reason>)`` without a value."""
    if not d or _missing(d.get("value")):
        return na((d or {}).get("na") or NOT_REPORTED)
    if _missing(d.get("lo")) or _missing(d.get("hi")):
        return f"{d['value']:.3f}"
    return f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


_ci = fmt_interval


def _n(x: float | None) -> str:
    return na(NOT_REPORTED) if _missing(x) else str(int(x))  # type: ignore[arg-type]


def _f(x: float | None) -> str:
    return "n/a" if _missing(x) else f"{x:.3f}"


def _task(settings: ClinicalSettings, label_names: list[str]) -> str:
    pos = settings.positive_class
    name = label_names[pos] if pos < len(label_names) else f"class {pos}"
    return (f"Task: **{name}** (class {pos}) vs rest. Operating point: positive when P({name}) ≥ "
            f"{settings.threshold}. Intervals: {settings.confidence:.0%} — DeLong for AUC, Wilson score for "
            f"proportions. Reliability bins: {settings.calibration_bins}; subgroups and bins with fewer than "
            f"{settings.min_group_size} samples are suppressed at the site.")


def _site_table(summary: dict[str, Any], rounds: dict[str, int]) -> list[str]:
    lines = ["| site | round | n | positives | AUC | sensitivity | specificity | accuracy | PPV | NPV | ECE | Brier |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if not summary["sites"]:
        return [na("no site sent an evaluation: every site failed or refused, or no round was evaluated")]
    for site, v in summary["sites"].items():
        r = v["rates"]
        lines.append(f"| {site} | {rounds.get(site, '–')} | {_n(v['n'])} | {_n(v['n-pos'])} | {_ci(r['roc-auc'])} | "
                     f"{_ci(r['sensitivity'])} | {_ci(r['specificity'])} | {_ci(r['op-accuracy'])} | "
                     f"{_ci(r['ppv'])} | {_ci(r['npv'])} | {_f(v['ece'])} | {_f(v['brier'])} |")
    return lines


def _across(summary: dict[str, Any]) -> list[str]:
    lines = ["| metric | worst site | best site | spread (best − worst) |", "|---|---|---|---|"]
    for rate in COMPARED:
        e = summary["across_sites"][rate]
        if e["worst"] is None:
            lines.append(f"| {rate} | {na(e.get('na', NO_SITE_VALUE))} | n/a | n/a |")
            continue
        lines.append(f"| {rate} | {e['worst']['name']} {e['worst']['value']:.3f} | "
                     f"{e['best']['name']} {e['best']['value']:.3f} | {e['spread']:.3f} |")
    pooled = summary.get("pooled") or {}
    if pooled:
        lines += ["", f"Pooled over sites (n = {pooled['n']}, positives = {pooled['n-pos']}; exact from the sites' "
                  "counts): sensitivity " + _ci(pooled["sensitivity"]) + ", specificity " + _ci(pooled["specificity"])
                  + ", accuracy " + _ci(pooled["op-accuracy"]) + "; AUC (example-weighted mean of site AUCs) "
                  + _ci(pooled["roc-auc"]) + "."]
    return lines


def _subgroups(summary: dict[str, Any], labels: dict[str, str]) -> list[str]:
    rows = [(site, g, gv) for site, v in summary["sites"].items() for g, gv in v["subgroups"].items()]
    if not rows:
        return ["No subgroup was reported: the data carries no sex/age attributes (only DICOM sites do, from "
                "PatientSex/PatientAge), or every subgroup was below the minimum size and suppressed."]
    lines = ["| site | group | n | positives | AUC | sensitivity | specificity | accuracy | ECE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for site, g, gv in rows:
        lines.append(f"| {site} | {labels.get(g, g)} | {_n(gv['n'])} | {_n(gv['n-pos'])} | {_ci(gv['roc-auc'])} | "
                     f"{_ci(gv['sensitivity'])} | {_ci(gv['specificity'])} | {_ci(gv['op-accuracy'])} | "
                     f"{_f(gv['ece'])} |")
    lines += ["", "Pooled per subgroup (over the sites that released it):", "",
              "| group | sites | n | sensitivity | specificity | accuracy | AUC (weighted mean) |",
              "|---|---|---|---|---|---|---|"]
    for g, s in summary["subgroups"].items():
        lines.append(f"| {labels.get(g, g)} | {s['sites']} | {s['n']} | {_ci(s['sensitivity'])} | "
                     f"{_ci(s['specificity'])} | {_ci(s['op-accuracy'])} | {_ci(s['roc-auc'])} |")
    for attribute, gap in summary["subgroup_gaps"].items():
        lines += ["", f"Fairness — largest gap between {attribute} groups (pooled):", ""]
        for rate, e in gap["pooled"].items():
            if e["worst"] is None:
                lines.append(f"- {rate}: {na(e.get('na', NO_SITE_VALUE))}")
            else:
                lines.append(f"- {rate}: {e['spread']:.3f} ({labels.get(e['worst']['name'], e['worst']['name'])} "
                             f"{e['worst']['value']:.3f} vs {labels.get(e['best']['name'], e['best']['name'])} "
                             f"{e['best']['value']:.3f})")
    return lines


def _gallery(out: Path) -> list[str]:
    index = out / GALLERY_DIR / GALLERY_INDEX
    if not index.is_file():
        return []
    entries = json.loads(index.read_text())
    lines = ["## Grad-CAM gallery (simulation only)", "",
             "> Made by the simulation harness, which can read every simulated site's images on this machine. "
             "In a real deployment images never leave a site and no such gallery reaches the coordinator; a site "
             "runs `medfed explain` on its own machine instead.", ""]
    for entry in entries:
        lines += [f"**{entry['site']}** — {entry['caption']}", "", f"![{entry['site']}]({GALLERY_DIR}/{entry['file']})", ""]
    return lines


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_clinical_report(
    run_dir: str | os.PathLike[str], *, config: ExperimentConfig | None = None, redraw_plots: bool = True
) -> Path:
    """Write a run's clinical report ``clinical/report.md`` and its plots, as its task has it (:data:`CLINICAL_REPORTS`).

    A classifier's adds ``clinical/fairness.json``; a segmentation run's, per-structure tables.

    Args:
        run_dir: The run directory.
        config: The run's config (default: its ``config.yaml``).
        redraw_plots: False keeps the plots already in ``clinical/`` and draws only
            missing ones: for a report rewritten to add a section (the Grad-CAM
            gallery) while the run's records stay as they were (drawing the plots is
            ~0.9 s of a ~1 s report).

    Returns:
        The report's path.
    """
    run = Path(run_dir)
    config = config or load_config(run / CONFIG_FILE)
    return report_writer(config.data.task)(run, config=config, redraw_plots=redraw_plots)


def report_writer(task: str) -> Callable[..., Path]:
    """The clinical report writer of ``data.task`` (raises ValueError naming the tasks that have one)."""
    try:
        return CLINICAL_REPORTS[task]
    except KeyError:
        raise ValueError(f"no clinical report for data.task={task!r}; "
                         f"the tasks with one are {sorted(CLINICAL_REPORTS)}") from None


def _segmentation_report(run: Path, *, config: ExperimentConfig, redraw_plots: bool) -> Path:
    """Per-structure Dice/HD95/volume tables (:mod:`server.segmentation_report`) instead of a classifier's rates."""
    from server.segmentation_report import write_segmentation_report  # noqa: PLC0415

    return write_segmentation_report(run, out=run / CLINICAL_DIR, report_name=REPORT_FILE,
                                     gallery=(GALLERY_DIR, GALLERY_INDEX), dataset=config.data.dataset,
                                     redraw_plots=redraw_plots)


def _classification_report(run: Path, *, config: ExperimentConfig, redraw_plots: bool) -> Path:
    """A classifier's report: per-site rates with intervals, calibration, subgroups, plots."""
    settings = ClinicalSettings.from_config(config.clinical)
    rows = latest_site_rows(run)
    summary = fairness_summary({s: r["metrics"] for s, r in rows.items()}, confidence=settings.confidence,
                               bins=settings.calibration_bins)
    out = run / CLINICAL_DIR
    out.mkdir(exist_ok=True)
    meta_file = run / "export" / "model.json"
    label_names = list(json.loads(meta_file.read_text()).get("label_names", [])) if meta_file.is_file() else []
    labels = group_labels(settings)
    summary["settings"] = {**settings.__dict__, "age_bands": {f"age-{k}": b for k, b in
                                                               enumerate(age_band_labels(settings.age_edges))}}
    _atomic_text(out / FAIRNESS_FILE, json.dumps(_clean(summary), indent=2, allow_nan=False))
    sites = summary["sites"]
    drawers: dict[str, Callable[[Path], Path | None]] = {
        "roc.png": lambda path: plot_roc(sites, path),
        "reliability.png": lambda path: plot_reliability(sites, path),
        "site_metrics.png": lambda path: plot_site_bars(sites, path),
        "subgroups.png": lambda path: plot_subgroup_bars(sites, labels, path),
    }
    plots = [out / name if not redraw_plots and (out / name).is_file() else draw(out / name)
             for name, draw in drawers.items()]
    lines = [f"# Clinical report — run `{run.name}`", "", NOTICE, "", _task(settings, label_names), "",
             "## Per-site performance", "", *_site_table(summary, {s: r["round"] for s, r in rows.items()}), "",
             "## Across sites", "", *_across(summary), "", "## Subgroups", "", *_subgroups(summary, labels), "",
             "## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    lines += ["", *_gallery(out)]
    report = out / REPORT_FILE
    _atomic_text(report, "\n".join(lines).rstrip() + "\n")
    logger.info("clinical report: %s", report)
    return report


#: Each task's clinical report (``data.task`` -> writer); a new task adds its own here.
CLINICAL_REPORTS: dict[str, Callable[..., Path]] = {
    "classification": _classification_report,
    "segmentation": _segmentation_report,
}
