"""Classification metrics for site-level and central evaluation.

The AUC is the Mann-Whitney statistic (:func:`~federation.metrics.intervals.mann_whitney_auc`):
the numbers of :func:`sklearn.metrics.roc_auc_score`, binary and one-vs-rest macro,
pinned against it by tests, without its input validation, which cost ~7 ms per
call, more than the site's whole forward pass on a small test split. This module
shapes the inputs, decides when a metric is undefined (returned as ``nan``, never
raised), and aggregates per-site values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from federation.metrics.intervals import mann_whitney_auc

logger = logging.getLogger(__name__)


def _check_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``labels`` as int64 ``(N,)`` and ``probs`` as float64 ``(N, C)``; raise on bad shapes."""
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"labels ({y.shape[0]}) and probs ({p.shape[0]}) have different lengths")
    if y.size and (not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be integers in [0, {p.shape[1] - 1}], got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64), p


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (binary, or one-vs-rest macro over the classes present); nan when undefined."""
    num_classes = p.shape[1]
    present = np.unique(y)
    if present.size < 2:
        logger.debug("AUC undefined: %d sample(s), %d class(es) present", y.size, present.size)
        return math.nan
    if not np.all(np.isfinite(p)):
        logger.warning("AUC undefined: probabilities contain NaN or infinity")
        return math.nan
    if num_classes == 2:
        return mann_whitney_auc(y == 1, p[:, 1])
    # One-vs-rest macro average. Classes that never occur (common at a single site)
    # have no defined AUC, so the average runs over the classes that do occur.
    if present.size < num_classes:
        logger.debug("AUC: %d of %d classes present; macro over present ones", present.size, num_classes)
    p = p / p.sum(axis=1, keepdims=True)  # rows that sum to 1, as sklearn's multiclass AUC expects
    return float(np.mean([mann_whitney_auc(y == c, p[:, c]) for c in present]))


def classification_metrics(*, labels: np.ndarray, probs: np.ndarray, loss: float | None = None) -> dict[str, float]:
    """Compute ROC AUC and accuracy from class probabilities.

    AUC is ``roc_auc_score(labels, probs[:, 1])`` for two classes and the one-vs-rest
    macro average (``multi_class="ovr", average="macro"``) for more. When some classes
    are absent from ``labels`` (e.g. at one site), the macro average runs over the
    classes that are present, since the others' AUC is undefined. With fewer than two
    classes present (including ``N == 0``) or non-finite probabilities, AUC is
    ``nan`` (logged, never raised).

    Args:
        labels: Integer class labels, shape ``(N,)`` or ``(N, 1)``.
        probs: Class probabilities (softmax outputs), shape ``(N, C)`` with ``C >= 2``.
        loss: Mean loss to pass through under the key ``"loss"``.

    Returns:
        ``{"auc": ..., "accuracy": ...}`` plus ``"loss"`` when given; ``accuracy`` is
        the fraction of argmax predictions that match (``nan`` when ``N == 0``).

    Raises:
        ValueError: If the shapes disagree or labels are not in ``[0, C)``.
    """
    y, p = _check_inputs(labels, probs)
    metrics: dict[str, float] = {
        "auc": _auc(y, p),
        "accuracy": float(np.mean(y == p.argmax(axis=1))) if y.size else math.nan,
    }
    if loss is not None:
        metrics["loss"] = float(loss)
    return metrics


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean that skips NaN values (and their weights).

    Used to aggregate per-site metrics, weighted by each site's number of examples;
    a site whose AUC is undefined (``nan``) is left out rather than poisoning the mean.

    Args:
        values: One value per site (``nan`` allowed).
        weights: Non-negative weights, same length as ``values``.

    Returns:
        ``sum(w * v) / sum(w)`` over the non-NaN values, or ``nan`` when no value is
        left or their weights sum to zero.

    Raises:
        ValueError: If the lengths differ or a weight is negative or not finite.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if v.shape != w.shape:
        raise ValueError(f"values ({v.size}) and weights ({w.size}) have different lengths")
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    keep = ~np.isnan(v)
    if not keep.any() or w[keep].sum() <= 0:
        return math.nan
    return float(np.average(v[keep], weights=w[keep]))
