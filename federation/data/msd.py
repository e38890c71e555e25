"""``msd_hippocampus``: the Medical Segmentation Decathlon's Task04 (3-D T1 MRI, hippocampus head and body).

Read from ``<data dir>/msd_hippocampus/`` in the MSD layout (``imagesTr/``,
``labelsTr/``, ``dataset.json``; a ``SHA256SUMS`` file, when present, is checked
first): the cases its ``dataset.json`` ``training`` list names, checked, padded/
cropped to ``data.volume_shape`` (default 40 x 56 x 40; the volumes are
31-43 x 40-59 x 24-47 voxels) and scaled per volume to ``[0, 1]`` by
:mod:`federation.data.nifti`. Labels: 0 background, 1 anterior, 2 posterior.
``data.nifti_test_fraction`` of the cases are held out as the test split, which
``load_site_data`` cuts into each site's own held-out test cases. Licence CC-BY-SA
4.0 (attribute the MSD and Vanderbilt University Medical Center); the full set is
fetched with MONAI's ``DecathlonDataset(task="Task04_Hippocampus", download=True)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from federation.config.schema import DataConfig
from federation.data.nifti import check_nifti_cases, split_cases, volume_shape
from federation.data.registry import DatasetInfo, DatasetSplits, register_dataset

FOLDER = "msd_hippocampus"
"""Sub-folder of the data dir holding the task."""
LABEL_NAMES = ("background", "anterior", "posterior")


def verify_sha256(folder: Path) -> None:
    """Check every file ``folder/SHA256SUMS`` lists (``<hex>  <relative path>`` lines).

    Raises:
        ValueError: A listed file is missing or its checksum differs (named).
    """
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, rel = line.split(maxsplit=1)
        path = folder / rel.strip().lstrip("*")
        if not path.is_file():
            raise ValueError(f"{path}: listed in {sums} but missing; re-copy the dataset")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{path}: SHA-256 differs from {sums}; the file is damaged, re-copy it")


def load_msd_hippocampus(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits:
    """Registry loader of ``msd_hippocampus`` (see the module docstring).

    Raises:
        FileNotFoundError: The folder or its ``dataset.json`` is missing (names how to get it).
    """
    folder = data_dir / FOLDER
    index = folder / "dataset.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{index} not found: put MSD Task04_Hippocampus (imagesTr/, labelsTr/, dataset.json) in {folder}, "
            "e.g. with monai.apps.DecathlonDataset(root_dir=..., task='Task04_Hippocampus', download=True)"
        )
    verify_sha256(folder)
    training = json.loads(index.read_text())["training"]
    cases = [(Path(c["image"]).name.split(".nii")[0], folder / c["image"], folder / c["label"]) for c in training]
    kept = check_nifti_cases(cases, num_classes=len(LABEL_NAMES), shape=volume_shape(config))
    return split_cases(kept, name="msd_hippocampus", label_names=LABEL_NAMES,
                       test_fraction=config.nifti_test_fraction, seed=seed)


def _register() -> None:
    register_dataset(
        "msd_hippocampus",
        load_msd_hippocampus,
        info=DatasetInfo(in_channels=1, num_classes=len(LABEL_NAMES), spatial_dims=3),
        tasks=("segmentation",),
        replace=True,
    )
