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
from federation.data.medmnist import MedMNISTInfo, read_official_npz
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
        FileNotFoundError, ImportError, ValueError: See :func:`~federation.data.medmnist.read_official_npz`.
    """
    del seed
    return read_official_npz(info=MEDMNIST3D_INFO[config.dataset], data_dir=data_dir, download=config.download,
                             to_inputs=_volumes)


def _register() -> None:
    for flag, info in MEDMNIST3D_INFO.items():
        register_dataset(
            flag,
            load_medmnist3d,
            info=DatasetInfo(in_channels=info.in_channels, num_classes=len(info.label_names), spatial_dims=3),
            replace=True,
        )
