"""Split a pooled dataset into sites: IID or Dirichlet label skew."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

MAX_DIRICHLET_TRIES = 100
"""Dirichlet draws tried before giving up on ``min_site_size``."""


def _impossible(reason: str, *, n: int, num_sites: int, min_site_size: int, alpha: float | None) -> ValueError:
    alpha_text = f", data.alpha={alpha}" if alpha is not None else ""
    fixes = "use fewer sites (data.num_sites), a smaller data.min_site_size"
    if alpha is not None:
        fixes += ", a larger data.alpha (less label skew)"
    return ValueError(
        f"cannot split {n} samples into data.num_sites={num_sites} sites with at least "
        f"data.min_site_size={min_site_size} samples each{alpha_text}: {reason}. "
        f"Fix: {fixes}, or more data."
    )


def partition_indices(
    labels: np.ndarray,
    *,
    num_sites: int,
    scheme: Literal["iid", "dirichlet"],
    alpha: float,
    seed: int,
    min_site_size: int,
) -> list[np.ndarray]:
    """Assign every sample to exactly one site.

    ``iid`` shuffles the samples and deals them out in near-equal parts (sizes
    differ by at most one). ``dirichlet`` gives label skew as in Hsu et al. (2019):
    for every class, site shares are drawn from ``Dirichlet(alpha, ..., alpha)`` and
    that class's shuffled samples are cut in those proportions; small ``alpha``
    means each site sees few classes. Draws are repeated with derived seeds (at most
    :data:`MAX_DIRICHLET_TRIES`) until every site has ``min_site_size`` samples.

    Args:
        labels: Integer class labels, shape ``(N,)``.
        num_sites: Number of sites, ``>= 1``.
        scheme: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration (``> 0``; used by ``dirichlet`` only).
        seed: Seed; the same inputs always give the same split.
        min_site_size: Fewest samples any site may get, ``>= 1``.

    Returns:
        ``num_sites`` sorted ``int64`` index arrays, disjoint, whose union is ``range(N)``.

    Raises:
        ValueError: Bad arguments, or no split satisfies ``min_site_size`` (the
            message names ``data.num_sites``, ``data.min_site_size``, ``data.alpha``
            and the dataset size, and suggests a fix).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}")
    if num_sites < 1:
        raise ValueError(f"data.num_sites must be >= 1, got {num_sites}")
    if min_site_size < 1:
        raise ValueError(f"data.min_site_size must be >= 1, got {min_site_size}")
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"unknown partition scheme {scheme!r} (data.partition); allowed: 'iid', 'dirichlet'")
    n = len(labels)
    skew_alpha = alpha if scheme == "dirichlet" else None
    if num_sites * min_site_size > n:
        raise _impossible(
            f"that needs {num_sites * min_site_size} samples",
            n=n,
            num_sites=num_sites,
            min_site_size=min_site_size,
            alpha=skew_alpha,
        )

    if scheme == "iid":
        perm = np.random.default_rng([int(seed), 0]).permutation(n)
        return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_sites)]

    if not alpha > 0:
        raise ValueError(f"data.alpha must be > 0 for the dirichlet partition, got {alpha}")
    classes = np.unique(labels)
    best_smallest = 0
    for attempt in range(MAX_DIRICHLET_TRIES):
        rng = np.random.default_rng([int(seed), 1, attempt])
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_sites, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].append(chunk)
        sites = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        sizes = [len(s) for s in sites]
        if min(sizes) >= min_site_size:
            if attempt:
                logger.debug("dirichlet partition met min_site_size=%d after %d draws", min_site_size, attempt + 1)
            return sites
        best_smallest = max(best_smallest, min(sizes))
    raise _impossible(
        f"{MAX_DIRICHLET_TRIES} Dirichlet draws all left a site with fewer samples "
        f"(the best draw's smallest site had {best_smallest})",
        n=n,
        num_sites=num_sites,
        min_site_size=min_site_size,
        alpha=alpha,
    )


def partition_like(
    labels: np.ndarray,
    *,
    reference_labels: np.ndarray,
    reference_parts: list[np.ndarray],
    seed: int,
    min_site_size: int = 1,
) -> list[np.ndarray]:
    """Split a second pool (e.g. the test split) in the proportions of an existing partition.

    Each site receives, of every class, the same share it holds of that class in
    the reference (training) partition, so a site's test data mirrors its training
    data in size and label mix. Shares are rounded by largest remainder; a class
    absent from the reference is spread by site size. Sites left below
    ``min_site_size`` then receive random samples from the largest sites.

    Args:
        labels: Integer labels of the pool to split, shape ``(M,)``.
        reference_labels: Labels of the reference pool, shape ``(N,)``.
        reference_parts: The reference partition (index arrays into ``reference_labels``).
        seed: Seed of the shuffles.
        min_site_size: Fewest samples any site may get, ``>= 1``.

    Returns:
        ``len(reference_parts)`` sorted ``int64`` index arrays, disjoint, covering ``range(M)``.

    Raises:
        ValueError: If the pool has fewer than ``num_sites * min_site_size`` samples.
    """
    labels = np.asarray(labels)
    reference_labels = np.asarray(reference_labels)
    num_sites = len(reference_parts)
    n = len(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}")
    if num_sites < 1:
        raise ValueError("reference_parts is empty: need at least one site")
    if min_site_size < 1:
        raise ValueError(f"min_site_size must be >= 1, got {min_site_size}")
    if num_sites * min_site_size > n:
        raise _impossible(
            f"that needs {num_sites * min_site_size} samples", n=n, num_sites=num_sites,
            min_site_size=min_site_size, alpha=None,
        )
    num_classes = int(max(labels.max(initial=0), reference_labels.max(initial=0))) + 1
    ref_counts = np.stack([np.bincount(reference_labels[p], minlength=num_classes) for p in reference_parts])
    site_sizes = ref_counts.sum(axis=1).astype(np.float64)
    if site_sizes.sum() == 0:
        site_sizes = np.ones(num_sites)
    rng = np.random.default_rng([int(seed), 2])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        weights = ref_counts[:, c].astype(np.float64)
        if weights.sum() == 0:
            weights = site_sizes
        exact = weights / weights.sum() * len(idx)
        quota = np.floor(exact).astype(np.int64)
        order = np.lexsort((rng.random(num_sites), -(exact - quota)))
        quota[order[: len(idx) - int(quota.sum())]] += 1
        for site, chunk in enumerate(np.split(idx, np.cumsum(quota)[:-1])):
            parts[site].append(chunk)
    sites = [np.concatenate(p).astype(np.int64) for p in parts]
    while True:
        sizes = np.array([len(s) for s in sites])
        short = np.flatnonzero(sizes < min_site_size)
        if not short.size:
            break
        donor = int(np.argmax(sizes))
        take = int(rng.integers(len(sites[donor])))
        moved = sites[donor][take]
        sites[donor] = np.delete(sites[donor], take)
        sites[short[0]] = np.append(sites[short[0]], moved)
    return [np.sort(s) for s in sites]
