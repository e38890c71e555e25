"""Confidence intervals: Wilson score for proportions, DeLong for ROC AUC.

Wilson intervals use the closed form (no continuity correction; the same numbers
as :func:`scipy.stats.binomtest`'s ``proportion_ci(method="wilson")``, pinned by
tests). The DeLong interval uses the structural components of DeLong, DeLong &
Clarke-Pearson (1988) computed from mid-ranks (:func:`scipy.stats.rankdata`), which
handles ties exactly as the AUC's Mann-Whitney form does; it is deterministic, so
no seed is involved. Every site evaluates with these each round on test splits of
tens of samples, so they are written in numpy: scipy's and scikit-learn's input
checks cost 10-100x the arithmetic at that size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy.stats import rankdata

NAN_INTERVAL = (math.nan, math.nan)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _z(confidence: float) -> float:
    """The two-sided standard normal quantile of ``confidence`` (1.96 at 0.95)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, total: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / total``.

    Args:
        successes: Number of successes, ``0 <= successes <= total``.
        total: Number of trials.
        confidence: Confidence level, e.g. 0.95.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when ``total == 0``.

    Raises:
        ValueError: Counts out of range or confidence not in ``(0, 1)``.
    """
    _check_confidence(confidence)
    k, n = int(successes), int(total)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= total, got successes={successes}, total={total}")
    if n == 0:
        return NAN_INTERVAL
    z = _z(confidence)
    center = (k + z * z / 2.0) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4.0)
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class AucInterval:
    """ROC AUC with its DeLong standard error and confidence interval.

    Attributes:
        auc: The AUC (Mann-Whitney statistic, ties count one half).
        se: DeLong standard error (``nan`` with fewer than two positives or negatives).
        low: Lower bound, clipped to ``[0, 1]`` (``nan`` when ``se`` is).
        high: Upper bound, clipped to ``[0, 1]``.
    """

    auc: float
    se: float
    low: float
    high: float


def delong_placements(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong placement values ``V10`` (per positive) and ``V01`` (per negative).

    ``V10[i]`` is the fraction of negatives scored below positive ``i`` (ties one
    half); ``V01[j]`` the fraction of positives scored above negative ``j``. Their
    means both equal the AUC.

    Args:
        labels: 0/1 labels ``(N,)``.
        scores: Scores ``(N,)``; higher means more likely positive.

    Returns:
        ``(V10, V01)``.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return np.zeros(0), np.zeros(0)
    ranks = rankdata(np.concatenate([pos, neg]))  # mid-ranks over all samples
    v10 = (ranks[:m] - rankdata(pos)) / n  # negatives below each positive
    v01 = 1.0 - (ranks[m:] - rankdata(neg)) / m  # positives above each negative
    return v10, v01


def mann_whitney_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half): sklearn's ``roc_auc_score``.

    The mean of the DeLong placements (:func:`delong_placements`), so the AUC and
    its interval share one definition.

    Args:
        labels: 0/1 (or boolean) labels ``(N,)``.
        scores: Finite scores ``(N,)``; higher means more likely positive.

    Returns:
        The AUC; ``nan`` when either class is absent.
    """
    v10, _ = delong_placements(labels, scores)
    return float(v10.mean()) if v10.size else math.nan


def delong_auc_interval(labels: np.ndarray, scores: np.ndarray, *, confidence: float = 0.95) -> AucInterval:
    """ROC AUC with a DeLong confidence interval (normal approximation, clipped to ``[0, 1]``).

    ``Var(AUC) = S10 / m + S01 / n`` where ``S10``/``S01`` are the sample variances
    (``ddof=1``) of the placement values of the ``m`` positives and ``n`` negatives.

    Args:
        labels: 0/1 labels ``(N,)``.
        scores: Scores ``(N,)``.
        confidence: Confidence level.

    Returns:
        The :class:`AucInterval`; every field ``nan`` when one class is absent, the
        interval ``nan`` when a class has a single sample (its variance is undefined).

    Raises:
        ValueError: Different lengths, non-finite scores or a bad confidence level.
    """
    _check_confidence(confidence)
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) have different lengths")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    v10, v01 = delong_placements(y, s)
    if v10.size == 0:
        return AucInterval(math.nan, math.nan, math.nan, math.nan)
    auc = float(v10.mean())
    if v10.size < 2 or v01.size < 2:
        return AucInterval(auc, math.nan, math.nan, math.nan)
    se = math.sqrt(float(np.var(v10, ddof=1)) / v10.size + float(np.var(v01, ddof=1)) / v01.size)
    half = _z(confidence) * se
    return AucInterval(auc, se, max(0.0, auc - half), min(1.0, auc + half))
