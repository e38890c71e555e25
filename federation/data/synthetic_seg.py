"""``synthetic_seg``: the ``synthetic`` lesion images with their lesion masks, for segmentation.

The images, the 80/20 split and the per-site scanner shift are exactly those of
``synthetic`` (:mod:`federation.data.synthetic`); each sample's target is its
lesion mask (0 background, 1 lesion) instead of its label. Half the images hold
no lesion: their masks are empty (no Dice: the metrics count the cases that hold
a lesion, :mod:`federation.metrics.segmentation`). The sample's label (lesion
present) stays the stratum that partitions the data into sites.
"""

from __future__ import annotations

from pathlib import Path

from federation.config.schema import DataConfig
from federation.data.registry import DatasetInfo, DatasetSplits, _derive_seed, register_dataset
from federation.data.synthetic import (
    SYNTHETIC_SITE_SHIFT,
    SYNTHETIC_TEST_FRACTION,
    _stratified_split,
    generate_synthetic_lesions,
)

SYNTHETIC_SEG_CLASSES = ("background", "lesion")
"""Mask classes of ``synthetic_seg``."""


def load_synthetic_seg(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits:
    """Registry loader of ``synthetic_seg``: ``data.num_samples`` images and masks at ``data.image_size``.

    Args:
        config: The ``data`` section (``num_samples`` and ``image_size`` are used).
        data_dir: Unused (nothing is read from disk).
        seed: Generation seed (the same images as ``synthetic`` with this seed).
    """
    del data_dir
    data = generate_synthetic_lesions(num_samples=config.num_samples, image_size=config.image_size, seed=seed)
    train_idx, test_idx = _stratified_split(
        data.labels, test_fraction=SYNTHETIC_TEST_FRACTION, seed=_derive_seed(seed, 102)
    )
    return DatasetSplits(
        name="synthetic_seg",
        train_images=data.images[train_idx],
        train_labels=data.labels[train_idx],
        test_images=data.images[test_idx],
        test_labels=data.labels[test_idx],
        num_classes=len(SYNTHETIC_SEG_CLASSES),
        in_channels=1,
        md5=None,
        label_names=SYNTHETIC_SEG_CLASSES,
        train_masks=data.masks[train_idx],
        test_masks=data.masks[test_idx],
    )


def _register() -> None:
    register_dataset(
        "synthetic_seg",
        load_synthetic_seg,
        site_shift_strength=SYNTHETIC_SITE_SHIFT,
        info=DatasetInfo(in_channels=1, num_classes=len(SYNTHETIC_SEG_CLASSES)),
        tasks=("segmentation",),
        replace=True,
    )
