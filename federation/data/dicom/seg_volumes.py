"""The ``dicom_seg`` dataset: a site's DICOM series as 3-D volumes with DICOM SEG label maps, for segmentation.

Each image series (:mod:`federation.data.dicom.series`) is one case; its label map comes
from a DICOM Segmentation object in the site folder that references the series
(Referenced Series Sequence), read with highdicom and aligned slice by slice through the
source SOP Instance UIDs (segment number k = class k; overlaps: the higher segment). A
series without a SEG, or whose SEG does not cover it, is set aside with its reason. Images
are min-max scaled and resampled (trilinear) and label maps resampled (nearest) to
``data.volume_shape``. The run declares the classes in ``data.dicom_label_names``
(background first) and ``data.dicom_channels=1``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from federation.data.dicom.dataset import DicomSettings, declared_dicom_info, split_by_group
from federation.data.dicom.index import scan_files
from federation.data.dicom.series import SeriesProblem, Volume, read_series, to_unit_cube
from federation.data.registry import DatasetInfo, DatasetSplits, register_dataset

logger = logging.getLogger(__name__)


def _segmentations(files: list[Path]) -> tuple[dict[str, Any], list[SeriesProblem]]:
    """Series Instance UID -> the (first) highdicom SEG referencing it; unreadable SEGs as problems."""
    import pydicom  # noqa: PLC0415
    from highdicom.seg import Segmentation  # noqa: PLC0415

    found: dict[str, Any] = {}
    problems = []
    for path in files:
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # noqa: BLE001 - not DICOM: read_series skips it too
            continue
        if str(head.get("Modality", "")).upper() != "SEG":
            continue
        try:
            seg = Segmentation.from_dataset(pydicom.dcmread(path))
            for ref in seg.ReferencedSeriesSequence:
                found.setdefault(str(ref.SeriesInstanceUID), seg)
        except Exception as exc:  # noqa: BLE001 - a broken SEG sets its series aside (below)
            problems.append(SeriesProblem(f"(SEG {path.name})", "unreadable", f"{type(exc).__name__}: {exc}"[:200], 1))
    return found, problems


def label_map(volume: Volume, seg: Any, *, num_classes: int) -> np.ndarray:
    """The SEG's label map on the volume's slices, ``uint8 (D, H, W)``; raises ``ValueError`` when it cannot be."""
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids), combine_segments=True, skip_overlap_checks=True,
    )
    masks = np.asarray(masks)
    if masks.shape != volume.voxels.shape:
        raise ValueError(f"label map {masks.shape} does not match the series {volume.voxels.shape}")
    if masks.max(initial=0) >= num_classes:
        raise ValueError(f"segment {int(masks.max())} has no declared class (data.dicom_label_names has "
                         f"{num_classes} incl. background)")
    return masks.astype(np.uint8)


def _resample_mask(mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415, N812

    out = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=shape, mode="nearest")
    return out[0, 0].numpy().astype(np.uint8)


def load_seg_cases(data_dir: Path, *, num_classes: int, shape: tuple[int, int, int], key_patient: Any = None,
                   ) -> tuple[np.ndarray, np.ndarray, list[str], list[SeriesProblem]]:
    """Images ``(N, 1, *shape)`` float32, masks ``(N, 1, *shape)`` uint8, groups and problems of a site folder."""
    root = Path(data_dir).expanduser().resolve()
    files = [path for _, path, _ in scan_files(root)]
    volumes, problems = read_series(files, root=root, key_patient=key_patient)
    segs, seg_problems = _segmentations(files)
    problems += seg_problems
    images, masks, groups = [], [], []
    for vol in volumes:
        seg = segs.get(vol.series_instance_uid)
        if seg is None:
            problems.append(SeriesProblem(vol.series_instance_uid, "unlabeled", "no DICOM SEG references it",
                                          len(vol.sources)))
            continue
        try:
            mask = label_map(vol, seg, num_classes=num_classes)
        except Exception as exc:  # noqa: BLE001 - a SEG that does not fit sets the series aside
            problems.append(SeriesProblem(vol.series_instance_uid, "bad_label", f"{type(exc).__name__}: {exc}"[:200],
                                          len(vol.sources)))
            continue
        images.append(to_unit_cube(vol, shape=shape)[None])
        masks.append(_resample_mask(mask, shape)[None])
        groups.append(vol.patient_key or vol.study_instance_uid or vol.series_instance_uid)
    empty = (0, 1, *shape)
    return (np.stack(images) if images else np.zeros(empty, np.float32),
            np.stack(masks) if masks else np.zeros(empty, np.uint8), groups, problems)


def load_dicom_seg_splits(*, config: Any, data_dir: Path, seed: int) -> DatasetSplits:
    """Registry loader of ``dicom_seg``: the site's segmented series as a patient-level train/test split.

    Raises:
        ValueError: Fewer than two usable cases (the message counts the reasons), or no declared classes.
    """
    from federation.data.dicom.volumes import _patient_keys, _site_salt  # noqa: PLC0415
    from federation.data.nifti import volume_shape  # noqa: PLC0415

    settings = DicomSettings.from_config(config)
    names = settings.label_names
    if len(names) < 2:
        raise ValueError("data.dicom_label_names: declare the classes in segment order, background first "
                         "(e.g. background,lesion)")
    salt_file = str(getattr(settings, "patient_salt_file", "") or "")
    keys = _patient_keys(_site_salt(salt_file) if salt_file else b"")
    images, masks, groups, problems = load_seg_cases(Path(data_dir), num_classes=len(names),
                                                     shape=volume_shape(config), key_patient=keys)
    reasons: dict[str, int] = {}
    for problem in problems:
        reasons[problem.reason] = reasons.get(problem.reason, 0) + 1
        logger.warning("series %s set aside (%s): %s", problem.series_instance_uid, problem.reason, problem.detail)
    if len(images) < 2:
        raise ValueError(f"{len(images)} usable segmented DICOM series in {data_dir} (need >= 2; set aside: {reasons})")
    strata = masks.reshape(len(masks), -1).max(axis=1).astype(np.int64)
    train, test = split_by_group(strata, groups, test_fraction=float(settings.test_fraction), seed=seed)
    return DatasetSplits(
        name="dicom_seg", train_images=images[train], train_labels=strata[train], test_images=images[test],
        test_labels=strata[test], num_classes=len(names), in_channels=1, md5=None, label_names=tuple(names),
        train_masks=masks[train], test_masks=masks[test],
    )


def declared_seg_info(config: Any) -> DatasetInfo | list[str]:
    """The model shape a ``dicom_seg`` run declares: its classes (background first), 1 channel, 3-D."""
    info = declared_dicom_info(config)
    if isinstance(info, list):
        return info
    return DatasetInfo(in_channels=1, num_classes=info.num_classes, spatial_dims=3)


def _register() -> None:
    register_dataset("dicom_seg", load_dicom_seg_splits, site_only=declared_seg_info, tasks=("segmentation",),
                     replace=True)
