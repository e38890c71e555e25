"""MedMNIST v2 3-D datasets (28 voxels a side) from the official ``<flag>.npz`` files.

Volumes come as float32 ``(N, 1, 28, 28, 28)`` in ``[0, 1]``; a 3-D network
(``model.name=cnn``, built with ``spatial_dims=3`` from the dataset info) trains on
them unchanged. Files are found and checked as the 2-D ones are
(:mod:`federation.data.medmnist`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import MappingProxyType

import numpy as np

from federation.config.schema import DataConfig
from federation.data.medmnist import MedMNISTInfo, _download, _labels, _load_npz, file_md5
from federation.data.paths import DATA_DIR_ENV
from federation.data.registry import DatasetInfo, DatasetSplits, register_dataset

logger = logging.getLogger(__name__)

MEDMNIST3D_INFO: MappingProxyType[str, MedMNISTInfo] = MappingProxyType({
    "adrenalmnist3d": MedMNISTInfo(
        flag="adrenalmnist3d",
        python_class="AdrenalMNIST3D",
        md5="bbd3c5a5576322bc4cdfea780653b1ce",
        in_channels=1,
        label_names=("normal", "hyperplasia"),
        n_train=1188,
        n_val=98,
        n_test=298,
    ),
})
"""Official facts of the supported 3-D flags (read-only)."""


def _volumes(raw: np.ndarray, info: MedMNISTInfo, path: Path, key: str) -> np.ndarray:
    """uint8 (N, D, H, W) -> float32 (N, 1, D, H, W) in [0, 1]."""
    if raw.ndim != 4:
        raise ValueError(f"{path}: {key} has shape {raw.shape}, expected (N, D, H, W) volumes")
    return np.ascontiguousarray(raw[:, None], dtype=np.float32) / np.float32(255.0)


def load_medmnist3d(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits:
    """Load a MedMNIST 3-D dataset (the flag is ``config.dataset``) at 28 voxels.

    Args:
        config: The ``data`` section (``dataset`` and ``download`` are used).
        data_dir: Resolved data folder holding ``<flag>.npz``.
        seed: Unused (the official splits).

    Returns:
        The official train/val/test splits as float32 ``(N, 1, 28, 28, 28)`` volumes.

    Raises:
        FileNotFoundError: The file is missing and ``data.download`` is false.
        ValueError: The file's MD5 or content is not the official one.
    """
    del seed
    info = MEDMNIST3D_INFO[config.dataset]
    path = data_dir / f"{info.flag}.npz"
    if not path.is_file():
        if not config.download:
            raise FileNotFoundError(
                f"MedMNIST file for data.dataset={info.flag!r} not found: looked for {path}. Put the official "
                f"{info.flag}.npz there, point data.data_dir (or ${DATA_DIR_ENV}) at its folder, or set "
                "data.download=true to fetch it with the medmnist package."
            )
        _download(info, data_dir)
    found = file_md5(path)
    if found != info.md5:
        raise ValueError(
            f"MD5 mismatch for {path}: expected {info.md5} (official {info.flag}.npz), found {found}; "
            "delete it and fetch it again (data.download=true)."
        )
    arrays = _load_npz(path, info)
    splits = {
        name: (
            _volumes(arrays[f"{name}_images"], info, path, f"{name}_images"),
            _labels(arrays[f"{name}_labels"], info, path, f"{name}_labels"),
        )
        for name in ("train", "val", "test")
    }
    return DatasetSplits(
        name=info.flag,
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        test_images=splits["test"][0],
        test_labels=splits["test"][1],
        num_classes=len(info.label_names),
        in_channels=info.in_channels,
        md5=found,
        label_names=info.label_names,
        val_images=splits["val"][0],
        val_labels=splits["val"][1],
    )


def _register() -> None:
    for flag, info in MEDMNIST3D_INFO.items():
        register_dataset(
            flag,
            load_medmnist3d,
            info=DatasetInfo(in_channels=info.in_channels, num_classes=len(info.label_names), spatial_dims=3),
            replace=True,
        )


_register()
