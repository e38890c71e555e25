"""Calibration of P(positive): reliability-diagram bins, expected calibration error, Brier score.

Bins are equal-width on ``[0, 1]`` and assigned exactly as
:func:`sklearn.calibration.calibration_curve` (``strategy="uniform"``) assigns them,
so the non-empty bins' means equal that function's ``prob_pred``/``prob_true``;
this module also keeps the counts (and empty bins), which the reliability diagram
and the expected calibration error need. The Brier score is the mean squared
error of P(positive), as :func:`sklearn.metrics.brier_score_loss` (pinned by tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class ReliabilityBins:
    """Equal-width bins of predicted P(positive).

    Attributes:
        edges: Bin edges, ``(B + 1,)`` from 0 to 1.
        counts: Samples per bin, ``(B,)`` int64.
        mean_predicted: Mean predicted probability per bin (``nan`` where empty).
        observed_rate: Fraction of positives per bin (``nan`` where empty).
    """

    edges: np.ndarray
    counts: np.ndarray
    mean_predicted: np.ndarray
    observed_rate: np.ndarray

    @property
    def num_bins(self) -> int:
        """Number of bins ``B``."""
        return int(self.counts.size)


def _binary_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) have different lengths")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilities must be finite and lie in [0, 1]")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y.astype(np.float64), p


def reliability_bins(labels: np.ndarray, probs: np.ndarray, *, num_bins: int = 10) -> ReliabilityBins:
    """Bin predicted probabilities of the positive class into ``num_bins`` equal-width bins.

    Args:
        labels: 0/1 labels ``(N,)``.
        probs: Predicted P(positive) ``(N,)`` in ``[0, 1]``.
        num_bins: Number of bins (>= 1).

    Returns:
        The :class:`ReliabilityBins`.

    Raises:
        ValueError: Bad shapes, labels other than 0/1, probabilities outside ``[0, 1]``.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    y, p = _binary_inputs(labels, probs)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ids = np.searchsorted(edges[1:-1], p)  # as sklearn.calibration.calibration_curve
    counts = np.bincount(ids, minlength=num_bins).astype(np.int64)
    sums = np.bincount(ids, weights=p, minlength=num_bins)
    positives = np.bincount(ids, weights=y, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        observed_rate = np.where(counts > 0, positives / np.maximum(counts, 1), np.nan)
    return ReliabilityBins(edges=edges, counts=counts, mean_predicted=mean_predicted, observed_rate=observed_rate)


def expected_calibration_error(bins: ReliabilityBins) -> float:
    """``ECE = sum_b (n_b / N) * |observed_rate_b - mean_predicted_b|`` over non-empty bins.

    Args:
        bins: From :func:`reliability_bins`.

    Returns:
        The ECE in ``[0, 1]``; ``nan`` when there are no samples.
    """
    total = int(bins.counts.sum())
    if total == 0:
        return math.nan
    full = bins.counts > 0
    gaps = np.abs(bins.observed_rate[full] - bins.mean_predicted[full])
    return float(np.sum(bins.counts[full] / total * gaps))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared error of P(positive) against the 0/1 label (``nan`` when empty)."""
    y, p = _binary_inputs(labels, probs)
    if y.size == 0:
        return math.nan
    return float(np.mean((p - y) ** 2))
