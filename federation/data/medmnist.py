"""MedMNIST v2 2D datasets (28 px) read from the official ``<flag>.npz`` files.

The files are looked for in :func:`federation.data.resolve_data_dir`, checked
against the official MD5 and, when missing and ``data.download`` is true, fetched
with the ``medmnist`` package (imported lazily; it is optional).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from federation.config.schema import DataConfig
from federation.data.paths import DATA_DIR_ENV
from federation.data.registry import DatasetInfo, DatasetSplits, register_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MedMNISTInfo:
    """What medfed knows about one MedMNIST flag (from ``medmnist.INFO``)."""

    flag: str
    python_class: str
    md5: str
    in_channels: int
    label_names: tuple[str, ...]
    n_train: int
    n_val: int
    n_test: int


MEDMNIST_INFO: MappingProxyType[str, MedMNISTInfo] = MappingProxyType({
    "pneumoniamnist": MedMNISTInfo(
        flag="pneumoniamnist",
        python_class="PneumoniaMNIST",
        md5="28209eda62fecd6e6a2d98b1501bb15f",
        in_channels=1,
        label_names=("normal", "pneumonia"),
        n_train=4708,
        n_val=524,
        n_test=624,
    ),
    "breastmnist": MedMNISTInfo(
        flag="breastmnist",
        python_class="BreastMNIST",
        md5="750601b1f35ba3300ea97c75c52ff8f6",
        in_channels=1,
        label_names=("malignant", "normal, benign"),
        n_train=546,
        n_val=78,
        n_test=156,
    ),
    "retinamnist": MedMNISTInfo(
        flag="retinamnist",
        python_class="RetinaMNIST",
        md5="bd4c0672f1bba3e3a89f0e4e876791e4",
        in_channels=3,
        label_names=("0", "1", "2", "3", "4"),
        n_train=1080,
        n_val=120,
        n_test=400,
    ),
})
"""Official facts of the supported flags (read-only)."""

_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")


def file_md5(path: Path) -> str:
    """Return the hex MD5 of a file, read in 1 MiB blocks.

    Args:
        path: The file.
    """
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(info: MedMNISTInfo, data_dir: Path) -> None:
    """Fetch ``<flag>.npz`` into ``data_dir`` with the medmnist package."""
    try:
        medmnist = importlib.import_module("medmnist")
    except ImportError as exc:
        raise ImportError(
            f"data.download=true needs the medmnist package to fetch {info.flag}.npz: run "
            f"`pip install medmnist`, or put the official {info.flag}.npz in {data_dir} yourself"
        ) from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s.npz into %s with medmnist", info.flag, data_dir)
    dataset_class = getattr(medmnist, info.python_class)
    dataset_class(split="train", root=str(data_dir), download=True)


def _load_npz(path: Path, info: MedMNISTInfo) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in _KEYS if k not in archive.files]
            if missing:
                raise ValueError(
                    f"{path} lacks the keys {missing} of an official MedMNIST file; "
                    f"delete it and fetch the official {info.flag}.npz (data.download=true)"
                )
            return {k: archive[k] for k in _KEYS}
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read {path} as .npz ({exc}); delete it and fetch it again") from exc


def _images(raw: np.ndarray, info: MedMNISTInfo, path: Path, key: str) -> np.ndarray:
    """uint8 (N,H,W) or (N,H,W,3) -> float32 (N,C,H,W) in [0,1]."""
    if raw.ndim == 3:
        raw = raw[:, None, :, :]
    elif raw.ndim == 4:
        raw = raw.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{path}: {key} has shape {raw.shape}, expected (N, H, W) or (N, H, W, C)")
    if raw.shape[1] != info.in_channels:
        raise ValueError(f"{path}: {key} has {raw.shape[1]} channels, {info.flag} has {info.in_channels}")
    return np.ascontiguousarray(raw, dtype=np.float32) / np.float32(255.0)


def _labels(raw: np.ndarray, info: MedMNISTInfo, path: Path, key: str) -> np.ndarray:
    labels = raw.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(info.label_names)):
        raise ValueError(f"{path}: {key} holds labels outside [0, {len(info.label_names)})")
    return labels


ImageReader = Callable[[np.ndarray, MedMNISTInfo, Path, str], np.ndarray]
"""Turns one raw ``<split>_images`` array into float32 model inputs (2-D images or 3-D volumes)."""


def read_official_npz(*, info: MedMNISTInfo, data_dir: Path, download: bool, to_inputs: ImageReader) -> DatasetSplits:
    """Find, MD5-check and read an official MedMNIST ``<flag>.npz`` (2-D and 3-D alike).

    Args:
        info: Official facts of the flag.
        data_dir: Resolved data folder holding ``<flag>.npz``.
        download: Fetch the file with the medmnist package when it is missing.
        to_inputs: Converts each split's raw images (``_images`` or 3-D ``_volumes``).

    Returns:
        The official train/val/test splits.

    Raises:
        FileNotFoundError: The file is missing and ``download`` is false.
        ImportError: Download was asked for but medmnist is not installed.
        ValueError: The file's MD5 or content does not match the official one.
    """
    path = data_dir / f"{info.flag}.npz"
    if not path.is_file():
        if not download:
            raise FileNotFoundError(
                f"MedMNIST file for data.dataset={info.flag!r} not found: looked for {path}. "
                f"Put the official {info.flag}.npz there, point data.data_dir (or the "
                f"{DATA_DIR_ENV} environment variable) at the folder that holds it, "
                f"or set data.download=true to fetch it with the medmnist package."
            )
        _download(info, data_dir)
        if not path.is_file():
            raise FileNotFoundError(f"medmnist download finished but {path} does not exist")
    found = file_md5(path)
    if found != info.md5:
        raise ValueError(
            f"MD5 mismatch for {path}: expected {info.md5} (official {info.flag}.npz), found {found}. "
            f"The file is corrupt, truncated or a different version: delete it and fetch it again "
            f"(data.download=true) or copy the official file there."
        )
    arrays = _load_npz(path, info)
    splits = {
        name: (
            to_inputs(arrays[f"{name}_images"], info, path, f"{name}_images"),
            _labels(arrays[f"{name}_labels"], info, path, f"{name}_labels"),
        )
        for name in ("train", "val", "test")
    }
    logger.debug("read %s (md5 %s)", path, found)
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


def load_medmnist(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits:
    """Load a MedMNIST 2D dataset (the flag is ``config.dataset``) at 28 px.

    Args:
        config: The ``data`` section (``dataset`` and ``download`` are used here).
        data_dir: Resolved data folder holding ``<flag>.npz``.
        seed: Unused (the splits are the official ones).

    Returns:
        The official train/val/test splits as float32 ``(N, C, 28, 28)`` images.

    Raises:
        FileNotFoundError, ImportError, ValueError: See :func:`read_official_npz`.
    """
    del seed
    return read_official_npz(info=MEDMNIST_INFO[config.dataset], data_dir=data_dir, download=config.download,
                             to_inputs=_images)


def _register() -> None:
    for flag in MEDMNIST_INFO:
        info = MEDMNIST_INFO[flag]
        register_dataset(
            flag,
            load_medmnist,
            site_shift_strength=0.0,
            info=DatasetInfo(in_channels=info.in_channels, num_classes=len(info.label_names)),
            replace=True,
        )
