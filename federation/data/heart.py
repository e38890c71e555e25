"""UCI Heart Disease as its four real hospitals (FLamby's Fed-Heart-Disease).

The four ``processed.<center>.data`` files (Cleveland, Hungary, Switzerland, VA Long
Beach) are the natural split: one file, one site. The preprocessing mirrors
FLamby's ``HeartDiseaseRaw`` (owkin/FLamby, ``flamby/datasets/fed_heart_disease/dataset.py``):

1. ``?`` is a missing value; columns 10, 11 and 12 (slope, ca, thal) are dropped,
   then every row with a missing value (303 / 261 / 46 / 130 rows remain);
2. per site, a shuffled 66/34 train/test split with scikit-learn's
   ``train_test_split(random_state=43)``, stratified on the binarised label when
   both classes have more than 2 rows (not in Switzerland: 45 vs 1);
3. chest-pain type (column 2) and resting ECG (column 6) become dummies with the
   first level dropped, giving 13 features;
4. the label ``num`` is binarised (``> 0`` means disease);
5. each site's features are standardised with the mean and standard deviation of
   that site's *training* rows (``(x - mean) / (std + 1e-9)``), as FLamby does.

The split does not depend on the experiment seed (FLamby fixes it), so every run
sees the same 199/104, 172/89, 30/16 and 85/45 train/test rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from federation.config.schema import DataConfig
from federation.data.medmnist import file_md5
from federation.data.paths import DATA_DIR_ENV
from federation.data.registry import DatasetInfo, DatasetSplits, register_dataset

logger = logging.getLogger(__name__)

HEART_CENTERS: tuple[tuple[str, str, str], ...] = (
    ("cleveland", "Cleveland", "2d91a8ff69cfd9616aa47b59d6f843db"),
    ("hungarian", "Hungary", "22e96bee155b5973568101c93b3705f6"),
    ("switzerland", "Switzerland", "9a87f7577310b3917730d06ba9349e20"),
    ("va", "VA Long Beach", "4249d03ca7711e84f4444768c9426170"),
)
"""``(file stem, display name, MD5 that FLamby's downloader checks)`` in FLamby's center order."""

HEART_FEATURES: tuple[str, ...] = (
    "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
    "cp=2", "cp=3", "cp=4", "restecg=1", "restecg=2",
)
"""The 13 model inputs, in FLamby's column order (plain columns, then the dummies)."""

TRAIN_FRACTION = 0.66
SPLIT_RANDOM_STATE = 43
_NUM_COLUMNS = 14
_DROPPED = (10, 11, 12)
_PLAIN = (0, 1, 3, 4, 5, 7, 8, 9)
_DUMMIES = ((2, (2.0, 3.0, 4.0), (1.0, 2.0, 3.0, 4.0)), (6, (1.0, 2.0), (0.0, 1.0, 2.0)))
"""``(column, levels kept as dummies, all allowed levels)``; the first level is dropped."""


def read_center(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one ``processed.<center>.data`` file the FLamby way.

    Args:
        path: The CSV file (14 columns, no header, ``?`` = missing).

    Returns:
        ``(columns, num)``: float64 ``(rows, 10)`` with columns 0-9 of the kept rows,
        and the raw ``num`` label (0-4) of those rows.

    Raises:
        ValueError: A row without 14 fields or with a non-numeric value.
    """
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(",")
        if len(fields) != _NUM_COLUMNS:
            raise ValueError(f"{path}:{lineno}: expected {_NUM_COLUMNS} comma-separated values, got {len(fields)}")
        try:
            rows.append([np.nan if f.strip() == "?" else float(f) for f in fields])
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
    table = np.delete(np.asarray(rows, dtype=np.float64), _DROPPED, axis=1)
    kept = table[~np.isnan(table).any(axis=1)]
    return kept[:, :-1], kept[:, -1]


def encode_features(columns: np.ndarray, *, path: Path) -> np.ndarray:
    """Columns 0-9 -> the 13 features of :data:`HEART_FEATURES` (dummies with the first level dropped)."""
    parts = [columns[:, list(_PLAIN)]]
    for column, kept_levels, allowed in _DUMMIES:
        values = columns[:, column]
        unknown = sorted(set(values.tolist()) - set(allowed))
        if unknown:
            raise ValueError(f"{path}: column {column} holds unexpected levels {unknown}; allowed {allowed}")
        parts.append(np.stack([values == level for level in kept_levels], axis=1).astype(np.float64))
    return np.concatenate(parts, axis=1)


def heart_sex_codes(sex: np.ndarray, *, path: Path) -> np.ndarray:
    """UCI ``sex`` (1 = male, 0 = female) -> subgroup codes (0 = F, 1 = M, as DICOM's ``SEX_CODES``)."""
    unknown = sorted(set(sex.tolist()) - {0.0, 1.0})
    if unknown:
        raise ValueError(f"{path}: column 1 (sex) holds unexpected values {unknown}; allowed 0 (female), 1 (male)")
    return sex.astype(np.int8)


def split_center(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's per-center train/test split of ``len(labels)`` rows (sorted index arrays)."""
    from sklearn.model_selection import train_test_split  # lazy: importing scikit-learn takes seconds

    levels, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(levels) > 1 and bool((counts > 2).all()) else None
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=1.0 - TRAIN_FRACTION,
        train_size=TRAIN_FRACTION,
        random_state=SPLIT_RANDOM_STATE,
        shuffle=True,
        stratify=stratify,
    )
    return np.sort(train), np.sort(test)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both with the training rows' mean and (unbiased) std, + 1e-9 as FLamby."""
    mean = train.mean(axis=0)
    std = train.std(axis=0, ddof=1) + 1e-9
    return (train - mean) / std, (test - mean) / std


def _center_path(data_dir: Path, stem: str, md5: str) -> Path:
    path = data_dir / f"processed.{stem}.data"
    if not path.is_file():
        raise FileNotFoundError(
            f"heart_disease: {path} not found. Put the four UCI files processed.{{cleveland,hungarian,"
            f"switzerland,va}}.data in data.data_dir (or ${DATA_DIR_ENV}); they are not downloaded automatically."
        )
    found = file_md5(path)
    if found != md5:
        raise ValueError(
            f"MD5 mismatch for {path}: expected {md5} (the original UCI file FLamby checks), found {found}. "
            "Many copies online are edited; use the original UCI file."
        )
    return path


def load_heart_disease(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits:
    """Registry loader of ``heart_disease``: 13 standardised features, 2 classes, 4 natural sites.

    Args:
        config: The ``data`` section (unused beyond the registry's own settings).
        data_dir: Folder holding the four ``processed.*.data`` files.
        seed: Unused: the split is FLamby's fixed one.

    Returns:
        The dataset with ``train_sites``/``test_sites`` set (site 0 Cleveland ... 3 VA), and
        the test patients' sex and age as ``test_groups`` for subgroup evaluation.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: A file's MD5 or content is not the original.
    """
    del config, seed
    xs_train, xs_test, ys_train, ys_test, sites_train, sites_test, md5s = [], [], [], [], [], [], []
    sex_test, age_test = [], []
    for site, (stem, _display, md5) in enumerate(HEART_CENTERS):
        path = _center_path(data_dir, stem, md5)
        md5s.append(md5)
        columns, num = read_center(path)
        features = encode_features(columns, path=path)
        labels = (num > 0).astype(np.int64)
        train, test = split_center(labels)
        x_train, x_test = _standardise(features[train], features[test])
        xs_train.append(x_train)
        xs_test.append(x_test)
        ys_train.append(labels[train])
        ys_test.append(labels[test])
        sites_train.append(np.full(len(train), site, dtype=np.int64))
        sites_test.append(np.full(len(test), site, dtype=np.int64))
        sex_test.append(heart_sex_codes(columns[test, 1], path=path))
        age_test.append(columns[test, 0].astype(np.int64))
        logger.debug("heart_disease %s: %d rows -> %d train / %d test", stem, len(labels), len(train), len(test))
    return DatasetSplits(
        name="heart_disease",
        train_images=np.concatenate(xs_train).astype(np.float32),
        train_labels=np.concatenate(ys_train),
        test_images=np.concatenate(xs_test).astype(np.float32),
        test_labels=np.concatenate(ys_test),
        num_classes=2,
        in_channels=len(HEART_FEATURES),
        md5=",".join(md5s),
        label_names=("no disease", "disease"),
        train_sites=np.concatenate(sites_train),
        test_sites=np.concatenate(sites_test),
        site_names=tuple(display for _stem, display, _md5 in HEART_CENTERS),
        test_groups={"sex": np.concatenate(sex_test), "age": np.concatenate(age_test)},
    )


def _register() -> None:
    register_dataset(
        "heart_disease",
        load_heart_disease,
        info=DatasetInfo(in_channels=len(HEART_FEATURES), num_classes=2, spatial_dims=0),
        replace=True,
    )
