"""Tests for federation.metrics: AUC/accuracy on hand-computed cases and weighted_mean."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from federation.metrics import classification_metrics, weighted_mean

# Six samples, three classes; per-class one-vs-rest AUCs counted by hand (pairs
# positive > negative, ties 0.5): class 0 5/8, class 1 3.5/8, class 2 8/8.
LABELS_3 = np.array([0, 0, 1, 1, 2, 2])
PROBS_3 = np.array(
    [
        [0.6, 0.3, 0.1],
        [0.2, 0.5, 0.3],
        [0.3, 0.4, 0.3],
        [0.5, 0.2, 0.3],
        [0.1, 0.3, 0.6],
        [0.4, 0.2, 0.4],
    ]
)


def _binary(p1: list[float]) -> np.ndarray:
    p = np.asarray(p1)
    return np.stack([1 - p, p], axis=1)


def test_binary_auc_and_accuracy_exact() -> None:
    m = classification_metrics(labels=np.array([0, 0, 1, 1]), probs=_binary([0.1, 0.4, 0.35, 0.8]))
    assert m == {"auc": pytest.approx(0.75), "accuracy": pytest.approx(0.75)}


def test_loss_passed_through_and_column_labels_accepted() -> None:
    m = classification_metrics(labels=np.array([[0], [1]]), probs=_binary([0.2, 0.9]), loss=0.25)
    assert m == {"auc": 1.0, "accuracy": 1.0, "loss": 0.25}
    assert all(isinstance(v, float) for v in m.values())


def test_multiclass_ovr_macro_by_hand() -> None:
    m = classification_metrics(labels=LABELS_3, probs=PROBS_3)
    assert m["auc"] == pytest.approx((5 / 8 + 3.5 / 8 + 8 / 8) / 3)  # 0.6875
    # argmax: 0, 1, 1, 0, 2, 0 (tie -> first) vs labels 0, 0, 1, 1, 2, 2
    assert m["accuracy"] == pytest.approx(0.5)


def test_multiclass_absent_class_macro_over_present() -> None:
    # Class 2 never occurs: its one-vs-rest AUC is undefined and left out.
    # Class 0: positives .6,.2 vs negatives .3,.5 -> 2/4; class 1: .4,.2 vs .3,.5 -> 1/4.
    labels = np.array([0, 0, 1, 1])
    m = classification_metrics(labels=labels, probs=PROBS_3[:4])
    assert m["auc"] == pytest.approx((2 / 4 + 1 / 4) / 2)


def test_multiclass_float32_softmax_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=200)
    expected = roc_auc_score(labels, probs.astype(np.float64), multi_class="ovr", average="macro", labels=range(10))
    assert classification_metrics(labels=labels, probs=probs)["auc"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("labels", "probs"),
    [
        (np.array([1, 1, 1]), _binary([0.2, 0.5, 0.9])),
        (np.array([2, 2]), PROBS_3[:2]),
    ],
)
def test_auc_nan_with_one_class(labels: np.ndarray, probs: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn UndefinedMetricWarning leaks out
        m = classification_metrics(labels=labels, probs=probs)
    assert math.isnan(m["auc"])
    assert not math.isnan(m["accuracy"])


def test_empty_input_is_nan() -> None:
    m = classification_metrics(labels=np.array([], dtype=int), probs=np.zeros((0, 2)))
    assert math.isnan(m["auc"])
    assert math.isnan(m["accuracy"])


def test_non_finite_probs_give_nan_auc() -> None:
    probs = _binary([0.1, 0.9, 0.2, 0.8])
    probs[0] = np.nan
    m = classification_metrics(labels=np.array([0, 1, 0, 1]), probs=probs)
    assert math.isnan(m["auc"])


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(labels=np.array([0, 1]), probs=np.array([0.1, 0.9]))
    with pytest.raises(ValueError, match="lengths"):
        classification_metrics(labels=np.array([0, 1, 1]), probs=_binary([0.1, 0.9]))
    with pytest.raises(ValueError, match="labels must be"):
        classification_metrics(labels=np.array([0, 2]), probs=_binary([0.1, 0.9]))


def test_weighted_mean_ignores_nan() -> None:
    assert weighted_mean([0.5, math.nan, 1.0], [1, 5, 3]) == pytest.approx((0.5 * 1 + 1.0 * 3) / 4)
    assert weighted_mean([2.0, 4.0], [1.0, 1.0]) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("values", "weights"),
    [([math.nan, math.nan], [1, 2]), ([], []), ([1.0, 2.0], [0, 0]), ([1.0, math.nan], [0, 3])],
)
def test_weighted_mean_nan_when_nothing_left(values: list[float], weights: list[float]) -> None:
    assert math.isnan(weighted_mean(values, weights))


def test_weighted_mean_bad_input() -> None:
    with pytest.raises(ValueError, match="lengths"):
        weighted_mean([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean([1.0, 2.0], [1.0, -1.0])


# ------------------------------------------ the numpy metrics against their references


def _binary_case(seed: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """Random 0/1 labels (both present) and scores; odd seeds give scores with many ties."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    y = rng.integers(0, 2, size=n)
    y[:2] = [0, 1]
    scores = rng.integers(0, 7, size=n) / 6.0 if seed % 2 else rng.random(n)
    return rng, y, scores


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_sklearn_binary_and_multiclass_with_ties(seed: int) -> None:
    from sklearn.metrics import roc_auc_score as reference
    from sklearn.preprocessing import label_binarize

    rng, y, p1 = _binary_case(seed)
    n = y.size
    metrics = classification_metrics(labels=y, probs=np.stack([1 - p1, p1], axis=1))
    assert metrics["auc"] == pytest.approx(reference(y, p1), abs=1e-12)
    assert metrics["accuracy"] == np.mean(y == (p1 > 0.5))  # argmax picks class 0 on a tie

    k = 4
    logits = rng.normal(size=(n, k)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, k, size=n)
    y[:k] = np.arange(k)
    expected = reference(y, probs / probs.sum(axis=1, keepdims=True), multi_class="ovr", average="macro")
    assert classification_metrics(labels=y, probs=probs)["auc"] == pytest.approx(expected, abs=1e-12)
    y[y == 2] = 0  # class 2 absent: macro over the classes present
    present = np.array([0, 1, 3])
    onehot = label_binarize(y, classes=np.arange(k))
    expected = reference(onehot[:, present], (probs / probs.sum(axis=1, keepdims=True))[:, present], average="macro")
    assert classification_metrics(labels=y, probs=probs)["auc"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_roc_points_brier_and_wilson_equal_their_references(seed: int) -> None:
    from scipy.stats import binomtest
    from sklearn.metrics import brier_score_loss, roc_curve

    from federation.metrics.calibration import brier_score
    from federation.metrics.clinical import roc_curve_points
    from federation.metrics.intervals import wilson_interval

    _, y, scores = _binary_case(seed)
    n = y.size
    fpr, tpr = roc_curve_points(y, scores)
    ref_fpr, ref_tpr, _ = roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-15)
    assert brier_score(y, scores) == pytest.approx(brier_score_loss(y, scores), abs=1e-15)
    for k in {0, 1, n // 3, n - 1, n}:
        for confidence in (0.8, 0.95, 0.99):
            ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
            assert wilson_interval(k, n, confidence=confidence) == pytest.approx((ci.low, ci.high), abs=1e-12)
