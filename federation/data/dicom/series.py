"""A DICOM series as one 3-D volume.

Slices are grouped by Series Instance UID and ordered by their Image Position (Patient)
projected on the slice normal (the cross product of the two Image Orientation (Patient)
direction cosines); the slice spacing comes from those positions, the in-plane spacing
from Pixel Spacing, and stored values go through the Modality LUT (Rescale
Slope/Intercept, pydicom's ``apply_modality_lut``). Enhanced multi-frame objects give
their frames' positions, orientation, spacing and rescale from the (per-frame or shared)
functional groups. A series that cannot be one regular volume is named with a reason
(:data:`SERIES_REASONS`) and set aside; the rest are kept. A single 2-D image (no
geometry, one frame) is a volume of depth 1.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

logger = logging.getLogger(__name__)

SERIES_REASONS: dict[str, str] = {
    "unreadable": "a file of the series could not be read or decoded",
    "mixed_sizes": "slices of different rows x columns",
    "inconsistent_orientation": "slices with different orientations, or not stacked along their normal",
    "no_geometry": "several slices without Image Position/Orientation (Patient)",
    "duplicate_slice": "two slices at the same position",
    "missing_slice": "a gap of a whole slice or more between two slices",
    "inconsistent_spacing": "slice positions not evenly spaced",
    "too_few_slices": "fewer slices than the volume needs",
}
"""Why a series is set aside: code -> explanation."""

NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "KO", "PR", "RTSTRUCT", "DOC"})
"""Objects that are not image slices (labels, reports, presentation states): never part of a volume."""

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between two slices' direction cosines still counted as one orientation."""
SPACING_TOLERANCE = 0.05
"""Largest relative deviation of one slice step from the series' smallest step."""


@dataclass(frozen=True)
class Frame:
    """One 2-D slice: modality values and geometry (``position``/``orientation`` ``None`` when absent)."""

    pixels: np.ndarray
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float]
    sop_instance_uid: str
    source: str


@dataclass(frozen=True, eq=False)
class Volume:
    """One series as a volume of modality values (e.g. Hounsfield units for CT).

    Attributes:
        series_instance_uid, study_instance_uid, modality: From the headers.
        voxels: ``float32 (D, H, W)``, slices ordered along the normal.
        spacing: ``(slice, row, column)`` spacing in mm.
        origin: Image Position (Patient) of the first slice (zeros without geometry).
        orientation: The six direction cosines (identity without geometry).
        sop_instance_uids: The instances the slices come from, in slice order.
        sources: The files the slices come from, in slice order.
        patient_key: Keyed hash of the PatientID (:func:`federation.data.dicom.confine.patient_key`), never the ID.
        patient_sex: ``"F"``, ``"M"``, ``"O"`` from PatientSex, ``""`` if absent or other (subgroup evaluation).
        patient_age: Age in whole years (PatientAge, else birth date to study date), -1 if unknown.
    """

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    voxels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, ...]
    sop_instance_uids: tuple[str, ...]
    sources: tuple[str, ...]
    patient_key: str = ""
    patient_sex: str = ""
    patient_age: int = -1


@dataclass(frozen=True)
class SeriesProblem:
    """A series set aside: its UID, a :data:`SERIES_REASONS` code, the specifics, its file count."""

    series_instance_uid: str
    reason: str
    detail: str
    files: int


class SeriesError(ValueError):
    """A series is not one regular volume (``reason`` is a :data:`SERIES_REASONS` code)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _group_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """Item of a functional group macro for frame ``index``: per-frame first, then shared."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq and len(seq) > i and seq[i].get(sequence):
            return seq[i].get(sequence)[0]
    return None


def _rescale(values: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    transform = _group_item(ds, index, "PixelValueTransformationSequence")
    if transform is not None and "RescaleSlope" in transform:
        return values * float(transform.RescaleSlope) + float(transform.get("RescaleIntercept", 0.0))
    return np.asarray(apply_modality_lut(values, ds), dtype=np.float64)


def dataset_frames(ds: Dataset, *, source: str) -> list[Frame]:
    """Every frame of a decoded dataset (classic single-frame or enhanced multi-frame) as a :class:`Frame`."""
    arr = np.asarray(ds.pixel_array)
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    arr = arr.reshape((nframes, *arr.shape[-2:])) if int(ds.get("SamplesPerPixel", 1) or 1) == 1 else arr
    if arr.ndim != 3:
        raise SeriesError("unreadable", f"{source}: colour images are not volumes")
    sop = str(ds.get("SOPInstanceUID", ""))
    frames = []
    for i in range(nframes):
        plane = _group_item(ds, i, "PlanePositionSequence")
        orient = _group_item(ds, i, "PlaneOrientationSequence")
        measures = _group_item(ds, i, "PixelMeasuresSequence")
        position = _floats((plane or ds).get("ImagePositionPatient"), 3)
        orientation = _floats((orient or ds).get("ImageOrientationPatient"), 6)
        spacing = _floats((measures or ds).get("PixelSpacing"), 2) or (1.0, 1.0)
        pixels = _rescale(arr[i].astype(np.float64), ds, i).astype(np.float32)
        frames.append(Frame(pixels, position, orientation, spacing, sop,  # type: ignore[arg-type]
                            f"{source}#{i}" if nframes > 1 else source))
    return frames


def _geometry(frames: Sequence[Frame]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted order and positions along the normal; raises :class:`SeriesError` for broken stacks."""
    orientations = np.array([f.orientation for f in frames], dtype=np.float64)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        bad = int(np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOLERANCE)[0])
        raise SeriesError("inconsistent_orientation", f"{frames[bad].source} has orientation "
                          f"{list(frames[bad].orientation or ())}, {frames[0].source} has {list(orientations[0])}")
    row, col = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, col)
    positions = np.array([f.position for f in frames], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    in_plane = positions[order] - np.outer(along[order], normal)
    drift = float(np.abs(in_plane - in_plane[0]).max())
    if drift > max(1e-2, 0.5 * min(frames[0].pixel_spacing)):
        raise SeriesError("inconsistent_orientation", f"slices shift by up to {drift:.2f} mm across the "
                          "slice plane (not stacked along their normal)")
    return order, along[order]


def _check_steps(frames: Sequence[Frame], order: np.ndarray, along: np.ndarray) -> float:
    """The slice spacing; raises for duplicated, missing or unevenly spaced slices."""
    steps = np.diff(along)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        a, b = frames[order[dup[0]]].source, frames[order[dup[0] + 1]].source
        raise SeriesError("duplicate_slice", f"{a} and {b} are both at {along[dup[0]]:.3f} mm along the normal")
    step = float(steps.min())  # the nominal spacing: every gap a whole number of it is missing slices
    ratios = steps / step
    gaps = np.flatnonzero((ratios > 1.5) & (np.abs(ratios - np.round(ratios)) < 0.1))
    if gaps.size:
        i = int(gaps[0])
        missing = int(round(ratios[i])) - 1
        raise SeriesError("missing_slice", f"{missing} slice(s) missing between {along[i]:.3f} and "
                          f"{along[i + 1]:.3f} mm ({frames[order[i]].source} .. {frames[order[i + 1]].source}; "
                          f"spacing {step:.3f} mm)")
    worst = float(np.abs(steps - step).max())
    if worst > SPACING_TOLERANCE * step:
        raise SeriesError("inconsistent_spacing", f"slice steps from {steps.min():.3f} to {steps.max():.3f} mm")
    return step


def assemble_volume(frames: Sequence[Frame], *, series_instance_uid: str, study_instance_uid: str = "",
                    modality: str = "", min_slices: int = 1) -> Volume:
    """Stack one series' frames into a :class:`Volume`.

    Raises:
        SeriesError: Mixed sizes, inconsistent orientation or spacing, duplicated or
            missing slices, slices without geometry, or fewer than ``min_slices`` slices.
    """
    if not frames:
        raise SeriesError("too_few_slices", "no slice")
    sizes = sorted({f.pixels.shape for f in frames})
    if len(sizes) > 1:
        raise SeriesError("mixed_sizes", "slices of " + ", ".join(f"{r}x{c}" for r, c in sizes))
    if len(frames) < max(1, min_slices):
        raise SeriesError("too_few_slices", f"{len(frames)} slice(s), at least {min_slices} needed")
    rows, cols = frames[0].pixel_spacing
    if len(frames) == 1 and (frames[0].position is None or frames[0].orientation is None):
        f = frames[0]
        return Volume(series_instance_uid, study_instance_uid, modality, f.pixels[None].copy(),
                      (1.0, rows, cols), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                      (f.sop_instance_uid,), (f.source,))
    lacking = [f.source for f in frames if f.position is None or f.orientation is None]
    if lacking:
        raise SeriesError("no_geometry", f"{len(lacking)} slice(s) lack Image Position/Orientation (Patient), "
                          f"e.g. {lacking[0]}")
    order, along = _geometry(frames)
    step = _check_steps(frames, order, along) if len(frames) > 1 else 1.0
    ordered = [frames[i] for i in order]
    return Volume(
        series_instance_uid=series_instance_uid,
        study_instance_uid=study_instance_uid,
        modality=modality,
        voxels=np.stack([f.pixels for f in ordered]).astype(np.float32),
        spacing=(step, rows, cols),
        origin=ordered[0].position,  # type: ignore[arg-type]
        orientation=ordered[0].orientation,  # type: ignore[arg-type]
        sop_instance_uids=tuple(f.sop_instance_uid for f in ordered),
        sources=tuple(f.source for f in ordered),
    )


def _subgroup(ds: Dataset) -> dict[str, object]:
    from federation.data.dicom.index import patient_age_years  # noqa: PLC0415 - index imports the readers

    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return {"patient_sex": sex if sex in ("F", "M", "O") else "", "patient_age": patient_age_years(ds)}


def read_series(
    paths: Iterable[str | os.PathLike[str]], *, root: str | os.PathLike[str] | None = None, min_slices: int = 1,
    key_patient: Callable[[str], str] | None = None,
) -> tuple[list[Volume], list[SeriesProblem]]:
    """Read DICOM files, group them by Series Instance UID and assemble each series.

    Args:
        paths: The files (non-DICOM files and :data:`NON_IMAGE_MODALITIES` objects are skipped).
        root: Sources are named relative to it (default: as given).
        min_slices: Series with fewer slices are set aside (``too_few_slices``).
        key_patient: PatientID -> its keyed hash (the site's, e.g. with its secret salt); ``None``
            keeps no patient key.

    Returns:
        ``(volumes, problems)``, both sorted by Series Instance UID; every series is in one of them.
    """
    groups: dict[str, list[Frame]] = defaultdict(list)
    info: dict[str, tuple[str, str, str]] = {}
    subgroup: dict[str, dict[str, object]] = {}  # sex and age of the series' patient, from its first file
    unreadable: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for path in paths:
        name = Path(path).relative_to(root).as_posix() if root is not None else str(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001 - not DICOM: not part of any series
            logger.debug("skipping %s: %s", path, exc)
            continue
        if str(ds.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or f"(no series UID: {name})"
        counts[uid] += 1
        info.setdefault(uid, (str(ds.get("StudyInstanceUID", "")), str(ds.get("Modality", "")).upper(),
                              key_patient(str(ds.get("PatientID", "") or "")) if key_patient else ""))
        subgroup.setdefault(uid, _subgroup(ds))
        try:
            groups[uid].extend(dataset_frames(ds, source=name))
        except Exception as exc:  # noqa: BLE001 - an undecodable slice sets the series aside
            unreadable[uid].append(f"{name}: {type(exc).__name__}: {exc}"[:200])
    volumes: list[Volume] = []
    problems: list[SeriesProblem] = []
    for uid in sorted(counts):
        if unreadable[uid]:
            problems.append(SeriesProblem(uid, "unreadable", unreadable[uid][0], counts[uid]))
            continue
        try:
            volume = assemble_volume(groups[uid], series_instance_uid=uid, study_instance_uid=info[uid][0],
                                     modality=info[uid][1], min_slices=min_slices)
            volumes.append(dataclasses.replace(volume, patient_key=info[uid][2], **subgroup[uid]))
        except SeriesError as err:
            problems.append(SeriesProblem(uid, err.reason, err.detail, counts[uid]))
    for problem in problems:
        logger.warning("series %s set aside (%s): %s", problem.series_instance_uid, problem.reason, problem.detail)
    return volumes, problems


def to_unit_cube(volume: Volume, *, shape: tuple[int, int, int]) -> np.ndarray:
    """A volume's voxels min-max scaled to ``[0, 1]`` and resampled (trilinear) to ``shape``; ``float32 (D, H, W)``."""
    import torch  # noqa: PLC0415 - torch only where volumes become model input
    import torch.nn.functional as F  # noqa: PLC0415, N812

    vox = volume.voxels.astype(np.float32)
    lo, hi = float(vox.min()), float(vox.max())
    vox = (vox - lo) / (hi - lo) if hi > lo else np.zeros_like(vox)
    tensor = torch.from_numpy(np.ascontiguousarray(vox))[None, None]
    out = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].clamp_(0.0, 1.0).numpy()
