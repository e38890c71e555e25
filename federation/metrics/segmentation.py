"""Segmentation metrics: per-case Dice, HD95 and volume error (MONAI), and what a site may send.

:func:`case_metrics` scores every case of a test split per foreground class with
MONAI's :class:`~monai.metrics.DiceMetric` and
:class:`~monai.metrics.HausdorffDistanceMetric` (95th percentile, in voxels) and
the relative volume difference. Those per-case values never leave a site:
:func:`site_segmentation_metrics` turns them into aggregates only - per-class mean
Dice with a percentile-bootstrap interval, HD95 and volume-error summaries and case
counts - and drops every statistic computed over fewer than
:data:`MIN_CASES` cases. Metric names (``c`` = class index, 1 .. 15):

* ``dice``, ``dice-lo``, ``dice-hi``, ``dice-n``: per case, the mean Dice over the
  foreground classes present in its ground truth; then mean over cases, interval, count.
* ``dice-c``, ``dice-c-lo``, ``dice-c-hi``, ``dice-c-n``: the same for class ``c``
  (cases whose ground truth holds class ``c``; an empty ground truth has no Dice).
* ``hd95-c``, ``hd95-c-median``, ``hd95-c-n``: HD95 over the cases where both the
  prediction and the ground truth hold class ``c`` (otherwise it is infinite).
* ``voldiff-c``, ``voldiff-c-abs``: mean signed and absolute relative volume
  difference ``(|pred| - |true|) / |true|`` over the ``dice-c-n`` cases.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

MIN_CASES = 5
"""Statistics over fewer cases than this never leave a site."""

MAX_SEGMENTATION_CLASSES = 16
"""Most classes (background included) a segmentation task may have: the metric names are a finite list."""

BOOTSTRAP_SAMPLES = 1000
"""Resamples of the percentile-bootstrap intervals."""


def segmentation_metric_names(*, max_classes: int = MAX_SEGMENTATION_CLASSES) -> frozenset[str]:
    """Every metric name a segmentation site can send after evaluation (see the module docstring)."""
    names = {"num-examples", "loss", "dice", "dice-lo", "dice-hi", "dice-n", "personal-loss", "personal-dice"}
    for c in range(1, max_classes):
        names |= {f"dice-{c}", f"dice-{c}-lo", f"dice-{c}-hi", f"dice-{c}-n"}
        names |= {f"hd95-{c}", f"hd95-{c}-median", f"hd95-{c}-n", f"voldiff-{c}", f"voldiff-{c}-abs"}
    return frozenset(names)


@dataclass(frozen=True, eq=False)
class CaseMetrics:
    """Per-case, per-foreground-class scores of one test split (they stay where they were computed).

    Attributes:
        dice: ``(N, C - 1)`` Dice; NaN where the case's ground truth lacks the class.
        hd95: ``(N, C - 1)`` 95th-percentile Hausdorff distance in voxels; NaN or inf
            where the prediction or the ground truth lacks the class.
        voldiff: ``(N, C - 1)`` relative volume difference; NaN where the ground truth lacks the class.
    """

    dice: np.ndarray
    hd95: np.ndarray
    voldiff: np.ndarray

    @property
    def num_cases(self) -> int:
        """Number of cases scored."""
        return int(self.dice.shape[0])


def case_metrics(*, pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, num_classes: int) -> CaseMetrics:
    """Score predicted label maps against the ground truth, case by case.

    Args:
        pred: Predicted labels ``(N, *spatial)`` in ``[0, num_classes)``.
        truth: True labels, same shape.
        num_classes: Classes including background (0).

    Returns:
        The :class:`CaseMetrics` of the ``N`` cases.

    Raises:
        ValueError: Shapes differ, or labels are outside ``[0, num_classes)``.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric  # noqa: PLC0415 - MONAI only where scored
    from monai.networks.utils import one_hot  # noqa: PLC0415

    pred_t, truth_t = torch.as_tensor(pred).long(), torch.as_tensor(truth).long()
    if pred_t.shape != truth_t.shape:
        raise ValueError(f"prediction shape {tuple(pred_t.shape)} differs from ground truth {tuple(truth_t.shape)}")
    for what, t in (("prediction", pred_t), ("ground truth", truth_t)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{what} labels must lie in [0, {num_classes}), found [{int(t.min())}, {int(t.max())}]")
    p, t = one_hot(pred_t[:, None], num_classes), one_hot(truth_t[:, None], num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, t).numpy()
    with warnings.catch_warnings():  # empty classes give inf/NaN distances, which is what we record
        warnings.simplefilter("ignore")
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p, t).numpy()
    dims = tuple(range(2, p.ndim))
    vol_pred, vol_true = p.sum(dim=dims)[:, 1:].double().numpy(), t.sum(dim=dims)[:, 1:].double().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        voldiff = np.where(vol_true > 0, (vol_pred - vol_true) / vol_true, np.nan)
    return CaseMetrics(dice=dice.astype(np.float64), hd95=hd95.astype(np.float64), voldiff=voldiff)


def bootstrap_interval(values: np.ndarray, *, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (:data:`BOOTSTRAP_SAMPLES` resamples).

    Args:
        values: Finite per-case values, at least one.
        confidence: Interval level, e.g. 0.95.
        seed: Seed of the resampling (fixed: the same values give the same interval).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (BOOTSTRAP_SAMPLES, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _mean_dice_per_case(dice: np.ndarray) -> np.ndarray:
    """Each case's mean Dice over the foreground classes it holds (cases with none dropped)."""
    present = ~np.isnan(dice)
    keep = present.any(axis=1)
    return np.nansum(dice[keep], axis=1) / present[keep].sum(axis=1)


def global_segmentation_metrics(cases: CaseMetrics) -> dict[str, float]:
    """Mean Dice (``dice``) and per-class ``dice-c``, HD95 means ``hd95-c`` (coordinator side, no suppression).

    Classes absent from every case's ground truth get NaN Dice; HD95 is averaged
    over the finite values only.
    """
    per_case = _mean_dice_per_case(cases.dice)
    out = {"dice": float(per_case.mean()) if per_case.size else float("nan")}
    for k in range(cases.dice.shape[1]):
        dice = cases.dice[:, k][~np.isnan(cases.dice[:, k])]
        hd95 = cases.hd95[:, k][np.isfinite(cases.hd95[:, k])]
        out[f"dice-{k + 1}"] = float(dice.mean()) if dice.size else float("nan")
        out[f"hd95-{k + 1}"] = float(hd95.mean()) if hd95.size else float("nan")
    return out


def site_segmentation_metrics(
    cases: CaseMetrics, *, confidence: float = 0.95, min_cases: int = MIN_CASES
) -> dict[str, float]:
    """The aggregates a site may send about its test split (names in the module docstring).

    Every mean, interval, median and volume error is computed over at least
    ``min_cases`` cases (never below :data:`MIN_CASES`) or not sent; counts are
    always sent.

    Args:
        cases: The site's per-case scores.
        confidence: Level of the bootstrap intervals.
        min_cases: Smallest number of cases a statistic may describe.
    """
    floor = max(int(min_cases), MIN_CASES)
    if cases.dice.shape[1] >= MAX_SEGMENTATION_CLASSES:
        raise ValueError(f"at most {MAX_SEGMENTATION_CLASSES - 1} foreground classes are supported")
    out: dict[str, float] = {}
    per_case = _mean_dice_per_case(cases.dice)
    out["dice-n"] = float(per_case.size)
    if per_case.size >= floor:
        out["dice"] = float(per_case.mean())
        out["dice-lo"], out["dice-hi"] = bootstrap_interval(per_case, confidence=confidence)
    for k in range(cases.dice.shape[1]):
        c = k + 1
        present = ~np.isnan(cases.dice[:, k])
        dice, voldiff = cases.dice[present, k], cases.voldiff[present, k]
        hd95 = cases.hd95[:, k][np.isfinite(cases.hd95[:, k])]
        out[f"dice-{c}-n"], out[f"hd95-{c}-n"] = float(dice.size), float(hd95.size)
        if dice.size >= floor:
            out[f"dice-{c}"] = float(dice.mean())
            out[f"dice-{c}-lo"], out[f"dice-{c}-hi"] = bootstrap_interval(dice, confidence=confidence, seed=c)
            out[f"voldiff-{c}"], out[f"voldiff-{c}-abs"] = float(voldiff.mean()), float(np.abs(voldiff).mean())
        if hd95.size >= floor:
            out[f"hd95-{c}"], out[f"hd95-{c}-median"] = float(hd95.mean()), float(np.median(hd95))
    return out
