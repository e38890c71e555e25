"""Scenario hooks of the site data layer: skewed partitions and per-site feature shifts.

:mod:`federation.data.sites` calls these two functions; every choice is a pure
function of the ``data`` section and the seed, so a scenario is fully described by
the run's resolved config and reproduces exactly.
"""

from __future__ import annotations

import logging

import numpy as np

from federation.config.schema import DataConfig
from federation.data.partition import partition_like
from federation.data.registry import DatasetSplits, _derive_seed, site_shift_strength
from federation.data.shift import acquisition_profile, parse_components, shift_site_images
from federation.data.skew import partition_natural, partition_quantity, quantity_shares
from federation.data.synthetic import apply_site_shift

logger = logging.getLogger(__name__)

SKEWED_PARTITIONS = ("quantity", "natural")
"""``data.partition`` values handled here (iid and dirichlet stay in :mod:`federation.data.partition`)."""

_TRAIN_STREAM = 201
_TEST_STREAM = 202


def skewed_partitions(
    config: DataConfig, splits: DatasetSplits, *, seed: int, num_sites: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train and test index arrays per site for ``partition`` quantity or natural.

    ``quantity``: site sizes from ``data.quantity_fractions`` or the power law
    ``k ** -data.quantity_exponent``, label mix IID; the test split mirrors each
    site's training size and label mix (:func:`partition_like`). ``natural``: every
    sample stays at the hospital that recorded it, train and test alike.

    Raises:
        ValueError: Bad fractions, too few samples, or no natural sites.
    """
    where = f"dataset '{config.dataset}'"
    if config.partition == "natural":
        train = partition_natural(splits.train_sites, num_sites=num_sites, site_names=splits.site_names,
                                  dataset=config.dataset, split="train")
        test = partition_natural(splits.test_sites, num_sites=num_sites, site_names=splits.site_names,
                                 dataset=config.dataset, split="test")
        return train, test
    if config.partition != "quantity":
        raise ValueError(f"skewed_partitions handles {SKEWED_PARTITIONS}, not {config.partition!r}")
    shares = quantity_shares(num_sites=num_sites, fractions=config.quantity_fractions,
                             exponent=config.quantity_exponent)
    try:
        train = partition_quantity(splits.train_labels, shares=shares, seed=_derive_seed(seed, _TRAIN_STREAM),
                                   min_site_size=config.min_site_size)
        test = partition_like(splits.test_labels, reference_labels=splits.train_labels, reference_parts=train,
                              seed=_derive_seed(seed, _TEST_STREAM), min_site_size=1)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return train, test


def shift_mode(config: DataConfig) -> str:
    """``"synthetic"``, ``"acquisition"`` or ``"none"``: the shift a site's images get."""
    if config.site_shift == "acquisition":
        return "acquisition"
    if config.site_shift == "default" and site_shift_strength(config.dataset) > 0:
        return "synthetic"
    return "none"


def shift_site_split(
    config: DataConfig, images: np.ndarray, *, site_index: int, seed: int, noise_stream: int
) -> np.ndarray:
    """Apply the configured per-site feature shift to one split of one site.

    Args:
        config: The ``data`` section (``site_shift``, ``shift_strength``, ``shift_components``).
        images: The site's images (not modified).
        site_index: Zero-based site.
        seed: Experiment seed.
        noise_stream: 0 for the train split, 1 for the test split.

    Returns:
        The shifted images, or ``images`` itself when there is no shift.
    """
    mode = shift_mode(config)
    if mode == "none":
        return images
    if mode == "synthetic":
        strength = site_shift_strength(config.dataset)
        return apply_site_shift(images, site_index=site_index, seed=seed, strength=strength,
                                noise_stream=noise_stream)
    if images.ndim == 2:
        raise ValueError(
            f"data.site_shift=acquisition needs image data; dataset '{config.dataset}' is tabular "
            "(use data.site_shift=none)"
        )
    return shift_site_images(images, site_index=site_index, seed=seed, strength=config.shift_strength,
                             components=parse_components(config.shift_components), noise_stream=noise_stream)


def site_profile(config: DataConfig, *, site_index: int, seed: int) -> dict[str, float]:
    """The acquisition parameters a site gets (empty when there is no MONAI profile), for reports."""
    if shift_mode(config) != "acquisition":
        return {}
    return acquisition_profile(site_index=site_index, seed=seed, strength=config.shift_strength,
                               components=parse_components(config.shift_components)).as_dict()
