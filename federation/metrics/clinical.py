"""Clinical evaluation of one site's predictions, as a flat dict of aggregate numbers.

A site calls :func:`clinical_metrics` on its own test predictions; the result holds
only aggregates (rates with confidence intervals, counts, a fixed-size ROC grid and
reliability-diagram bins), never a per-patient value, and is what the site's
evaluate reply carries next to ``auc``/``accuracy``. Metric names are fixed
(:func:`site_metric_names`), so the site's outbound guard can whitelist them.

The task is *positive class vs rest*: P(positive) is ``probs[:, positive_class]``,
a sample is predicted positive when ``P(positive) >= threshold``. For a binary
dataset with ``positive_class=1`` this is the usual binary task.

This module computes; what may leave a site is decided after it by
:func:`federation.metrics.disclosure.release_metrics` (no count of fewer than
``min_group_size`` patients, nor of all but that many, in any cell, bin, ROC point or
subgroup), which the site applies to everything below before sending it.

Subgroups (sex, age bands) come from per-sample attributes the data layer exposes
(DICOM ``PatientSex``/``PatientAge``); at a real site the bands and the attributes
are the site policy's. A subgroup smaller than ``min_group_size`` is
*suppressed*: none of its numbers are sent. Within one attribute, when the samples
not covered by released groups (suppressed groups plus unknown values) number
between 1 and ``min_group_size - 1``, the smallest released group is suppressed
too (secondary suppression), so a small group cannot be recovered by subtracting
the released groups from the site's totals.

Metric names (``XX`` two digits)::

    threshold, n-pos, tp, fp, tn, fn, ece, brier
    roc-auc, op-accuracy, sensitivity, specificity, ppv, npv   (each also -lo, -hi)
    roc-tpr-00 .. roc-tpr-20        TPR reachable at FPR <= XX/20
    rel-bin-XX-n, rel-bin-XX-conf, rel-bin-XX-obs              (conf/obs only if n >= min_group_size)
    grp-<g>-n, grp-<g>-n-pos, grp-<g>-ece, grp-<g>-{roc-auc,op-accuracy,sensitivity,specificity}[-lo|-hi]
      with <g> one of sex-f, sex-m, sex-o, age-0 .. age-7 (age band index, see :func:`age_band_labels`)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from federation.config.schema import parse_age_edges
from federation.metrics.calibration import brier_score, expected_calibration_error, reliability_bins
from federation.metrics.intervals import delong_auc_interval, wilson_interval

#: Per-sample sex codes in ``groups["sex"]`` (``-1`` = unknown) and their metric names.
SEX_CODES: dict[str, int] = {"F": 0, "M": 1, "O": 2}
SEX_NAMES: tuple[str, ...] = ("f", "m", "o")
#: Code of an unknown attribute value (sex or age).
UNKNOWN = -1
#: Points of the ROC grid (FPR = 0, 0.05, ..., 1).
ROC_POINTS = 21
#: At most this many age bands (``clinical.age_bands`` has at most 7 edges).
MAX_AGE_BANDS = 8
#: Rates reported with an interval at site level; the first four also per subgroup.
SITE_RATES = ("roc-auc", "op-accuracy", "sensitivity", "specificity", "ppv", "npv")
GROUP_RATES = SITE_RATES[:4]


@dataclass(frozen=True)
class ClinicalSettings:
    """How a site evaluates clinically (the ``clinical`` config section).

    Attributes:
        threshold: Operating point on P(positive).
        positive_class: Class index that is "positive".
        confidence: Confidence level of every interval.
        calibration_bins: Reliability-diagram bins.
        min_group_size: Smallest subgroup (or reliability bin) whose numbers are sent.
        age_edges: Age band edges in years.
    """

    threshold: float = 0.5
    positive_class: int = 1
    confidence: float = 0.95
    calibration_bins: int = 10
    min_group_size: int = 10
    age_edges: tuple[int, ...] = (18, 40, 65)

    @classmethod
    def from_config(cls, config: object) -> ClinicalSettings:
        """Build from a ``ClinicalConfig`` (``config.clinical``)."""
        return cls(
            threshold=float(config.threshold),  # type: ignore[attr-defined]
            positive_class=int(config.positive_class),  # type: ignore[attr-defined]
            confidence=float(config.confidence),  # type: ignore[attr-defined]
            calibration_bins=int(config.calibration_bins),  # type: ignore[attr-defined]
            min_group_size=int(config.min_group_size),  # type: ignore[attr-defined]
            age_edges=parse_age_edges(config.age_bands),  # type: ignore[attr-defined]
        )


def binary_task(labels: np.ndarray, probs: np.ndarray, *, positive_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduce ``(labels, probs (N, C))`` to 0/1 labels and P(positive).

    Raises:
        ValueError: ``positive_class`` is not a class of ``probs`` or shapes disagree.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, C) with N = len(labels) = {y.shape[0]}, got {p.shape}")
    if not 0 <= positive_class < p.shape[1]:
        raise ValueError(
            f"clinical.positive_class={positive_class} but the model has {p.shape[1]} classes (0..{p.shape[1] - 1})"
        )
    return (y == positive_class).astype(np.int64), np.clip(p[:, positive_class], 0.0, 1.0)


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` at every distinct score, from (0, 0): sklearn's ``roc_curve(..., drop_intermediate=False)``.

    Both classes must be present.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last sample of each distinct score
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def roc_grid(labels: np.ndarray, scores: np.ndarray, *, points: int = ROC_POINTS) -> np.ndarray:
    """Highest TPR reachable with FPR <= x, for x on ``linspace(0, 1, points)``.

    A fixed-size summary of the ROC curve (:func:`roc_curve_points`) that reveals no
    single score. ``nan`` everywhere when a class is absent.
    """
    y = np.asarray(labels).reshape(-1)
    if y.size == 0 or y.min() == y.max():
        return np.full(points, math.nan)
    fpr, tpr = roc_curve_points(y, scores)
    grid = np.linspace(0.0, 1.0, points)
    # both rates only grow along the curve: the best point is the last with fpr <= x
    return tpr[np.searchsorted(fpr, grid + 1e-12, side="right") - 1].astype(np.float64)


def _rate(name: str, k: int, n: int, confidence: float) -> dict[str, float]:
    lo, hi = wilson_interval(k, n, confidence=confidence)
    return {name: (k / n) if n else math.nan, f"{name}-lo": lo, f"{name}-hi": hi}


def _core(y: np.ndarray, p: np.ndarray, settings: ClinicalSettings) -> dict[str, float]:
    """AUC and operating-point rates with intervals, plus counts, for one sample set."""
    auc = delong_auc_interval(y, p, confidence=settings.confidence)
    pred = p >= settings.threshold
    pos = y == 1
    tp, fn = int(np.sum(pred & pos)), int(np.sum(~pred & pos))
    fp, tn = int(np.sum(pred & ~pos)), int(np.sum(~pred & ~pos))
    out = {"roc-auc": auc.auc, "roc-auc-lo": auc.low, "roc-auc-hi": auc.high}
    out |= _rate("op-accuracy", tp + tn, y.size, settings.confidence)
    out |= _rate("sensitivity", tp, tp + fn, settings.confidence)
    out |= _rate("specificity", tn, tn + fp, settings.confidence)
    out |= _rate("ppv", tp, tp + fp, settings.confidence)
    out |= _rate("npv", tn, tn + fn, settings.confidence)
    out |= {"tp": float(tp), "fp": float(fp), "tn": float(tn), "fn": float(fn), "n-pos": float(tp + fn)}
    return out


def age_band_labels(edges: tuple[int, ...]) -> list[str]:
    """Human labels of the age bands ``age-0, age-1, ...``: ``["0-17", "18-39", "40-64", "65+"]``."""
    lows = (0, *edges)
    return [f"{lo}-{hi - 1}" for lo, hi in zip(lows, edges)] + [f"{lows[-1]}+"]


def subgroup_masks(groups: Mapping[str, np.ndarray], *, age_edges: tuple[int, ...]) -> dict[str, dict[str, np.ndarray]]:
    """Boolean masks per attribute and subgroup: ``{"sex": {"sex-f": mask, ...}, "age": {"age-0": ...}}``.

    Args:
        groups: Per-sample attributes: ``"sex"`` codes (:data:`SEX_CODES`, -1 unknown)
            and/or ``"age"`` in whole years (-1 unknown). Other keys are ignored.
        age_edges: Band edges in years (at most ``MAX_AGE_BANDS - 1``).
    """
    masks: dict[str, dict[str, np.ndarray]] = {}
    if "sex" in groups:
        sex = np.asarray(groups["sex"]).reshape(-1)
        masks["sex"] = {f"sex-{name}": sex == code for name, code in zip(SEX_NAMES, range(len(SEX_NAMES)))}
    if "age" in groups:
        if len(age_edges) >= MAX_AGE_BANDS:
            raise ValueError(f"at most {MAX_AGE_BANDS - 1} age band edges, got {age_edges}")
        age = np.asarray(groups["age"]).reshape(-1)
        lows, highs = (0, *age_edges), (*age_edges, np.iinfo(np.int64).max)
        masks["age"] = {f"age-{k}": (age >= lo) & (age < hi) for k, (lo, hi) in enumerate(zip(lows, highs))}
    return masks


def released_subgroups(sizes: Mapping[str, int], *, total: int, min_size: int) -> list[str]:
    """Subgroups of one attribute whose numbers may be sent (primary + secondary suppression).

    Args:
        sizes: Size of each (disjoint) subgroup of the attribute.
        total: Samples at the site (including unknown values).
        min_size: Smallest releasable group.

    Returns:
        Released subgroup names, in the order of ``sizes``.
    """
    released = [name for name, n in sizes.items() if n >= min_size]
    while released:
        hidden = total - sum(sizes[name] for name in released)
        if hidden == 0 or hidden >= min_size:
            break
        released.remove(min(released, key=lambda name: (sizes[name], name)))
    return released


def clinical_metrics(
    *,
    labels: np.ndarray,
    probs: np.ndarray,
    settings: ClinicalSettings,
    groups: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Every clinical aggregate of one site's test predictions (names in the module docstring).

    Args:
        labels: Integer class labels ``(N,)``.
        probs: Softmax probabilities ``(N, C)``.
        settings: Operating point, confidence, bins, subgroup rules.
        groups: Optional per-sample attributes (``"sex"``, ``"age"``), each ``(N,)``.

    Returns:
        Metric name -> float (``nan`` where undefined).

    Raises:
        ValueError: Bad shapes or ``positive_class`` out of range.
    """
    y, p = binary_task(labels, probs, positive_class=settings.positive_class)
    out: dict[str, float] = {"threshold": float(settings.threshold), **_core(y, p, settings)}
    bins = reliability_bins(y, p, num_bins=settings.calibration_bins)
    out["ece"] = expected_calibration_error(bins)
    out["brier"] = brier_score(y, p)
    for b in range(bins.num_bins):
        out[f"rel-bin-{b:02d}-n"] = float(bins.counts[b])
        if bins.counts[b] >= settings.min_group_size:
            out[f"rel-bin-{b:02d}-conf"] = float(bins.mean_predicted[b])
            out[f"rel-bin-{b:02d}-obs"] = float(bins.observed_rate[b])
    for k, tpr in enumerate(roc_grid(y, p)):
        out[f"roc-tpr-{k:02d}"] = float(tpr)
    for attribute in subgroup_masks(groups or {}, age_edges=settings.age_edges).values():
        for name in released_subgroups(
            {g: int(m.sum()) for g, m in attribute.items()}, total=int(y.size), min_size=settings.min_group_size
        ):
            out |= _group_metrics(name, y[attribute[name]], p[attribute[name]], settings)
    return out


def _group_metrics(name: str, y: np.ndarray, p: np.ndarray, settings: ClinicalSettings) -> dict[str, float]:
    core = _core(y, p, settings)
    out = {f"grp-{name}-n": float(y.size), f"grp-{name}-n-pos": core["n-pos"]}
    for rate in GROUP_RATES:
        for suffix in ("", "-lo", "-hi"):
            out[f"grp-{name}-{rate}{suffix}"] = core[f"{rate}{suffix}"]
    bins = reliability_bins(y, p, num_bins=settings.calibration_bins)
    out[f"grp-{name}-ece"] = expected_calibration_error(bins)
    return out


def site_metric_names(*, calibration_bins: int = 20) -> frozenset[str]:
    """Every name :func:`clinical_metrics` can produce (for up to ``calibration_bins`` bins)."""
    names = {"threshold", "n-pos", "tp", "fp", "tn", "fn", "ece", "brier"}
    names |= {f"{r}{s}" for r in SITE_RATES for s in ("", "-lo", "-hi")}
    names |= {f"roc-tpr-{k:02d}" for k in range(ROC_POINTS)}
    names |= {f"rel-bin-{b:02d}-{part}" for b in range(calibration_bins) for part in ("n", "conf", "obs")}
    groups = [f"sex-{s}" for s in SEX_NAMES] + [f"age-{k}" for k in range(MAX_AGE_BANDS)]
    for g in groups:
        names |= {f"grp-{g}-n", f"grp-{g}-n-pos", f"grp-{g}-ece"}
        names |= {f"grp-{g}-{r}{s}" for r in GROUP_RATES for s in ("", "-lo", "-hi")}
    return frozenset(names)
