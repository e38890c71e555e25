"""Segmentation masks for NIfTI volumes (``medfed predict --input DIR_OR_FILE --out DIR`` with a segmentation run).

Each input is read and preprocessed exactly as training read its volumes
(:func:`federation.data.nifti.volume_transforms`: MONAI ``LoadImage`` with nibabel,
``ResizeWithPadOrCrop`` to the export's volume shape, per-volume percentile
scaling), segmented by the exported model (arg-max of its class probabilities),
and the pad/crop is undone with MONAI's inverse transform, so the written mask has
the input's file name, shape and affine (nibabel, uint8 labels, the input's header
with its scaling removed). :func:`write_volumes_csv` writes one row per input with
the volume of every foreground structure in mm³ (voxel count times the voxel
volume, ``|det|`` of the affine's 3 x 3 part). An input that cannot be used (not
readable, not a single-channel 3-D volume) gets its error in the log and the CSV,
named by file; the others are still processed.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PAD_CROP_DATASETS = frozenset({"nifti", "msd_hippocampus"})
"""Datasets whose training volumes were padded/cropped as here (``dicom_seg`` resamples instead)."""


def is_nifti(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` / ``.nii.gz``)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def list_nifti_inputs(path: str | os.PathLike[str]) -> list[Path]:
    """The NIfTI files under ``path`` (itself, or every ``.nii``/``.nii.gz`` below a folder, sorted).

    Raises:
        FileNotFoundError: ``path`` does not exist, or a folder holds no NIfTI file.
    """
    base = Path(path)
    if base.is_file():
        return [base]
    if not base.is_dir():
        raise FileNotFoundError(f"--input {base}: no such file or folder")
    found = sorted(p for p in base.rglob("*") if p.is_file() and is_nifti(p) and not p.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"--input {base}: no .nii/.nii.gz file in this folder")
    return found


@dataclass
class MaskPrediction:
    """What :func:`predict_nifti` did with one input.

    Attributes:
        name: The input's path relative to ``--input`` (its file name for a single file).
        mask: The written mask (``None`` when the input failed).
        shape: The input's (and mask's) spatial shape.
        voxel_mm3: Volume of one voxel, ``|det(affine[:3, :3])|``.
        voxels: Foreground class -> voxel count in the mask.
        error: Why the input could not be segmented (``None``: it was).
    """

    name: str
    mask: Path | None = None
    shape: tuple[int, ...] = ()
    voxel_mm3: float = float("nan")
    voxels: dict[int, int] = field(default_factory=dict)
    error: str | None = None

    def volume_mm3(self, label: int) -> float:
        """Volume of foreground class ``label`` in mm³."""
        return self.voxels.get(label, 0) * self.voxel_mm3


def _segment(module: nn.Module, path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
    """The label map of ``path`` at its own shape, and the nibabel image it was read from."""
    import nibabel as nib  # noqa: PLC0415
    from monai.data import MetaTensor  # noqa: PLC0415

    from federation.data.nifti import volume_transforms  # noqa: PLC0415

    load, fit, scale = volume_transforms(shape)
    source = nib.load(str(path))
    image = load(str(path))
    if image.ndim != 4 or image.shape[0] != 1 or len(source.shape) != 3:
        raise ValueError(f"expected a single-channel 3-D volume, got shape {tuple(source.shape)}")
    fitted = fit(image)
    with torch.no_grad():
        probs = module(torch.as_tensor(scale(fitted).as_tensor(), dtype=torch.float32)[None])
    labels = probs.argmax(dim=1).to(torch.float32)  # (1, *shape): one channel, as the transform saw
    restored = fit.inverse(MetaTensor(labels, meta=fitted.meta, applied_operations=fitted.applied_operations))
    return np.asarray(restored[0]).round().astype(np.uint8), source


def _write_mask(mask: np.ndarray, source: Any, path: Path) -> None:
    import nibabel as nib  # noqa: PLC0415

    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, source.affine, header=header), str(path))


def predict_nifti(
    module: nn.Module, inputs: Sequence[Path], *, root: Path, out_dir: Path, volume_shape: tuple[int, ...]
) -> list[MaskPrediction]:
    """Segment every input and write its mask to ``out_dir`` under the input's relative path.

    Args:
        module: The exported program (class probabilities ``(N, K, *volume_shape)``).
        inputs: NIfTI files (:func:`list_nifti_inputs`).
        root: ``--input`` (a file or folder): masks keep the inputs' paths relative to it.
        out_dir: Where the masks go (must not be the input folder: masks would replace images).
        volume_shape: The export's model input shape (``preprocessing.volume_shape``).

    Raises:
        ValueError: ``out_dir`` would overwrite an input.
    """
    results = []
    base = root if root.is_dir() else root.parent
    for path in inputs:
        name = str(path.relative_to(base))
        target = out_dir / name
        if target.resolve() == path.resolve():
            raise ValueError(f"--out {out_dir}: the mask of {path} would replace the image; choose another folder")
        try:
            mask, source = _segment(module, path, volume_shape)
        except Exception as err:  # noqa: BLE001 - a bad input is named and skipped, the others go on
            message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            logger.error("%s: cannot segment it (%s)", path, message)
            results.append(MaskPrediction(name=name, error=message))
            continue
        _write_mask(mask, source, target)
        labels, counts = np.unique(mask, return_counts=True)
        results.append(MaskPrediction(
            name=name, mask=target, shape=tuple(int(s) for s in mask.shape),
            voxel_mm3=float(abs(np.linalg.det(np.asarray(source.affine)[:3, :3]))),
            voxels={int(k): int(c) for k, c in zip(labels, counts) if k != 0}))
    return results


def write_volumes_csv(results: Sequence[MaskPrediction], path: Path, *, label_names: Sequence[str]) -> Path:
    """One row per input: ``input, mask, shape, voxel_mm3, <structure>_mm3 ..., error`` (foreground classes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    structures = list(enumerate(label_names))[1:]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "mask", "shape", "voxel_mm3", *[f"{n}_mm3" for _, n in structures], "error"])
        for r in results:
            if r.error is not None:
                writer.writerow([r.name, "", "", "", *[""] * len(structures), r.error])
                continue
            writer.writerow([r.name, str(r.mask), "x".join(map(str, r.shape)), repr(r.voxel_mm3),
                             *[repr(r.volume_mm3(k)) for k, _ in structures], ""])
    return path
