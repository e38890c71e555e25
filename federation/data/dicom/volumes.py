"""The ``dicom_volume`` dataset: a site's DICOM series as 3-D volumes for a 3-D model.

Each series (:mod:`federation.data.dicom.series`) is one sample, labelled by its Series
Instance UID (else its Study Instance UID) in the site's labels CSV (column
``series_instance_uid`` unless ``data.dicom_key_column`` names another), min-max scaled
to ``[0, 1]`` and resampled to ``data.image_size`` on every side; the labels CSV must lie
inside the site folder. Broken series (missing
or duplicated slices, mixed orientation, spacing or sizes) are set aside with their
reason, as bad files are for 2-D sites. Like ``dicom``, the data exists only at the
sites: the run declares ``data.dicom_label_names`` and ``data.dicom_channels=1``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from federation.data.dicom.dataset import DicomSettings, declared_dicom_info, split_by_group
from federation.data.dicom.index import scan_files
from federation.data.dicom.labels import DEFAULT_KEY_COLUMN, read_labels
from federation.data.dicom.series import SeriesProblem, Volume, read_series, to_unit_cube
from federation.data.registry import DataMismatch, DatasetInfo, DatasetSplits, register_dataset

logger = logging.getLogger(__name__)

SERIES_KEY_COLUMN = "series_instance_uid"
"""Default labels-CSV key column of volume sites (a Series, else Study, Instance UID)."""


def _patient_keys(salt: bytes) -> Callable[[str], str]:
    """PatientID -> the site's key of it (HMAC with its salt where the site has one)."""
    try:
        from federation.data.dicom.confine import patient_key  # noqa: PLC0415
    except ImportError:  # before the salted keys: the index's plain hash
        return lambda pid: hashlib.sha256(pid.encode()).hexdigest()[:16] if pid else ""
    return lambda pid: patient_key(pid, salt=salt)


def _site_salt(path: str) -> bytes:
    from federation.data.dicom.confine import site_salt  # noqa: PLC0415

    return site_salt(path)


def label_volumes(volumes: list[Volume], labels: dict[str, str], encode: Any) -> tuple[list[Volume], list[int],
                                                                                      list[SeriesProblem]]:
    """Label each volume by its series UID, else its study UID; unlabelled ones become problems."""
    kept, targets, problems = [], [], []
    for vol in volumes:
        value = labels.get(vol.series_instance_uid, labels.get(vol.study_instance_uid))
        label = encode(value) if value is not None else None
        if label is None:
            why = "no row in the labels CSV" if value is None else f"label {value!r} is not a declared class"
            problems.append(SeriesProblem(vol.series_instance_uid, "unlabeled", why, len(vol.sources)))
            continue
        kept.append(vol)
        targets.append(int(label))
    return kept, targets, problems


def volume_subgroups(volumes: list[Volume]) -> dict[str, np.ndarray]:
    """Sex codes (:data:`SEX_CODES`, -1 unknown) and ages (-1 unknown) of the volumes, for subgroup evaluation."""
    from federation.data.dicom.loader import SEX_CODES  # noqa: PLC0415

    return {"sex": np.asarray([SEX_CODES.get(v.patient_sex, -1) for v in volumes], dtype=np.int64),
            "age": np.asarray([v.patient_age for v in volumes], dtype=np.int64)}


def load_volume_site(data_dir: Path, *, settings: DicomSettings, size: int, patient_salt: bytes = b"",
                     ) -> tuple[np.ndarray, np.ndarray, list[str], list[SeriesProblem], dict[str, np.ndarray]]:
    """A site folder's labelled series as ``float32 (N, 1, size, size, size)``, labels, split groups, problems
    and the subgroup attributes of the kept series (:func:`volume_subgroups`)."""
    root = Path(data_dir).expanduser().resolve()
    labels_csv = Path(settings.labels).expanduser()
    labels_csv = (labels_csv if labels_csv.is_absolute() else root / labels_csv).resolve()
    if not labels_csv.is_relative_to(root):  # the run config names it: never a file outside the site folder
        raise ValueError(f"data.dicom_labels {settings.labels!r} resolves outside the site folder {root}")
    key = SERIES_KEY_COLUMN if settings.key_column == DEFAULT_KEY_COLUMN else settings.key_column
    table = read_labels(labels_csv, key_column=key, label_column=settings.label_column,
                        label_names=settings.label_names or None)
    files = [path for _, path, _ in scan_files(root, exclude=frozenset({labels_csv.resolve()}))]
    volumes, problems = read_series(files, root=root, key_patient=_patient_keys(patient_salt))
    allowed = {m.upper() for m in settings.modalities}
    wrong = [v for v in volumes if allowed and v.modality not in allowed]
    problems += [SeriesProblem(v.series_instance_uid, "wrong_modality", f"modality {v.modality}", len(v.sources))
                 for v in wrong]
    volumes, targets, unlabeled = label_volumes([v for v in volumes if v not in wrong], table.labels, table.encode)
    problems += unlabeled
    images = np.zeros((len(volumes), 1, size, size, size), dtype=np.float32)
    for i, vol in enumerate(volumes):
        images[i, 0] = to_unit_cube(vol, shape=(size, size, size))
    groups = [v.patient_key or v.study_instance_uid or v.series_instance_uid for v in volumes]
    return images, np.asarray(targets, dtype=np.int64), groups, problems, volume_subgroups(volumes)


def load_dicom_volume_splits(*, config: Any, data_dir: Path, seed: int) -> DatasetSplits:
    """Registry loader of ``dicom_volume``: the site's labelled series as a patient-level train/test split.

    Raises:
        ValueError: No usable series (the message counts the reasons).
        DataMismatch: The run declares 3 channels (volumes are grayscale).
    """
    settings = DicomSettings.from_config(config)
    if settings.channels == 3:
        raise DataMismatch("DICOM volumes are grayscale (1 channel), the run declares data.dicom_channels=3")
    salt_file = str(getattr(settings, "patient_salt_file", "") or "")
    salt = _site_salt(salt_file) if salt_file else b""
    images, labels, groups, problems, subgroups = load_volume_site(
        Path(data_dir), settings=settings, size=int(config.image_size), patient_salt=salt)
    reasons: dict[str, int] = {}
    for problem in problems:
        reasons[problem.reason] = reasons.get(problem.reason, 0) + 1
    if problems:
        logger.warning("site %s: %d series set aside %s", data_dir, len(problems), reasons)
    if len(labels) == 0:
        raise ValueError(f"no usable labelled DICOM series in {data_dir} (set aside: {reasons})")
    train, test = split_by_group(labels, groups, test_fraction=float(settings.test_fraction), seed=seed)
    names = settings.label_names or tuple(str(i) for i in range(int(labels.max()) + 1))
    return DatasetSplits(
        name=str(getattr(config, "dataset", "dicom_volume")),
        train_images=images[train], train_labels=labels[train],
        test_images=images[test], test_labels=labels[test],
        num_classes=len(names), in_channels=1, md5=None, label_names=tuple(names),
        test_groups={name: values[test] for name, values in subgroups.items()},
    )


def declared_volume_info(config: Any) -> DatasetInfo | list[str]:
    """As :func:`federation.data.dicom.dataset.declared_dicom_info`, for a 3-D model."""
    info = declared_dicom_info(config)
    if isinstance(info, list):
        return info
    return DatasetInfo(in_channels=info.in_channels, num_classes=info.num_classes, spatial_dims=3)


def _register() -> None:
    register_dataset("dicom_volume", load_dicom_volume_splits, site_only=declared_volume_info, replace=True)
    from federation.data.dicom.seg_volumes import _register as register_seg  # noqa: PLC0415 - imports this module

    register_seg()
