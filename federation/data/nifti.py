"""NIfTI segmentation folders in the MSD/nnU-Net layout, read with MONAI, checked case by case.

A folder holds ``imagesTr/<case>.nii.gz`` and ``labelsTr/<case>.nii.gz`` (same file
name; nnU-Net's ``<case>_0000.nii.gz`` image names are accepted) and optionally a
``dataset.json`` whose ``labels`` name the classes. Instead of the two folders a site
may list its cases in a CSV (:data:`CASES_CSV` in the folder, or the CSV file itself
as the data dir) with columns ``image`` and ``label`` (paths relative to the CSV's
folder, or absolute) and optionally ``case`` (:func:`csv_cases`). Every case is read with MONAI's
:class:`~monai.transforms.LoadImage` (nibabel) and checked like a DICOM folder is:
an unreadable file, a missing label, an image/label shape or affine mismatch, label
values outside the declared classes, or an empty label map (no foreground) sets the
case aside with its reason named in the log; the rest are kept
(:func:`check_nifti_cases`). Kept volumes are padded/cropped (centred) to one shape
with MONAI's :class:`~monai.transforms.ResizeWithPadOrCrop` (``data.volume_shape``,
default :data:`DEFAULT_VOLUME_SHAPE`) and their intensities scaled per volume to
``[0, 1]`` between the 0.5th and 99.5th percentile.

Registered datasets: ``nifti`` - a hospital's own folder (``data.data_dir`` at each
site; classes from ``data.nifti_label_names``, site-only like ``dicom``) - and, in
:mod:`federation.data.msd`, ``msd_hippocampus``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from federation.config.schema import DataConfig, parse_volume_shape
from federation.data.registry import DatasetInfo, DatasetSplits, _derive_seed, register_dataset

logger = logging.getLogger(__name__)

DEFAULT_VOLUME_SHAPE = (40, 56, 40)
"""Volume shape when ``data.volume_shape`` is empty (sides divisible by 8, the UNet's depth)."""
AFFINE_TOLERANCE = 1e-3
"""Largest absolute difference between an image's and its label's affine entries (mm)."""
_SPLIT_STREAM = 401
Case = tuple[str, Path, Path | None]
"""``(case name, image path, label path)``; no label path when a cases CSV lists none."""
CASES_CSV = "cases.csv"
"""A site folder's list of cases (columns ``image``, ``label``, optional ``case``) when it has no ``imagesTr``."""


@dataclass
class NiftiCases:
    """The cases of a folder that passed the checks, and those set aside with the reason.

    Attributes:
        names: Case names kept, in order.
        images: float32 ``(N, 1, *shape)`` in ``[0, 1]``.
        masks: uint8 ``(N, 1, *shape)``.
        set_aside: Case name -> why it was not used.
    """

    names: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    set_aside: dict[str, str] = field(default_factory=dict)


def volume_shape(config: DataConfig) -> tuple[int, int, int]:
    """``data.volume_shape`` as three sides, or :data:`DEFAULT_VOLUME_SHAPE` when empty."""
    return parse_volume_shape(config.volume_shape) if config.volume_shape.strip() else DEFAULT_VOLUME_SHAPE  # type: ignore[return-value]


def folder_cases(folder: Path) -> list[Case]:
    """``(case, image, label)`` of every image in ``folder/imagesTr`` (the label path may not exist).

    Raises:
        FileNotFoundError: No ``imagesTr`` folder, or no ``.nii``/``.nii.gz`` image in it.
    """
    images_dir = folder / "imagesTr"
    images = sorted(p for p in images_dir.glob("*.nii*") if not p.name.startswith("."))
    if not images:
        raise FileNotFoundError(f"{images_dir}: no .nii/.nii.gz images (expected the MSD/nnU-Net layout "
                                f"imagesTr/<case>.nii.gz + labelsTr/<case>.nii.gz, or a {CASES_CSV} with "
                                "columns image,label)")
    cases = []
    for image in images:
        name = image.name.split(".nii")[0]
        case = name[:-5] if name.endswith("_0000") else name  # nnU-Net's channel suffix
        cases.append((case, image, folder / "labelsTr" / f"{case}{image.name[len(name):]}"))
    return cases


def volume_transforms(shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """MONAI's reader, pad/crop and intensity scaling of training (``medfed predict`` inverts the pad/crop).

    Returns:
        ``(load, fit, scale)``: :class:`~monai.transforms.LoadImage` (nibabel, channel first),
        :class:`~monai.transforms.ResizeWithPadOrCrop` to ``shape`` (centred, invertible) and
        :class:`~monai.transforms.ScaleIntensityRangePercentiles` (0.5-99.5th percentile to [0, 1]).
    """
    from monai.transforms import LoadImage, ResizeWithPadOrCrop, ScaleIntensityRangePercentiles  # noqa: PLC0415

    return (LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader"),
            ResizeWithPadOrCrop(spatial_size=shape),
            ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True))


def csv_cases(path: Path) -> list[Case]:
    """``(case, image, label)`` of every row of a cases CSV (see the module docstring); ``None``: no label listed.

    Raises:
        ValueError: The CSV lacks an ``image`` or ``label`` column, has no row, a row without
            an image, or a case name twice (named with the file and row).
    """
    import csv  # noqa: PLC0415

    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("image", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {' or '.join(missing)} (expected columns image,label[,case]; "
                             f"found {', '.join(reader.fieldnames or []) or 'none'})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no case listed (one row per case: image,label[,case])")
    cases: list[Case] = []
    for number, row in enumerate(rows, start=2):
        image = (row.get("image") or "").strip()
        if not image:
            raise ValueError(f"{path}, row {number}: empty image path")
        case = (row.get("case") or "").strip() or Path(image).name.split(".nii")[0]
        if any(case == c for c, _, _ in cases):
            raise ValueError(f"{path}, row {number}: case {case!r} is listed twice; give each row its own case name")
        label = (row.get("label") or "").strip()
        cases.append((case, path.parent / image, path.parent / label if label else None))
    return cases


def site_cases(path: Path) -> list[Case]:
    """The cases of a NIfTI site: a cases CSV file, a folder with ``imagesTr/``, or a folder with :data:`CASES_CSV`.

    Raises:
        FileNotFoundError: None of these (the message names all three layouts).
    """
    if path.is_file() and path.suffix.lower() == ".csv":
        return csv_cases(path)
    if not (path / "imagesTr").is_dir() and (path / CASES_CSV).is_file():
        return csv_cases(path / CASES_CSV)
    return folder_cases(path)


def is_nifti_site(path: Path) -> bool:
    """Whether ``path`` looks like a NIfTI site (``imagesTr/``, :data:`CASES_CSV`, or a ``.csv`` file)."""
    return (path / "imagesTr").is_dir() or (path / CASES_CSV).is_file() or (
        path.is_file() and path.suffix.lower() == ".csv")


def _problem(image: np.ndarray, label: np.ndarray, image_affine: np.ndarray, label_affine: np.ndarray,
             num_classes: int) -> str | None:
    """Why an image/label pair may not be used, or None."""
    if image.shape[1:] != label.shape[1:]:
        return f"image shape {tuple(image.shape[1:])} differs from label shape {tuple(label.shape[1:])}"
    if not np.allclose(image_affine, label_affine, atol=AFFINE_TOLERANCE):
        return "image and label affines differ (not on the same voxel grid)"
    if label.shape[0] != 1 or image.shape[0] != 1:
        return f"expected one channel, image has {image.shape[0]}, label {label.shape[0]}"
    values = np.unique(label)
    if np.any(values != np.round(values)) or values.min() < 0 or values.max() >= num_classes:
        bad = [v for v in values.tolist() if v != round(v) or not 0 <= v < num_classes][:5]
        return f"label values {bad} are outside the declared classes 0..{num_classes - 1}"
    if values.max() == 0:
        return "empty label (no foreground voxel)"
    return None


def check_nifti_cases(
    cases: Sequence[Case], *, num_classes: int, shape: tuple[int, ...]
) -> NiftiCases:
    """Read and check every case; keep the good ones padded/cropped to ``shape`` and scaled to ``[0, 1]``.

    Args:
        cases: ``(case, image path, label path or None when none is listed)``.
        num_classes: Declared classes including background (label values ``0 .. num_classes - 1``).
        shape: Spatial shape every kept volume is padded/cropped to.
    """
    load, fit, scale = volume_transforms(shape)
    out = NiftiCases()
    for case, image_path, label_path in cases:
        if not image_path.is_file():
            out.set_aside[case] = f"no image file {image_path}"
            continue
        if label_path is None:
            out.set_aside[case] = "no label listed"
            continue
        if not label_path.is_file():
            out.set_aside[case] = f"no label file {label_path.name} in {label_path.parent.name}"
            continue
        try:
            image, label = load(str(image_path)), load(str(label_path))
        except Exception as err:  # noqa: BLE001 - any reader failure sets the case aside, named
            out.set_aside[case] = f"unreadable ({type(err).__name__})"
            continue
        problem = _problem(np.asarray(image), np.asarray(label), np.asarray(image.affine),
                           np.asarray(label.affine), num_classes)
        if problem is not None:
            out.set_aside[case] = problem
            continue
        out.names.append(case)
        out.images.append(np.asarray(scale(fit(image)), dtype=np.float32))
        out.masks.append(np.asarray(fit(label), dtype=np.uint8))
    for case, reason in out.set_aside.items():
        logger.warning("NIfTI case %s set aside: %s", case, reason)
    return out


def split_cases(
    cases: NiftiCases, *, name: str, label_names: tuple[str, ...], test_fraction: float, seed: int
) -> DatasetSplits:
    """A :class:`DatasetSplits` of the kept cases, ``test_fraction`` of them held out (at least one each side).

    Each case's label (its stratum for partitioning) is the largest class in its mask.

    Raises:
        ValueError: Fewer than two cases were kept.
    """
    n = len(cases.names)
    if n < 2:
        raise ValueError(f"dataset '{name}': {n} usable case(s) (need >= 2); set aside: {cases.set_aside}")
    images, masks = np.stack(cases.images), np.stack(cases.masks)
    strata = masks.reshape(n, -1).max(axis=1).astype(np.int64)
    order = np.random.default_rng(_derive_seed(seed, _SPLIT_STREAM)).permutation(n)
    n_test = min(n - 1, max(1, int(round(test_fraction * n))))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return DatasetSplits(
        name=name, train_images=images[train], train_labels=strata[train], test_images=images[test],
        test_labels=strata[test], num_classes=len(label_names), in_channels=1, md5=None,
        label_names=label_names, train_masks=masks[train], test_masks=masks[test],
    )


def label_names_of(folder: Path, config: DataConfig) -> tuple[str, ...]:
    """Class names: ``data.nifti_label_names``, else the folder's ``dataset.json`` ``labels``.

    Raises:
        ValueError: Neither gives at least two classes.
    """
    if config.nifti_label_names.strip():
        names = tuple(n.strip() for n in config.nifti_label_names.split(",") if n.strip())
    elif (folder / "dataset.json").is_file():
        labels = json.loads((folder / "dataset.json").read_text()).get("labels", {})
        names = tuple(str(labels[k]) for k in sorted(labels, key=int))
    else:
        names = ()
    if len(names) < 2:
        raise ValueError(f"{folder}: declare the classes in label order with data.nifti_label_names "
                         "(medfed site check: --label-names), e.g. 'background,lesion', or add a dataset.json "
                         "with 'labels'; at least two classes are needed")
    return names


def load_nifti_folder(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits:
    """Registry loader of ``nifti``: the site's folder ``data_dir`` (see the module docstring)."""
    names = label_names_of(data_dir if data_dir.is_dir() else data_dir.parent, config)
    cases = check_nifti_cases(site_cases(data_dir), num_classes=len(names), shape=volume_shape(config))
    logger.info("NIfTI folder: %d case(s) kept, %d set aside", len(cases.names), len(cases.set_aside))
    return split_cases(cases, name="nifti", label_names=names, test_fraction=config.nifti_test_fraction, seed=seed)


def declared_nifti_info(config: DataConfig) -> DatasetInfo | list[str]:
    """The model's shape for a ``nifti`` run, from the run config (the coordinator holds no data)."""
    names = [n for n in config.nifti_label_names.split(",") if n.strip()]
    if len(names) < 2:
        return ["data.nifti_label_names: a nifti run must declare its classes in label order "
                "(e.g. 'background,anterior,posterior')"]
    return DatasetInfo(in_channels=1, num_classes=len(names), spatial_dims=3)


def _register() -> None:
    register_dataset("nifti", load_nifti_folder, site_only=declared_nifti_info, tasks=("segmentation",),
                     replace=True)


def check_nifti_folder(folder: Path, *, label_names: tuple[str, ...] = ()) -> tuple[NiftiCases, tuple[str, ...]]:
    """What ``medfed site check`` reports for a NIfTI folder: the cases kept and those set aside, and the classes.

    Args:
        folder: The site folder (``imagesTr/`` + ``labelsTr/``, or :data:`CASES_CSV`) or a cases CSV.
        label_names: Class names in label order; empty = the folder's ``dataset.json``.

    Raises:
        FileNotFoundError: No images in ``folder/imagesTr``.
        ValueError: No class names given or found.
    """
    names = label_names or label_names_of(folder if folder.is_dir() else folder.parent, DataConfig())
    if len(names) < 2:
        raise ValueError(f"{folder}: at least two classes are needed, got {names}")
    return check_nifti_cases(site_cases(folder), num_classes=len(names), shape=DEFAULT_VOLUME_SHAPE), names


def render_nifti_report(cases: NiftiCases, *, label_names: tuple[str, ...], max_rows: int = 50) -> str:
    """A plain-text report of :func:`check_nifti_folder`: counts, then every case set aside with its reason."""
    lines = [f"NIfTI cases usable: {len(cases.names)}; set aside: {len(cases.set_aside)}; "
             f"classes: {', '.join(f'{k} {n}' for k, n in enumerate(label_names))}"]
    for case, reason in list(sorted(cases.set_aside.items()))[:max_rows]:
        lines.append(f"  set aside {case}: {reason}")
    if len(cases.set_aside) > max_rows:
        lines.append(f"  ... and {len(cases.set_aside) - max_rows} more")
    return "\n".join(lines)
