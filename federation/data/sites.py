"""Per-site views of a pooled dataset: what one simulated hospital holds."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from federation.config.schema import DataConfig
from federation.data.paths import resolve_data_dir
from federation.data.partition import partition_indices, partition_like
from federation.data.registry import DatasetSplits, _derive_seed, load_dataset
from federation.data.scenario import SKEWED_PARTITIONS, shift_site_split, skewed_partitions
from federation.tasks import get_task

logger = logging.getLogger(__name__)

_TRAIN_PARTITION_STREAM = 201
_TEST_PARTITION_STREAM = 202


@dataclass
class SiteData:
    """The data one site trains and evaluates on.

    Attributes:
        name: ``"site-<k>"``, 1-based.
        train: ``TensorDataset(images float32 (N, C, H, W), targets)``: labels int64 ``(N,)``,
            or for ``data.task=segmentation`` label maps uint8 ``(N, H, W)`` (volumes ``(N, D, H, W)``).
        test: The site's own test split, same layout.
        num_classes: Number of classes of the dataset.
        in_channels: Image channels.
        label_counts: Training samples per class, every class listed (0 if absent).
        test_label_counts: Test samples per class, every class listed.
        test_groups: Subgroup attributes of the test samples, name -> int array
            (``"sex"``, ``"age"``; -1 unknown), where the dataset carries them
            (DICOM headers); empty otherwise. They never leave the site: only
            aggregate metrics per subgroup do (:mod:`federation.metrics.clinical`).
        spatial_dims: 2 for images, 3 for volumes, 0 for tabular feature vectors.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    label_counts: dict[int, int]
    test_label_counts: dict[int, int] = field(default_factory=dict)
    test_groups: dict[str, np.ndarray] = field(default_factory=dict)
    spatial_dims: int = 2


def site_name(site_index: int) -> str:
    """Return the display name of a zero-based site index (``site-1`` for 0)."""
    return f"site-{site_index + 1}"


def _counts(labels: np.ndarray, num_classes: int) -> dict[int, int]:
    counts = np.bincount(labels, minlength=num_classes)
    return {int(k): int(counts[k]) for k in range(num_classes)}


def _num_sites(config: DataConfig, num_sites: int | None) -> int:
    sites = config.num_sites if num_sites is None else int(num_sites)
    if sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {sites}")
    return sites


@functools.lru_cache(maxsize=16)
def _partitions_cached(
    config_json: str, seed: int, num_sites: int
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    config = DataConfig.model_validate_json(config_json)
    splits = load_dataset(config, seed=seed)
    if config.partition in SKEWED_PARTITIONS:  # quantity skew, natural hospitals
        skewed = skewed_partitions(config, splits, seed=seed, num_sites=num_sites)
        for part in (*skewed[0], *skewed[1]):
            part.setflags(write=False)
        return tuple(skewed[0]), tuple(skewed[1])
    try:
        train = partition_indices(
            splits.train_labels,
            num_sites=num_sites,
            scheme=config.partition,
            alpha=config.alpha,
            seed=_derive_seed(seed, _TRAIN_PARTITION_STREAM),
            min_site_size=config.min_site_size,
        )
    except ValueError as exc:
        raise ValueError(f"dataset '{config.dataset}', training split: {exc}") from exc
    try:
        test = partition_like(
            splits.test_labels,
            reference_labels=splits.train_labels,
            reference_parts=train,
            seed=_derive_seed(seed, _TEST_PARTITION_STREAM),
            min_site_size=1,
        )
    except ValueError as exc:
        raise ValueError(
            f"dataset '{config.dataset}', test split (every site needs >= 1 test sample; "
            f"data.max_test_samples={config.max_test_samples} caps it): {exc}"
        ) from exc
    for part in (*train, *test):
        part.setflags(write=False)
    return tuple(train), tuple(test)


def site_partitions(
    config: DataConfig, *, seed: int, num_sites: int | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return the train and test index arrays of every site (cached per process).

    Args:
        config: The ``data`` section.
        seed: Experiment seed.
        num_sites: Number of sites; defaults to ``config.num_sites``.

    Returns:
        ``(train_parts, test_parts)``: one sorted, read-only index array per site
        into the pooled train / test split of :func:`load_dataset`.

    Raises:
        ValueError: If the split is impossible (see :func:`partition_indices`).
    """
    sites = _num_sites(config, num_sites)
    resolved = config.model_copy(update={"data_dir": str(resolve_data_dir(config.data_dir))})
    train, test = _partitions_cached(resolved.model_dump_json(), int(seed), sites)
    return list(train), list(test)


def _tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """Images and targets: int64 labels, or uint8 label maps (kept small; batches are cast to int64)."""
    targets = np.array(labels) if labels.dtype == np.uint8 else np.array(labels, dtype=np.int64)
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(targets))


def _masks(masks: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if masks is None else masks[idx]


def load_site_data(config: DataConfig, *, seed: int, site_index: int, num_sites: int | None = None) -> SiteData:
    """Return the training and test data of one site.

    The pooled train split is partitioned with :func:`partition_indices`
    (``data.partition``, ``data.alpha``, ``data.min_site_size``); the pooled test
    split is cut with :func:`partition_like` in the same per-class proportions
    (other random draws), so each site has its own test data whose size and label
    mix mirror its training data (at least one test sample per site). For datasets
    registered with a site shift (``synthetic``) the site's train and test images
    pass through :func:`apply_site_shift`; ``data.site_shift=acquisition`` gives any
    image dataset MONAI scanner profiles (:mod:`federation.data.shift`), and
    ``data.partition`` quantity/natural are cut by :mod:`federation.data.scenario`.

    Args:
        config: The ``data`` section.
        seed: Experiment seed.
        site_index: Zero-based site number, ``0 <= site_index < num_sites``.
        num_sites: Number of sites; defaults to ``config.num_sites``.

    Returns:
        The site's :class:`SiteData` (its own tensors; the pooled arrays are shared).

    Raises:
        ValueError: If ``site_index`` is out of range or the split is impossible.
    """
    sites = _num_sites(config, num_sites)
    if not 0 <= site_index < sites:
        raise ValueError(f"site_index={site_index} is out of range: there are {sites} sites (0..{sites - 1})")
    splits: DatasetSplits = load_dataset(config, seed=seed)
    train_parts, test_parts = site_partitions(config, seed=seed, num_sites=sites)
    train_idx, test_idx = train_parts[site_index], test_parts[site_index]
    train_images = splits.train_images[train_idx]
    test_images = splits.test_images[test_idx]
    train_images = shift_site_split(config, train_images, site_index=site_index, seed=seed, noise_stream=0)
    test_images = shift_site_split(config, test_images, site_index=site_index, seed=seed, noise_stream=1)
    train_labels, test_labels = splits.train_labels[train_idx], splits.test_labels[test_idx]
    task = get_task(config.task)  # what a sample's target is: its label, or its mask
    site = SiteData(
        name=site_name(site_index),
        train=_tensors(train_images, task.targets(labels=train_labels, masks=_masks(splits.train_masks, train_idx))),
        test=_tensors(test_images, task.targets(labels=test_labels, masks=_masks(splits.test_masks, test_idx))),
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        label_counts=_counts(train_labels, splits.num_classes),
        test_label_counts=_counts(test_labels, splits.num_classes),
        test_groups={k: np.asarray(v)[test_idx] for k, v in (splits.test_groups or {}).items()},
        spatial_dims=splits.spatial_dims,
    )
    logger.debug(
        "%s: %d train %s, %d test %s",
        site.name,
        len(train_idx),
        site.label_counts,
        len(test_idx),
        site.test_label_counts,
    )
    return site


def load_central_test(config: DataConfig, *, seed: int) -> TensorDataset:
    """Return the whole pooled test split, without site shifts (server-side evaluation).

    Args:
        config: The ``data`` section.
        seed: Experiment seed.

    Returns:
        ``TensorDataset(images float32 (M, C, H, W), labels int64 (M,))`` (a private copy).
    """
    splits = load_dataset(config, seed=seed)
    targets = get_task(config.task).targets(labels=splits.test_labels, masks=splits.test_masks)
    return _tensors(np.array(splits.test_images), targets)


def describe_sites(config: DataConfig, *, seed: int, num_sites: int | None = None) -> list[dict[str, Any]]:
    """Summarise every site's share of the data (for logs and reports).

    Args:
        config: The ``data`` section.
        seed: Experiment seed.
        num_sites: Number of sites; defaults to ``config.num_sites``.

    Returns:
        One dict per site: ``name``, ``n_train``, ``n_test``, ``label_counts`` (train)
        and ``test_label_counts``, each count dict listing every class; with
        ``data.partition=natural`` also ``origin``, the hospital's name.
    """
    splits = load_dataset(config, seed=seed)
    train_parts, test_parts = site_partitions(config, seed=seed, num_sites=num_sites)
    return [
        {
            "name": site_name(i),
            "n_train": int(len(tr)),
            "n_test": int(len(te)),
            "label_counts": _counts(splits.train_labels[tr], splits.num_classes),
            "test_label_counts": _counts(splits.test_labels[te], splits.num_classes),
            **({"origin": splits.site_names[i]} if config.partition == "natural" else {}),
        }
        for i, (tr, te) in enumerate(zip(train_parts, test_parts))
    ]
