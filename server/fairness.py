"""Across-site and subgroup summaries of the sites' clinical metrics (server side).

Input is what the sites sent (the latest ``evaluate`` line per site in
``sites.jsonl``): aggregate numbers only. Pooled sensitivity, specificity and
accuracy are exact, because a site sends its positives and a rate, so
``round(rate x count)`` gives back the counts that were pooled; pooled AUC is
not computable from aggregates and is reported as the example-weighted mean of
the site AUCs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation.metrics.clinical import GROUP_RATES, SITE_RATES
from federation.metrics.intervals import wilson_interval
from server.run_dir import SITES_FILE, read_jsonl

#: Rates compared across sites and subgroups.
COMPARED = ("roc-auc", "sensitivity", "specificity", "op-accuracy")
_GROUP_KEY = re.compile(r"^grp-(?P<group>sex-[a-z]|age-\d)-n$")


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def latest_site_rows(run_dir: Path, phase: str = "evaluate") -> dict[str, dict[str, Any]]:
    """The latest ``phase`` line of each site: ``{site: {"round": r, "metrics": {...}}}``."""
    latest: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(Path(run_dir) / SITES_FILE):
        if row.get("phase") == phase and int(row["round"]) >= int(latest.get(row["site"], {}).get("round", -1)):
            latest[row["site"]] = {"round": int(row["round"]), "metrics": row.get("metrics") or {}}
    return dict(sorted(latest.items()))


#: Why a number is missing, shown as "n/a (<reason>)" by every report.
NOT_REPORTED = "suppressed or not sent by the site"
NO_SAMPLES = "no samples"
ONE_CLASS = "one class in the test split"
NO_POSITIVES = "no positives in the test split"
NO_NEGATIVES = "no negatives in the test split"
NO_PREDICTED_POSITIVES = "no predicted positives"
NO_PREDICTED_NEGATIVES = "no predicted negatives"
NO_SITE_VALUE = "no site reported a value"


def na_reason(metrics: dict[str, Any], name: str, prefix: str = "") -> str:
    """Why rate ``name`` (e.g. ``ppv``) has no value in a site's (or subgroup's, ``prefix``) metrics.

    Decided by the counts the rate is a fraction of; a rate whose counts would allow
    a value but that the site did not send was suppressed (or is from an older site).
    """
    n = _num(metrics.get(f"{prefix}n" if prefix else "num-examples"))
    pos = _num(metrics.get(f"{prefix}n-pos"))
    tp, fp, tn, fn = (_num(metrics.get(f"{prefix}{k}")) for k in ("tp", "fp", "tn", "fn"))
    if n == 0:
        return NO_SAMPLES
    structural = {"roc-auc": (pos == 0 or n - pos == 0, ONE_CLASS), "sensitivity": (pos == 0, NO_POSITIVES),
                  "specificity": (n - pos == 0, NO_NEGATIVES), "ppv": (tp + fp == 0, NO_PREDICTED_POSITIVES),
                  "npv": (tn + fn == 0, NO_PREDICTED_NEGATIVES)}
    undefined, reason = structural.get(name, (False, ""))
    if undefined:
        return reason
    if metrics.get(f"{prefix}{name}") is None:
        return NOT_REPORTED
    return "undefined for this test split"


def _interval(metrics: dict[str, Any], name: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {k: _num(metrics.get(f"{prefix}{name}{s}"))
                           for k, s in (("value", ""), ("lo", "-lo"), ("hi", "-hi"))}
    if math.isnan(out["value"]):
        out["na"] = na_reason(metrics, name, prefix)
    return out


def site_view(metrics: dict[str, Any], *, bins: int) -> dict[str, Any]:
    """One site's numbers, grouped: rates with intervals, counts, calibration, ROC grid, subgroups."""
    rates = {name: _interval(metrics, name) for name in SITE_RATES}
    groups = {}
    for key in metrics:
        match = _GROUP_KEY.match(key)
        if match:
            g = match["group"]
            groups[g] = {
                "n": _num(metrics[key]),
                "n-pos": _num(metrics.get(f"grp-{g}-n-pos")),
                "ece": _num(metrics.get(f"grp-{g}-ece")),
                **{name: _interval(metrics, name, f"grp-{g}-") for name in GROUP_RATES},
            }
    return {
        "n": _num(metrics.get("num-examples")),
        "n-pos": _num(metrics.get("n-pos")),
        "counts": {k: _num(metrics.get(k)) for k in ("tp", "fp", "tn", "fn")},
        "rates": rates,
        "ece": _num(metrics.get("ece")),
        "brier": _num(metrics.get("brier")),
        "roc_tpr": [_num(metrics.get(f"roc-tpr-{k:02d}")) for k in range(21)],
        "reliability": [
            {part: _num(metrics.get(f"rel-bin-{b:02d}-{part}")) for part in ("n", "conf", "obs")} for b in range(bins)
        ],
        "subgroups": dict(sorted(groups.items())),
    }


def _pooled_rate(parts: list[dict[str, float]], rate: str, denominator: Callable[[dict[str, float]], float],
                 *, confidence: float, empty: str) -> dict[str, Any]:
    """One exact pooled rate over the parts that sent it (a part whose denominator is 0 adds nothing)."""
    usable = [p for p in parts if denominator(p) == 0 or math.isfinite(p.get(rate, math.nan))]
    total = int(sum(denominator(p) for p in usable))
    k = int(sum(round(p[rate] * denominator(p)) for p in usable if denominator(p) > 0))
    lo, hi = wilson_interval(k, total, confidence=confidence)
    out: dict[str, Any] = {"value": k / total if total else math.nan, "lo": lo, "hi": hi}
    if not total:
        out["na"] = empty if usable else NO_SITE_VALUE
    if len(usable) < len(parts):
        out["note"] = f"{len(parts) - len(usable)} of {len(parts)} sites did not report it"
    return out


def _pooled(parts: list[dict[str, float]], confidence: float) -> dict[str, Any]:
    """Exact pooled rates from per-part ``n``, ``n-pos`` and rates (sensitivity, specificity, accuracy).

    Parts without clinical numbers (e.g. a site of an older medfed) are left out, and
    a part that did not send a rate (suppressed) is left out of that rate's pool.
    """
    parts = [p for p in parts if all(math.isfinite(p.get(k, math.nan)) for k in ("n", "n-pos"))]
    out: dict[str, Any] = {"n": int(sum(p["n"] for p in parts)), "n-pos": int(sum(p["n-pos"] for p in parts))}
    for name, denominator, empty in (("sensitivity", lambda p: p["n-pos"], NO_POSITIVES),
                                     ("specificity", lambda p: p["n"] - p["n-pos"], NO_NEGATIVES),
                                     ("op-accuracy", lambda p: p["n"], NO_SAMPLES)):
        out[name] = _pooled_rate(parts, name, denominator, confidence=confidence, empty=empty)
    aucs = [(p["n"], p["roc-auc"]) for p in parts if math.isfinite(p.get("roc-auc", math.nan))]
    weight = sum(w for w, _ in aucs)
    out["roc-auc"] = {"value": sum(w * a for w, a in aucs) / weight if weight else math.nan, "lo": math.nan,
                      "hi": math.nan, "note": "example-weighted mean of site AUCs"}
    if not weight:
        out["roc-auc"]["na"] = NO_SITE_VALUE
    return out


def _flat(view: dict[str, Any]) -> dict[str, float]:
    return {"n": view["n"], "n-pos": view["n-pos"], **{k: view[k]["value"] for k in COMPARED if k in view}}


def _extremes(values: dict[str, float]) -> dict[str, Any]:
    known = {k: v for k, v in values.items() if not math.isnan(v)}
    if not known:
        return {"worst": None, "best": None, "spread": None, "na": NO_SITE_VALUE}
    worst, best = min(known, key=known.__getitem__), max(known, key=known.__getitem__)
    return {"worst": {"name": worst, "value": known[worst]}, "best": {"name": best, "value": known[best]},
            "spread": known[best] - known[worst]}


def fairness_summary(site_metrics: dict[str, dict[str, Any]], *, confidence: float, bins: int) -> dict[str, Any]:
    """Across-site and subgroup summary of the sites' latest clinical metrics.

    Args:
        site_metrics: ``{site: metrics}`` as the sites sent them.
        confidence: Confidence level for pooled Wilson intervals.
        bins: Reliability bins per site.

    Returns:
        ``sites`` (per-site views), ``across_sites`` (worst/best/spread per rate),
        ``pooled`` (exact pooled rates), ``subgroups`` (pooled per subgroup over the
        sites that released it) and ``subgroup_gaps`` (largest difference between
        subgroups of one attribute, pooled and per site).
    """
    views = {site: site_view(m, bins=bins) for site, m in site_metrics.items()}
    flat = {site: _flat({"n": v["n"], "n-pos": v["n-pos"], **v["rates"]}) for site, v in views.items()}
    across = {rate: _extremes({s: f[rate] for s, f in flat.items()}) for rate in COMPARED}
    pooled = _pooled(list(flat.values()), confidence) if flat else {}
    by_group: dict[str, list[dict[str, float]]] = {}
    for view in views.values():
        for g, gv in view["subgroups"].items():
            by_group.setdefault(g, []).append(_flat(gv))
    subgroups = {g: {**_pooled(parts, confidence), "sites": len(parts)} for g, parts in sorted(by_group.items())}
    gaps: dict[str, Any] = {}
    for attribute in ("sex", "age"):
        members = {g: s for g, s in subgroups.items() if g.startswith(f"{attribute}-")}
        if len(members) < 2:
            continue
        gaps[attribute] = {
            "pooled": {rate: _extremes({g: s[rate]["value"] for g, s in members.items()}) for rate in COMPARED},
            "per_site": {
                site: {rate: _extremes({g: gv[rate]["value"] for g, gv in v["subgroups"].items()
                                         if g.startswith(f"{attribute}-")})["spread"] for rate in COMPARED}
                for site, v in views.items()
                if sum(g.startswith(f"{attribute}-") for g in v["subgroups"]) >= 2
            },
        }
    return {"sites": views, "across_sites": across, "pooled": pooled, "subgroups": subgroups, "subgroup_gaps": gaps}
