"""Site partitioning: complete, disjoint, deterministic, skewed when asked, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from federation.data import MAX_DIRICHLET_TRIES, partition_indices
from federation.data.partition import partition_like


def _labels(n: int = 2000, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int64)


def _label_mix(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(float)
    return counts / counts.sum(axis=1, keepdims=True)


def _mean_tv_to_global(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance of each site's label mix to the pooled one."""
    pooled = np.bincount(labels, minlength=num_classes) / len(labels)
    return float(np.mean(0.5 * np.abs(_label_mix(labels, parts, num_classes) - pooled).sum(axis=1)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_sites", [1, 3, 7])
def test_partition_is_complete_disjoint_and_sorted(scheme: str, num_sites: int) -> None:
    labels = _labels()
    parts = partition_indices(labels, num_sites=num_sites, scheme=scheme, alpha=0.5, seed=3, min_site_size=2)
    assert len(parts) == num_sites
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "indices must be sorted and unique"
        assert len(part) >= 2
    merged = np.concatenate(parts)
    assert len(merged) == len(labels), "a sample was assigned to two sites or dropped"
    assert np.array_equal(np.sort(merged), np.arange(len(labels)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_deterministic_for_a_seed(scheme: str) -> None:
    labels = _labels()
    kwargs = dict(num_sites=5, scheme=scheme, alpha=0.3, min_site_size=2)
    a = partition_indices(labels, seed=11, **kwargs)
    b = partition_indices(labels, seed=11, **kwargs)
    c = partition_indices(labels, seed=12, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c)), "a different seed must give a different split"


def test_iid_sizes_are_equal_and_label_mix_matches_the_pool() -> None:
    labels = _labels(n=2003)
    parts = partition_indices(labels, num_sites=4, scheme="iid", alpha=0.5, seed=0, min_site_size=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _mean_tv_to_global(labels, parts, 10) < 0.08


def test_dirichlet_small_alpha_skews_labels_much_more_than_iid() -> None:
    labels = _labels()
    iid = partition_indices(labels, num_sites=10, scheme="iid", alpha=0.1, seed=0, min_site_size=2)
    skew = partition_indices(labels, num_sites=10, scheme="dirichlet", alpha=0.1, seed=0, min_site_size=2)
    flat = partition_indices(labels, num_sites=10, scheme="dirichlet", alpha=1000.0, seed=0, min_site_size=2)
    tv_iid = _mean_tv_to_global(labels, iid, 10)
    tv_skew = _mean_tv_to_global(labels, skew, 10)
    tv_flat = _mean_tv_to_global(labels, flat, 10)
    assert tv_iid < 0.1
    assert tv_skew > 0.45, f"alpha=0.1 should give strongly different label mixes, mean TV {tv_skew:.2f}"
    assert tv_flat < 0.1, "a huge alpha should be close to IID"
    # With alpha=0.1 most sites are dominated by a few classes.
    top_share = _label_mix(labels, skew, 10).max(axis=1)
    assert np.median(top_share) > 0.4


def test_dirichlet_respects_min_site_size_for_many_seeds() -> None:
    labels = _labels(n=600, num_classes=2)
    for seed in range(20):
        parts = partition_indices(labels, num_sites=6, scheme="dirichlet", alpha=0.3, seed=seed, min_site_size=10)
        assert min(len(p) for p in parts) >= 10
        assert sum(len(p) for p in parts) == 600


def test_too_many_sites_raises_naming_the_keys_and_size() -> None:
    labels = _labels(n=50)
    with pytest.raises(ValueError) as info:
        partition_indices(labels, num_sites=30, scheme="iid", alpha=0.5, seed=0, min_site_size=2)
    message = str(info.value)
    for needle in ("data.num_sites=30", "data.min_site_size=2", "50 samples", "fewer sites"):
        assert needle in message, f"{needle!r} missing from: {message}"


def test_dirichlet_retries_exhausted_raises_naming_alpha_and_a_fix() -> None:
    labels = _labels(n=100, num_classes=2)
    with pytest.raises(ValueError) as info:
        partition_indices(labels, num_sites=10, scheme="dirichlet", alpha=0.05, seed=0, min_site_size=10)
    message = str(info.value)
    for needle in ("data.num_sites=10", "data.min_site_size=10", "data.alpha=0.05", "100 samples", "larger data.alpha"):
        assert needle in message, f"{needle!r} missing from: {message}"
    assert str(MAX_DIRICHLET_TRIES) in message


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(scheme="shards"), "data.partition"),
        (dict(num_sites=0), "data.num_sites"),
        (dict(min_site_size=0), "data.min_site_size"),
        (dict(scheme="dirichlet", alpha=0.0), "data.alpha"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, needle: str) -> None:
    args = dict(num_sites=2, scheme="iid", alpha=0.5, seed=0, min_site_size=1) | kwargs
    with pytest.raises(ValueError, match=needle):
        partition_indices(_labels(n=20), **args)


def test_float_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="integer"):
        partition_indices(np.zeros(10), num_sites=2, scheme="iid", alpha=0.5, seed=0, min_site_size=1)


def test_partition_like_mirrors_each_sites_label_mix() -> None:
    train = _labels(n=2000, num_classes=4, seed=1)
    test = _labels(n=500, num_classes=4, seed=2)
    parts = partition_indices(train, num_sites=5, scheme="dirichlet", alpha=0.3, seed=0, min_site_size=5)
    test_parts = partition_like(test, reference_labels=train, reference_parts=parts, seed=0)
    merged = np.concatenate(test_parts)
    assert np.array_equal(np.sort(merged), np.arange(len(test)))
    assert min(len(p) for p in test_parts) >= 1
    train_sizes = np.array([len(p) for p in parts]) / len(train)
    test_sizes = np.array([len(p) for p in test_parts]) / len(test)
    assert np.abs(train_sizes - test_sizes).max() < 0.03
    big = [i for i, p in enumerate(test_parts) if len(p) >= 40]
    diff = np.abs(_label_mix(train, parts, 4)[big] - _label_mix(test, test_parts, 4)[big])
    assert diff.max() < 0.1, "a site's test label mix should follow its training label mix"
    again = partition_like(test, reference_labels=train, reference_parts=parts, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(test_parts, again))


def test_partition_like_gives_tiny_sites_at_least_one_sample() -> None:
    train = np.array([0] * 100 + [1] * 3, dtype=np.int64)
    parts = [np.arange(100), np.arange(100, 103)]
    test = np.array([0] * 10, dtype=np.int64)  # class 1 absent from the test pool
    test_parts = partition_like(test, reference_labels=train, reference_parts=parts, seed=0)
    assert [len(p) for p in test_parts] == [9, 1]
    with pytest.raises(ValueError, match="data.num_sites=2"):
        partition_like(test[:1], reference_labels=train, reference_parts=parts, seed=0)
