"""Dataset registry, the :class:`DatasetSplits` container and the cached loader.

A dataset is registered under a name with a *loader*, a callable
``loader(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits`` that
returns the full dataset at its native image size. :func:`load_dataset` looks the
name up, calls the loader, takes the ``max_train_samples``/``max_test_samples``
subsets, resizes to ``image_size`` and caches the result for the process, so that
many simulated sites in one process share one read-only copy of the arrays.

The built-in datasets (:data:`BUILTIN_DATASET_MODULES`, each with a ``_register()``)
are registered on the registry's first use, not when ``federation.data`` is
imported, so that importing the package's light parts stays cheap.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from federation.config.schema import DataConfig
from federation.data.paths import resolve_data_dir
from federation.registries import check_new_name, unknown_name

logger = logging.getLogger(__name__)

_RESIZE_CHUNK_PIXELS = 1 << 24
"""Output pixels resized per torch call, to bound the temporary memory."""


@dataclass(frozen=True)
class DatasetSplits:
    """A whole dataset, split into train and test (and, where it exists, val).

    Images are ``float32`` arrays of shape ``(N, C, H, W)`` scaled to ``[0, 1]``
    (volumes: ``(N, C, D, H, W)``; tabular data: feature vectors ``(N, F)``, where
    ``in_channels`` is the number of features ``F``); labels are ``int64`` arrays of shape ``(N,)`` with values in
    ``[0, num_classes)``. Arrays returned by :func:`load_dataset` are read-only
    and shared by every caller in the process: index them (which copies), never
    write to them.

    Attributes:
        name: Registry name of the dataset.
        train_images: Training images, ``(N, C, H, W)`` float32.
        train_labels: Training labels, ``(N,)`` int64.
        test_images: Test images, ``(M, C, H, W)`` float32.
        test_labels: Test labels, ``(M,)`` int64.
        num_classes: Number of classes.
        in_channels: Image channels ``C``.
        md5: MD5 checksum of the source file; ``None`` for generated data.
        label_names: One human-readable name per class.
        val_images: Official validation images, or ``None`` if the dataset has none.
        val_labels: Official validation labels, or ``None``.
        test_groups: Optional per-sample subgroup attributes of the test split,
            name -> int array ``(M,)`` (``"sex"`` codes, ``"age"`` in years; -1 unknown;
            see :mod:`federation.metrics.clinical`). Never identifiers.
        train_sites: For datasets with a natural split into hospitals: the zero-based
            site of every training sample, int64 ``(N,)`` (``data.partition=natural``).
        test_sites: The site of every test sample, int64 ``(M,)``.
        site_names: Display names of the natural sites, in site order.
        train_masks: Segmentation datasets: the label map of every training sample,
            uint8 ``(N, 1, *spatial)`` with values in ``[0, num_classes)`` (0 = background);
            then ``num_classes``/``label_names`` describe the mask classes and each
            ``labels`` entry is the sample's stratum for partitioning: its largest
            class present in the mask (0 if empty). ``None`` for other datasets.
        test_masks: The test samples' label maps, same layout.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    in_channels: int
    md5: str | None
    label_names: tuple[str, ...]
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    test_groups: dict[str, np.ndarray] | None = None
    train_sites: np.ndarray | None = None
    test_sites: np.ndarray | None = None
    site_names: tuple[str, ...] = ()
    train_masks: np.ndarray | None = None
    test_masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Check shapes, dtypes and label ranges so a faulty loader fails early."""
        if self.num_classes < 2:
            raise ValueError(f"dataset '{self.name}': num_classes must be >= 2, got {self.num_classes}")
        if len(self.label_names) != self.num_classes:
            raise ValueError(
                f"dataset '{self.name}': {len(self.label_names)} label_names for {self.num_classes} classes"
            )
        splits = [("train", self.train_images, self.train_labels), ("test", self.test_images, self.test_labels)]
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError(f"dataset '{self.name}': val_images and val_labels must both be set or both be None")
        if self.val_images is not None and self.val_labels is not None:
            splits.append(("val", self.val_images, self.val_labels))
        for key, values in (self.test_groups or {}).items():
            if np.asarray(values).shape != self.test_labels.shape:
                raise ValueError(f"dataset '{self.name}': test_groups[{key!r}] does not have one value per test sample")
        for split, images, labels in splits:
            where = f"dataset '{self.name}', {split} split"
            if images.dtype != np.float32 or images.ndim not in (2, 4, 5):
                raise ValueError(
                    f"{where}: images must be float32 (N, C, H, W), (N, C, D, H, W) or features (N, F), "
                    f"got {images.dtype} {images.shape}"
                )
            if images.shape[1] != self.in_channels:
                raise ValueError(f"{where}: images have {images.shape[1]} channels, in_channels={self.in_channels}")
            if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
                raise ValueError(
                    f"{where}: labels must be int64 of shape ({images.shape[0]},), got {labels.dtype} {labels.shape}"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"{where}: labels must lie in [0, {self.num_classes}), "
                    f"found [{labels.min()}, {labels.max()}]"
                )
        _check_natural_sites(self)
        _check_masks(self)

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes, 0 for tabular feature vectors."""
        return int(self.train_images.ndim - 2)

    @property
    def image_size(self) -> int:
        """Side length ``H`` of the (square) images; 0 for tabular data."""
        return int(self.train_images.shape[2]) if self.spatial_dims else 0


def _check_natural_sites(splits: DatasetSplits) -> None:
    """Natural site assignments: both splits or neither, one int per sample, names for every site."""
    if (splits.train_sites is None) != (splits.test_sites is None):
        raise ValueError(f"dataset '{splits.name}': train_sites and test_sites must both be set or both be None")
    if splits.train_sites is None or splits.test_sites is None:
        return
    for split, sites, labels in (
        ("train", splits.train_sites, splits.train_labels),
        ("test", splits.test_sites, splits.test_labels),
    ):
        if sites.dtype != np.int64 or sites.shape != labels.shape:
            raise ValueError(f"dataset '{splits.name}': {split}_sites must be int64 with one site per sample")
        if sites.size and (sites.min() < 0 or sites.max() >= len(splits.site_names)):
            raise ValueError(
                f"dataset '{splits.name}': {split}_sites must lie in [0, {len(splits.site_names)}) "
                f"(one name per site in site_names)"
            )


def _check_masks(splits: DatasetSplits) -> None:
    """Segmentation masks: both splits or neither, uint8 ``(N, 1, *spatial)`` like the images, classes in range."""
    if (splits.train_masks is None) != (splits.test_masks is None):
        raise ValueError(f"dataset '{splits.name}': train_masks and test_masks must both be set or both be None")
    for split, masks, images in (("train", splits.train_masks, splits.train_images),
                                 ("test", splits.test_masks, splits.test_images)):
        if masks is None:
            continue
        if masks.dtype != np.uint8 or masks.shape != (images.shape[0], 1, *images.shape[2:]):
            raise ValueError(f"dataset '{splits.name}', {split} split: masks must be uint8 "
                             f"{(images.shape[0], 1, *images.shape[2:])}, got {masks.dtype} {masks.shape}")
        if masks.size and masks.max() >= splits.num_classes:
            raise ValueError(f"dataset '{splits.name}', {split} split: mask values must lie in "
                             f"[0, {splits.num_classes}), found {masks.max()}")


DatasetLoader = Callable[..., DatasetSplits]
"""``loader(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits``."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset, without loading it."""

    in_channels: int
    num_classes: int
    spatial_dims: int = 2
    """2 for images, 3 for volumes, 0 for tabular data (``in_channels`` = features)."""


DeclaredInfo = Callable[[DataConfig], "DatasetInfo | list[str]"]
"""``declared(config) -> DatasetInfo``, or the problems (each naming the key to set) when the run config lacks it."""


class DataMismatch(ValueError):
    """A site's data disagrees with the shape the run config declares (classes, channels, size).

    ``detail`` names counts and config keys only, never a path or a label value from
    the site's files: it is sent to the coordinator as the refusal reason.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class _Entry:
    loader: DatasetLoader
    site_shift_strength: float
    info: DatasetInfo | None
    declared: DeclaredInfo | None = None  # set: site-only (the coordinator holds no data of it)
    tasks: tuple[str, ...] = ("classification",)


_REGISTRY: dict[str, _Entry] = {}

#: Modules of the shipped datasets, registered in this order (DICOM folders last).
BUILTIN_DATASET_MODULES = (
    "federation.data.synthetic",
    "federation.data.medmnist",
    "federation.data.heart",
    "federation.data.medmnist3d",
    "federation.data.synthetic_seg",
    "federation.data.msd",
    "federation.data.nifti",
    "federation.data.dicom.dataset",
)
_builtins_lock = threading.RLock()
_builtins_for: dict[str, _Entry] | None = None  # the registry the built-ins were put in
_builtins_loading = False


def _ensure_builtin_datasets() -> None:
    """Register the built-in datasets once, before any lookup or user registration.

    A user's ``register_dataset(name, ..., replace=True)`` therefore always wins over
    a built-in of the same name. Re-entrant: the built-ins' own registration calls
    come back here while they load.
    """
    global _builtins_for, _builtins_loading
    if _builtins_for is _REGISTRY:
        return
    with _builtins_lock:
        if _builtins_for is _REGISTRY or _builtins_loading:
            return
        _builtins_loading = True
        try:
            for module in BUILTIN_DATASET_MODULES:
                importlib.import_module(module)._register()
            _builtins_for = _REGISTRY
        finally:
            _builtins_loading = False


def register_dataset(
    name: str,
    loader: DatasetLoader,
    *,
    site_shift_strength: float = 0.0,
    info: DatasetInfo | None = None,
    site_only: DeclaredInfo | None = None,
    tasks: tuple[str, ...] = ("classification",),
    replace: bool = False,
) -> None:
    """Register a dataset loader under ``name``.

    Args:
        name: Name used in ``data.dataset`` (lower case letters, digits, ``_`` and ``-``).
        loader: ``loader(*, config, data_dir, seed) -> DatasetSplits`` returning the
            full dataset at its native image size; subsetting and resizing are done
            by :func:`load_dataset`.
        site_shift_strength: Strength of the per-site acquisition shift that
            :func:`federation.data.load_site_data` applies (0 = none).
        info: Channels and classes, when fixed for the dataset, so a coordinator
            without the data can still build the model (:func:`dataset_info`).
        site_only: For data that exists only at the sites (each hospital's own folder,
            nothing pooled at the coordinator): ``declared(config) -> DatasetInfo`` reads
            the model's channels and classes from the run config, or returns the
            problems naming the keys to set. Such runs never load data on the
            coordinator, and a site whose data disagrees refuses (:func:`check_site_data`).
        tasks: The ``data.task`` values it serves (segmentation needs masks in its splits).
        replace: Allow replacing an existing registration.

    Raises:
        ValueError: If the name is malformed, already registered (and ``replace`` is
            false) or the strength is negative.
    """
    _ensure_builtin_datasets()
    check_new_name("dataset", name, _REGISTRY, replace=replace)
    if site_shift_strength < 0:
        raise ValueError(f"site_shift_strength for '{name}' must be >= 0, got {site_shift_strength}")
    if site_only is not None and info is not None:
        raise ValueError(f"dataset '{name}': give either info (fixed shape) or site_only (shape from the config)")
    _REGISTRY[name] = _Entry(loader=loader, site_shift_strength=float(site_shift_strength), info=info,
                             declared=site_only, tasks=tuple(tasks))
    clear_dataset_cache()


def available_datasets() -> list[str]:
    """Return the registered dataset names, sorted."""
    _ensure_builtin_datasets()
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    _ensure_builtin_datasets()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name("dataset", key="data.dataset", name=name, valid=available_datasets()) from None


def check_dataset_task(config: DataConfig) -> None:
    """Raise ValueError unless ``config.dataset`` serves ``config.task`` (naming the tasks it serves)."""
    tasks = _entry(config.dataset).tasks
    if config.task not in tasks:
        fits = [n for n in available_datasets() if config.task in _REGISTRY[n].tasks]
        raise ValueError(f"data.dataset={config.dataset!r} serves data.task {', '.join(tasks)}; "
                         f"got data.task={config.task!r} (datasets for {config.task}: {', '.join(fits) or 'none'})")


def is_site_only(name: str) -> bool:
    """Whether dataset ``name`` exists only at the sites (its shape comes from the run config).

    Raises:
        ValueError: If the dataset is unknown.
    """
    return _entry(name).declared is not None


def declared_info_problems(config: DataConfig) -> list[str]:
    """What a run of a site-only dataset must still set (each naming its key); [] otherwise.

    An unknown dataset name gives no problem here (the name check reports it).
    """
    try:
        entry = _entry(config.dataset)
    except ValueError:
        return []
    if entry.declared is None:
        return []
    declared = entry.declared(config)
    return declared if isinstance(declared, list) else []


def dataset_info(config: DataConfig, *, seed: int = 0) -> DatasetInfo:
    """Channels and classes of ``config.dataset``, loading the data only if they are not registered.

    The coordinator uses this to build the global model: in a deployment it usually
    holds no patient data at all. Site-only datasets take them from the run config.

    Raises:
        ValueError: A site-only dataset's run config lacks them (the message names the keys).
    """
    entry = _entry(config.dataset)
    check_dataset_task(config)
    if entry.info is not None:
        return entry.info
    if entry.declared is not None:
        declared = entry.declared(config)
        if isinstance(declared, list):
            raise ValueError("; ".join(declared))
        return declared
    splits = load_dataset(config, seed=seed)
    return DatasetInfo(
        in_channels=splits.in_channels, num_classes=splits.num_classes, spatial_dims=splits.spatial_dims
    )


def check_site_data(config: DataConfig, splits: DatasetSplits) -> None:
    """Raise :class:`DataMismatch` when a site's data disagrees with its site-only dataset's declared shape.

    Compares channels, classes and image size with what the run config declares, and
    requires every declared class in the site's data. Datasets that are not site-only
    pass unchecked (the model is built from the same data everywhere).
    """
    entry = _entry(config.dataset)
    if entry.declared is None:
        return
    declared = entry.declared(config)
    if isinstance(declared, list):
        raise DataMismatch("the run config does not declare the data's shape: " + "; ".join(declared))
    if splits.in_channels != declared.in_channels:
        raise DataMismatch(f"the site's images have {splits.in_channels} channel(s), the run declares "
                           f"{declared.in_channels}")
    if splits.num_classes != declared.num_classes:
        raise DataMismatch(f"the site's labels give {splits.num_classes} classes, the run declares "
                           f"{declared.num_classes}")
    sized = splits.train_masks is None  # segmentation volumes take their shape from data.volume_shape instead
    if splits.spatial_dims != declared.spatial_dims or (sized and splits.spatial_dims
                                                        and splits.image_size != config.image_size):
        raise DataMismatch(f"the site's images are {splits.image_size} px ({splits.spatial_dims}-D), the run "
                           f"declares data.image_size={config.image_size} ({declared.spatial_dims}-D)")
    present = np.union1d(np.unique(splits.train_labels), np.unique(splits.test_labels))
    if splits.train_masks is not None and splits.test_masks is not None:  # the classes of the label maps
        present = np.union1d(np.unique(splits.train_masks), np.unique(splits.test_masks))
    missing = [int(c) for c in range(declared.num_classes) if c not in present]
    if missing:
        raise DataMismatch(f"the site holds no image of declared class(es) {', '.join(map(str, missing))} "
                           f"(0-based, of {declared.num_classes})")


def site_shift_strength(name: str) -> float:
    """Return the per-site acquisition-shift strength registered for a dataset.

    Args:
        name: A registered dataset name.

    Raises:
        ValueError: If the dataset is unknown.
    """
    return _entry(name).site_shift_strength


def load_dataset(config: DataConfig, *, seed: int) -> DatasetSplits:
    """Load (or reuse from the process cache) the dataset a config names.

    Args:
        config: The ``data`` section; ``dataset``, ``data_dir``, ``download``,
            ``num_samples``, ``image_size`` and ``max_*_samples`` are used.
        seed: Experiment seed (generation of synthetic data and subset choice).

    Returns:
        The dataset with read-only arrays, shared by all callers with the same key.

    Raises:
        ValueError: Unknown dataset name or bad data.
        FileNotFoundError: A dataset file is missing and ``data.download`` is false.
    """
    check_dataset_task(config)  # fail fast with the list of names, or the tasks the dataset serves
    # Sites and server derive their data from the same section; the key is that
    # section (with the folder resolved), so every dataset setting is honoured.
    resolved = config.model_copy(update={"data_dir": str(resolve_data_dir(config.data_dir))})
    return _load_cached(resolved.model_dump_json(), int(seed))


def clear_dataset_cache() -> None:
    """Forget every dataset cached by :func:`load_dataset` in this process."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=8)
def _load_cached(config_json: str, seed: int) -> DatasetSplits:
    config = DataConfig.model_validate_json(config_json)
    entry = _entry(config.dataset)
    raw = entry.loader(config=config, data_dir=Path(config.data_dir), seed=seed)
    if not isinstance(raw, DatasetSplits):
        raise TypeError(f"loader of dataset '{config.dataset}' returned {type(raw).__name__}, expected DatasetSplits")

    train_images, train_labels = raw.train_images, raw.train_labels
    test_images, test_labels = raw.test_images, raw.test_labels
    train_sites, test_sites = raw.train_sites, raw.test_sites
    train_masks, test_masks = raw.train_masks, raw.test_masks
    test_groups = dict(raw.test_groups) if raw.test_groups else None
    if 0 < config.max_train_samples < len(train_labels):
        idx = stratified_subset(train_labels, n=config.max_train_samples, seed=_derive_seed(seed, 11))
        train_images, train_labels = train_images[idx], train_labels[idx]
        train_sites = train_sites[idx] if train_sites is not None else None
        train_masks = train_masks[idx] if train_masks is not None else None
    if config.public_fraction > 0:  # data declared public: held out of every site (medfed pretrain trains on it)
        public = public_indices(train_labels, fraction=config.public_fraction, seed=seed)
        keep = np.setdiff1d(np.arange(len(train_labels)), public)
        train_images, train_labels = train_images[keep], train_labels[keep]
        train_sites = train_sites[keep] if train_sites is not None else None
        train_masks = train_masks[keep] if train_masks is not None else None
    if 0 < config.max_test_samples < len(test_labels):
        idx = stratified_subset(test_labels, n=config.max_test_samples, seed=_derive_seed(seed, 12))
        test_images, test_labels = test_images[idx], test_labels[idx]
        test_sites = test_sites[idx] if test_sites is not None else None
        test_masks = test_masks[idx] if test_masks is not None else None
        test_groups = {k: np.asarray(v)[idx] for k, v in test_groups.items()} if test_groups else None
    val_images = raw.val_images
    # Datasets with masks come at their final shape (data.image_size / data.volume_shape): no resize.
    if raw.spatial_dims and raw.image_size != config.image_size and train_masks is None:
        train_images = resize_images(train_images, size=config.image_size)
        test_images = resize_images(test_images, size=config.image_size)
        if val_images is not None:
            val_images = resize_images(val_images, size=config.image_size)

    arrays = [train_images, train_labels, test_images, test_labels, val_images, raw.val_labels, train_masks, test_masks]
    for i, array in enumerate(arrays):
        if array is not None:
            array = np.ascontiguousarray(array)
            array.setflags(write=False)
            arrays[i] = array
    splits = DatasetSplits(
        name=raw.name,
        train_images=arrays[0],
        train_labels=arrays[1],
        test_images=arrays[2],
        test_labels=arrays[3],
        num_classes=raw.num_classes,
        in_channels=raw.in_channels,
        md5=raw.md5,
        label_names=raw.label_names,
        val_images=arrays[4],
        val_labels=arrays[5],
        test_groups=test_groups,
        train_sites=train_sites,
        test_sites=test_sites,
        site_names=raw.site_names,
        train_masks=arrays[6],
        test_masks=arrays[7],
    )
    logger.info(
        "dataset %s: %d train / %d test samples, %d classes, shape %s",
        splits.name,
        len(splits.train_labels),
        len(splits.test_labels),
        splits.num_classes,
        "x".join(str(d) for d in splits.train_images.shape[1:]),
    )
    return splits


def _derive_seed(seed: int, stream: int) -> int:
    """Derive an independent 63-bit seed from ``seed`` for a numbered purpose."""
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def public_indices(labels: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """The training indices ``data.public_fraction`` declares public (stratified, seeded; before the split to sites).

    Args:
        labels: The pooled training labels (after ``data.max_train_samples``).
        fraction: ``data.public_fraction``, in (0, 1).
        seed: Experiment seed.
    """
    n = min(len(labels) - 1, max(1, round(fraction * len(labels))))
    return stratified_subset(labels, n=n, seed=_derive_seed(seed, 13))


def stratified_subset(labels: np.ndarray, *, n: int, seed: int) -> np.ndarray:
    """Choose ``n`` indices at random, keeping class proportions (largest remainder).

    Every class present keeps at least one sample when ``n`` allows it.

    Args:
        labels: Integer labels, shape ``(N,)``.
        n: Number of indices to keep, ``1 <= n <= N``.
        seed: Seed of the random choice.

    Returns:
        Sorted ``int64`` indices into ``labels``.

    Raises:
        ValueError: If ``n`` is out of range.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if not 1 <= n <= total:
        raise ValueError(f"subset size must be in [1, {total}], got {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / total
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - int(quota.sum())]] += 1
    if n >= len(classes):
        while (quota == 0).any():
            quota[np.argmax(quota)] -= 1
            quota[np.flatnonzero(quota == 0)[0]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False) for c, q in zip(classes, quota) if q
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def resize_images(images: np.ndarray, *, size: int) -> np.ndarray:
    """Resize ``(N, C, H, W)`` images to ``size x size`` (bilinear, antialiased), or volumes.

    ``(N, C, D, H, W)`` volumes become ``size`` cubed (trilinear; torch has no
    antialiased 3-D resize).

    Args:
        images: Float images (or volumes) in ``[0, 1]``.
        size: Output side length.

    Returns:
        A new float32 array ``(N, C, size, ...)`` clipped to ``[0, 1]``.
    """
    n, c = images.shape[:2]
    dims = images.ndim - 2
    if dims not in (2, 3):
        raise ValueError(f"resize_images expects (N, C, H, W) or (N, C, D, H, W), got shape {images.shape}")
    shape = (size,) * dims
    out = np.empty((n, c, *shape), dtype=np.float32)
    step = max(1, _RESIZE_CHUNK_PIXELS // (c * size**dims))
    for start in range(0, n, step):
        chunk = torch.from_numpy(np.array(images[start : start + step], dtype=np.float32))
        if dims == 2:
            resized = F.interpolate(chunk, size=shape, mode="bilinear", antialias=True, align_corners=False)
        else:
            resized = F.interpolate(chunk, size=shape, mode="trilinear", align_corners=False)
        out[start : start + step] = resized.clamp_(0.0, 1.0).numpy()
    return out
