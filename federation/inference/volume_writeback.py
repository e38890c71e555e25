"""Results of a 3-D (volume) model back into the PACS: one SR or SEG per series of the cohort cache.

Each cached series is assembled into a volume exactly as for training
(:func:`federation.data.dicom.series.read_series`, then :func:`to_unit_cube` at the
export's ``volume_shape`` or ``image_size`` cubed); broken series are set aside with
their reason. A classification model's probability becomes a Comprehensive SR that
references the series' instances (:func:`federation.inference.writeback.classification_report`);
a segmentation model's label map is resized back to the series' slices (nearest) and
becomes a DICOM SEG referencing them (:func:`federation.inference.writeback.segmentation_object`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from federation.inference.writeback import ModelIdentity, classification_report, segmentation_object

logger = logging.getLogger(__name__)


@dataclass
class VolumeReports:
    """The reports to store, one row per predicted series, and the series set aside (UID, reason, detail)."""

    reports: list[Dataset] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    set_aside: list[tuple[str, str, str]] = field(default_factory=list)


def _label(names: list[str], k: int) -> str:
    return names[k] if k < len(names) else f"class-{k}"


def _resize_labels(classes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A ``(D, H, W)`` label map resized (nearest) to the series' ``(slices, rows, columns)``."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415, N812

    tensor = torch.from_numpy(classes.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(shape), mode="nearest")[0, 0].numpy().astype(np.uint8)


def cohort_volume_reports(*, cache_dir: str | os.PathLike[str], module: Any, meta: dict[str, Any]) -> VolumeReports:
    """Predict every series of the cohort cache as one volume and build its SR (classification) or SEG.

    Args:
        cache_dir: The cohort cache (:func:`federation.data.dicom.pacs.sync_cohort`).
        module: The exported program (probabilities out) of a 3-D model.
        meta: The export's ``model.json``.

    Raises:
        ValueError: The export is not of a 3-D model.
    """
    from federation.data.dicom.index import scan_files  # noqa: PLC0415
    from federation.data.dicom.series import read_series, to_unit_cube  # noqa: PLC0415
    from federation.inference.predict import predict_probabilities  # noqa: PLC0415

    prep = meta.get("preprocessing") or {}
    if int(prep.get("spatial_dims", 2)) != 3:
        raise ValueError(f"volume reports need a 3-D model; this export takes spatial_dims={prep.get('spatial_dims')}")
    shape = tuple(int(v) for v in prep.get("volume_shape") or ()) or (int(prep["image_size"]),) * 3
    root = Path(cache_dir)
    volumes, problems = read_series([path for _, path, _ in scan_files(root)], root=root)
    out = VolumeReports(set_aside=[(p.series_instance_uid, p.reason, p.detail) for p in problems])
    names, model = list(meta.get("label_names") or []), ModelIdentity.from_meta(meta)
    positive, threshold = int(meta.get("positive_class", 1)), float(meta.get("threshold", 0.5))
    for vol in sorted(volumes, key=lambda v: v.series_instance_uid):
        if len(set(vol.sources)) != len(vol.sources):  # frames of one enhanced object: SEG/SR per file not built
            out.set_aside.append((vol.series_instance_uid, "multi_frame", "enhanced multi-frame series are not "
                                  "written back yet"))
            continue
        probs = predict_probabilities(module, to_unit_cube(vol, shape=shape)[None, None])[0]
        if probs.ndim == 1:  # classification: (K,)
            evidence = [dcmread(root / source, stop_before_pixels=True) for source in vol.sources]
            predicted = int(np.argmax(probs))
            out.reports.append(classification_report(
                evidence=evidence, p_positive=float(probs[positive]), positive_label=_label(names, positive),
                predicted_label=_label(names, predicted), threshold=threshold, model=model))
            out.rows.append({"series_instance_uid": vol.series_instance_uid, "p_positive": float(probs[positive]),
                             "predicted": _label(names, predicted)})
            continue
        labelmap = _resize_labels(probs.argmax(axis=0), vol.voxels.shape)  # (K, D, H, W) -> the series' slices
        k = probs.shape[0]
        out.reports.append(segmentation_object(
            source_images=[dcmread(root / source) for source in vol.sources], labelmap=labelmap,
            label_names=names[:k] if len(names) >= k else [f"class-{i}" for i in range(k)], model=model))
        out.rows.append({"series_instance_uid": vol.series_instance_uid,
                         "voxels_per_class": np.bincount(labelmap.ravel(), minlength=k).tolist()})
    logger.info("volume reports: %d series predicted, %d set aside", len(out.rows), len(out.set_aside))
    return out
