"""Site partitions beyond IID and label skew: quantity skew and natural (real hospital) splits."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def quantity_shares(*, num_sites: int, fractions: str = "", exponent: float = 1.0) -> np.ndarray:
    """Each site's share of the samples under quantity skew.

    Args:
        num_sites: Number of sites.
        fractions: ``data.quantity_fractions``: comma-separated relative sizes, one per
            site (``"0.5,0.3,0.2"`` or ``"5,3,2"``; they are normalised). Empty: power law.
        exponent: ``data.quantity_exponent``: with no fractions, site ``k`` (1-based)
            gets a share proportional to ``k ** -exponent`` (0 = equal sizes).

    Returns:
        ``num_sites`` shares summing to 1.

    Raises:
        ValueError: Wrong number of fractions, a non-positive one, or a negative exponent.
    """
    if num_sites < 1:
        raise ValueError(f"data.num_sites must be >= 1, got {num_sites}")
    if fractions.strip():
        try:
            weights = np.array([float(v) for v in fractions.split(",") if v.strip()], dtype=np.float64)
        except ValueError:
            raise ValueError(
                f"data.quantity_fractions must be numbers separated by commas, got {fractions!r}"
            ) from None
        if len(weights) != num_sites:
            raise ValueError(
                f"data.quantity_fractions lists {len(weights)} sizes but data.num_sites={num_sites}; give one per site"
            )
        if not (weights > 0).all():
            raise ValueError(f"data.quantity_fractions must all be > 0, got {fractions!r}")
    else:
        if exponent < 0:
            raise ValueError(f"data.quantity_exponent must be >= 0, got {exponent}")
        weights = np.arange(1, num_sites + 1, dtype=np.float64) ** -float(exponent)
    return weights / weights.sum()


def partition_quantity(
    labels: np.ndarray, *, shares: np.ndarray, seed: int, min_site_size: int
) -> list[np.ndarray]:
    """Deal shuffled samples out in the given proportions (sizes skewed, label mix IID).

    Sizes are ``shares * N`` rounded by largest remainder; a site left below
    ``min_site_size`` is topped up from the largest site.

    Args:
        labels: Labels of the pool, ``(N,)`` (only the count matters).
        shares: Per-site shares (:func:`quantity_shares`).
        seed: Seed of the shuffle.
        min_site_size: Fewest samples any site may get.

    Returns:
        One sorted ``int64`` index array per site; disjoint, covering ``range(N)``.

    Raises:
        ValueError: If ``N < num_sites * min_site_size``.
    """
    n, num_sites = len(labels), len(shares)
    if num_sites * min_site_size > n:
        raise ValueError(
            f"cannot split {n} samples into data.num_sites={num_sites} sites with at least "
            f"data.min_site_size={min_site_size} each; use fewer sites or a smaller data.min_site_size"
        )
    exact = np.asarray(shares, dtype=np.float64) * n
    sizes = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: n - int(sizes.sum())]] += 1
    while (sizes < min_site_size).any():
        short = int(np.flatnonzero(sizes < min_site_size)[0])
        donor = int(np.argmax(sizes))
        sizes[donor] -= 1
        sizes[short] += 1
    perm = np.random.default_rng([int(seed), 3]).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.split(perm, np.cumsum(sizes)[:-1])]


def partition_natural(sites: np.ndarray | None, *, num_sites: int, site_names: tuple[str, ...], dataset: str,
                      split: str) -> list[np.ndarray]:
    """The natural split: site ``k`` holds exactly the samples recorded at hospital ``k``.

    Args:
        sites: Per-sample site index of the split, or ``None`` if the dataset has none.
        num_sites: ``data.num_sites``; must equal the number of natural sites.
        site_names: The dataset's site names.
        dataset: Dataset name (for messages).
        split: ``"train"`` or ``"test"`` (for messages).

    Returns:
        One sorted ``int64`` index array per site.

    Raises:
        ValueError: The dataset has no natural sites, or ``num_sites`` differs.
    """
    if sites is None:
        raise ValueError(
            f"data.partition=natural needs a dataset recorded at real sites (e.g. heart_disease); "
            f"'{dataset}' has none: use iid, dirichlet or quantity"
        )
    if num_sites != len(site_names):
        raise ValueError(
            f"dataset '{dataset}' has {len(site_names)} natural sites ({', '.join(site_names)}); "
            f"set data.num_sites={len(site_names)} (got {num_sites})"
        )
    parts = [np.flatnonzero(sites == k).astype(np.int64) for k in range(num_sites)]
    empty = [site_names[k] for k, part in enumerate(parts) if not len(part)]
    if empty:
        raise ValueError(f"dataset '{dataset}', {split} split: no samples left at {empty} (data.max_*_samples?)")
    return parts
