"""The ``dicom`` dataset-registry loader: one hospital's DICOM folder as :class:`DatasetSplits`.

Settings come from ``data.dicom_*`` config keys when the schema has them, else
from the defaults of :class:`DicomSettings`, so the loader works before and after
the keys are wired.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from federation.data.dicom.confine import site_salt
from federation.data.dicom.labels import DEFAULT_KEY_COLUMN, DEFAULT_LABEL_COLUMN, DEFAULT_LABELS_NAME
from federation.data.dicom.loader import DicomReadOptions, load_site_sample_set
from federation.data.dicom.reader import Frames, Normalize
from federation.data.registry import DataMismatch, DatasetInfo, DatasetSplits, register_dataset, stratified_subset

logger = logging.getLogger(__name__)

_SPLIT_STREAM = 301


def _csv(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value or "").split(",") if v.strip())


@dataclass(frozen=True)
class DicomSettings:
    """How a DICOM site folder is read; each field is config key ``data.dicom_<field>``.

    Attributes:
        labels: Labels CSV, relative to the data folder or absolute.
        key_column: CSV column with SOP Instance UID or relative path.
        label_column: CSV column with the class.
        modalities: Allowed modalities (config: comma-separated string; empty = all).
        label_names: Class names in index order (config: comma-separated; empty = inferred).
        frames: ``first``, ``middle`` or ``all`` frames of multi-frame images.
        channels: 0 (auto), 1 or 3.
        normalize: ``auto``, ``range`` or ``minmax``.
        cache_dir: Folder of the header index (empty = inside the data folder).
        test_fraction: Share of patients (hashed PatientID, else study) held out as the local test split.
        patient_salt_file: File with the site's secret salt of the PatientID keys (empty:
            plain hash). A real site sets it itself, inside its state-dir.
    """

    labels: str = DEFAULT_LABELS_NAME
    key_column: str = DEFAULT_KEY_COLUMN
    label_column: str = DEFAULT_LABEL_COLUMN
    modalities: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    frames: Frames = "first"
    channels: int = 0
    normalize: Normalize = "auto"
    cache_dir: str = ""
    test_fraction: float = 0.2
    patient_salt_file: str = ""

    @classmethod
    def from_config(cls, config: Any) -> DicomSettings:
        """Read ``dicom_*`` attributes of a ``DataConfig`` (missing ones keep their defaults)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"dicom_{f.name}"
            if hasattr(config, key):
                raw = getattr(config, key)
                values[f.name] = _csv(raw) if f.name in ("modalities", "label_names") else raw
        return cls(**values)

    def read_options(self, *, patient_salt: bytes = b"") -> DicomReadOptions:
        """The loader's :class:`DicomReadOptions` of these settings (``patient_salt``: the site's secret)."""
        return DicomReadOptions(
            key_column=self.key_column, label_column=self.label_column, modalities=self.modalities,
            label_names=self.label_names, frames=self.frames, cache_dir=self.cache_dir or None,
            channels=self.channels, normalize=self.normalize, patient_salt=patient_salt,
        )


def split_by_group(
    labels: np.ndarray, groups: list[str], *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split samples into train/test so that no group (patient) is in both, stratified by label.

    Args:
        labels: Sample labels ``(N,)``.
        groups: Group of each sample.
        test_fraction: Share of groups in the test split (0 gives an empty test split).
        seed: Seed of the choice.

    Returns:
        ``(train_indices, test_indices)``, sorted int64.

    Raises:
        ValueError: ``test_fraction`` outside ``[0, 1)``, or a non-empty test split
            is asked of fewer than two groups.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    all_idx = np.arange(len(labels), dtype=np.int64)
    n_test = int(round(test_fraction * len(names)))
    if test_fraction > 0:
        if len(names) < 2:
            raise ValueError(f"a test split needs at least 2 patients/images, found {len(names)}")
        n_test = min(max(1, n_test), len(names) - 1)
    if n_test == 0:
        return all_idx, np.zeros(0, dtype=np.int64)
    first = np.array([np.flatnonzero(inverse == g)[0] for g in range(len(names))])
    sub_seed = int(np.random.SeedSequence([int(seed), _SPLIT_STREAM]).generate_state(1)[0])
    test_groups = stratified_subset(labels[first], n=n_test, seed=sub_seed)
    is_test = np.isin(inverse, test_groups)
    return all_idx[~is_test], all_idx[is_test]


def load_dicom_splits(*, config: Any, data_dir: Path, seed: int) -> DatasetSplits:
    """Registry loader: the site folder ``data_dir`` as a train/test :class:`DatasetSplits`.

    Images come at ``config.image_size`` already (DICOM sizes differ per file).

    Args:
        config: The ``data`` config section (``image_size``, ``dataset`` and ``dicom_*`` keys).
        data_dir: The site folder.
        seed: Seed of the patient-level train/test split.

    Returns:
        The site's data.

    Raises:
        ValueError: No usable image (the message lists the quarantine reasons).
        FileNotFoundError: The labels CSV is missing.
    """
    settings = DicomSettings.from_config(config)
    labels_csv = Path(settings.labels).expanduser()
    if not labels_csv.is_absolute():
        labels_csv = Path(data_dir) / labels_csv
    salt = site_salt(settings.patient_salt_file) if settings.patient_salt_file else b""
    samples = load_site_sample_set(data_dir, labels_csv, image_size=int(config.image_size),
                                   options=settings.read_options(patient_salt=salt))
    images, labels, groups, report = samples.images, samples.labels, samples.groups, samples.report
    if report.quarantined:
        logger.warning("site %s: %d files/rows quarantined %s (see `medfed site check`)",
                       data_dir, len(report.quarantined), report.reason_counts)
    if not report.ok:
        raise ValueError(
            f"no usable DICOM images in {data_dir} (quarantined: {report.reason_counts}); "
            f"run `medfed site check {data_dir}` for details"
        )
    if settings.channels in (1, 3) and samples.native_channels not in (0, settings.channels):
        kind = "colour" if samples.native_channels == 3 else "grayscale"
        raise DataMismatch(f"most of the site's images are {kind} ({samples.native_channels} channel(s)), "
                           f"the run declares data.dicom_channels={settings.channels}")
    train, test = split_by_group(labels, groups, test_fraction=float(settings.test_fraction), seed=seed)
    return DatasetSplits(
        name=str(getattr(config, "dataset", "dicom")),
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
        num_classes=len(report.label_names),
        in_channels=int(images.shape[1]),
        md5=None,
        label_names=report.label_names,
        test_groups={"sex": samples.sex[test].astype(np.int64), "age": samples.age[test].astype(np.int64)},
    )


def declared_dicom_info(config: Any) -> DatasetInfo | list[str]:
    """The model shape a DICOM run declares (classes from ``data.dicom_label_names``, ``data.dicom_channels``).

    DICOM data exists only at the hospitals, so the coordinator cannot learn the shape
    from images: both keys are required. Returns the problems, each naming its key,
    when they are missing.
    """
    settings = DicomSettings.from_config(config)
    problems = []
    names = settings.label_names
    if len(names) < 2 or len(set(names)) != len(names):
        problems.append(
            f"data.dicom_label_names: required for data.dataset={config.dataset} (the coordinator holds no "
            "images to learn the classes from): set at least 2 distinct class names in index order, "
            f"e.g. --set data.dicom_label_names=normal,pneumonia (got {','.join(names)!r})")
    if settings.channels not in (1, 3):
        problems.append(
            f"data.dicom_channels: required for data.dataset={config.dataset} (0 = auto needs images at the "
            "coordinator): set 1 (grayscale) or 3 (colour)")
    if problems:
        return problems
    return DatasetInfo(in_channels=int(settings.channels), num_classes=len(names), spatial_dims=2)


def _register() -> None:
    register_dataset("dicom", load_dicom_splits, site_only=declared_dicom_info, replace=True)
    from federation.data.dicom.volumes import _register as register_volumes  # noqa: PLC0415 - imports this module

    register_volumes()
