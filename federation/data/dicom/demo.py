"""Write a realistic demo hospital site (DICOM files + labels.csv) from a MedMNIST split.

Every image becomes a DICOM Part 10 file of the IOD a hospital would store it as
(CR / DX for chest X-ray, US for breast ultrasound, ophthalmic secondary capture
for retina photographs), with deterministic fake patients and UIDs, several
scanner vendors and 8- or 16-bit storage. Pixel values round-trip exactly:
:func:`federation.data.dicom.read_image` returns ``source / 255``.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

from federation.data.dicom.labels import DEFAULT_LABELS_NAME
from federation.data.paths import resolve_data_dir

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("sop_instance_uid", "path", "label")
"""Columns of the demo ``labels.csv``."""


@dataclass(frozen=True)
class Scanner:
    """A fake acquisition device: vendor, model, how it stores its images."""

    manufacturer: str
    model: str
    modality: str
    sop_class: str
    bits: int = 8


@dataclass(frozen=True)
class DemoSource:
    """How the images of one MedMNIST flag are dressed up as DICOM."""

    scanners: tuple[Scanner, ...]
    body_part: str
    study_description: str
    spacing_mm: float | None
    ages: tuple[int, int]
    sex: str | None = None
    photometric: str = "MONOCHROME2"


DEMO_SOURCES: dict[str, DemoSource] = {
    "pneumoniamnist": DemoSource(
        scanners=(
            Scanner("Agfa", "CR 85-X", "CR", ComputedRadiographyImageStorage, 8),
            Scanner("FUJIFILM Corporation", "FCR CAPSULA XLII", "CR", ComputedRadiographyImageStorage, 16),
            Scanner("Carestream Health", "DRX-Evolution", "DX", DigitalXRayImageStorageForPresentation, 16),
            Scanner("Siemens Healthineers", "Ysio Max", "DX", DigitalXRayImageStorageForPresentation, 8),
        ),
        body_part="CHEST",
        study_description="XR CHEST AP PEDIATRIC",
        spacing_mm=9.0,
        ages=(1, 5),
    ),
    "breastmnist": DemoSource(
        scanners=(
            Scanner("GE Healthcare", "LOGIQ E10", "US", UltrasoundImageStorage),
            Scanner("Philips", "EPIQ 7", "US", UltrasoundImageStorage),
            Scanner("Canon Medical Systems", "Aplio i800", "US", UltrasoundImageStorage),
        ),
        body_part="BREAST",
        study_description="US BREAST",
        spacing_mm=1.8,
        ages=(25, 75),
        sex="F",
    ),
    "retinamnist": DemoSource(
        scanners=(
            Scanner("Topcon", "TRC-NW400", "OP", SecondaryCaptureImageStorage),
            Scanner("Carl Zeiss Meditec", "VISUCAM 500", "OP", SecondaryCaptureImageStorage),
        ),
        body_part="EYE",
        study_description="FUNDUS PHOTOGRAPHY",
        spacing_mm=None,
        ages=(40, 85),
        photometric="RGB",
    ),
}
"""Supported ``source`` values of :func:`make_demo_site`."""

_FIRST = {
    "F": ("Anna", "Maria", "Sofia", "Lena", "Emma", "Julia", "Clara", "Ines", "Nora", "Eva", "Mia", "Lucia"),
    "M": ("Paul", "Lukas", "Jonas", "Elias", "Felix", "Noah", "Leon", "David", "Tomas", "Karl", "Hugo", "Oscar"),
}
_LAST = ("Smith", "Muller", "Garcia", "Rossi", "Dubois", "Novak", "Jansen", "Silva", "Berg", "Kowalski",
         "Nielsen", "Moreau", "Fischer", "Lopez", "Weber", "Costa")


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _patient(ds: Dataset, rng: np.random.Generator, spec: DemoSource, patient_id: str, when: dt.date) -> None:
    sex = spec.sex or str(rng.choice(["F", "M"]))
    ds.PatientName = f"{rng.choice(_LAST)}^{rng.choice(_FIRST[sex])}"
    ds.PatientID = patient_id
    age = int(rng.integers(spec.ages[0], spec.ages[1] + 1))
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientBirthDate = (when - dt.timedelta(days=365 * age + int(rng.integers(0, 365)))).strftime("%Y%m%d")
    ds.PatientSex = sex


def _image_dataset(
    pixels: np.ndarray, *, spec: DemoSource, scanner: Scanner, key: tuple[object, ...],
    rng: np.random.Generator, patient_id: str, number: int, institution: str,
) -> Dataset:
    """Build one DICOM dataset (with file meta) holding ``pixels`` (uint8, HxW or HxWx3)."""
    sop_uid = _uid(*key, "image")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = scanner.sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    when = dt.date(2020, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
    ds.SOPClassUID, ds.SOPInstanceUID = scanner.sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(*key, "study"), _uid(*key, "series")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00"
    ds.AccessionNumber, ds.StudyID = f"ACC{number:07d}", f"{number}"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = scanner.modality, scanner.manufacturer, scanner.model
    ds.InstitutionName, ds.StudyDescription, ds.BodyPartExamined = institution, spec.study_description, spec.body_part
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    _patient(ds, rng, spec, patient_id, when)
    if scanner.sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "DI"
    if scanner.bits == 16:
        stored = pixels.astype(np.uint16) * np.uint16(257)  # v/255 == v*257/65535 exactly
    else:
        stored = pixels.astype(np.uint8)
    ds.set_pixel_data(stored, spec.photometric, scanner.bits, generate_instance_uid=False)
    if spec.spacing_mm is not None:
        spacing = round(spec.spacing_mm * float(rng.uniform(0.9, 1.1)), 4)
        ds.PixelSpacing = [spacing, spacing]
        if scanner.modality in ("CR", "DX"):
            ds.ImagerPixelSpacing = [spacing, spacing]
    if scanner.modality == "DX":
        _dx_presentation(ds, scanner.bits)
    return ds


def _dx_presentation(ds: Dataset, bits: int) -> None:
    """DX 'for presentation': identity rescale and a window that maps stored values onto themselves."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2 ** (bits - 1), 2**bits
    ds.VOILUTFunction = "LINEAR"


def _npz_path(source: str, data_dir_of_npz: str | os.PathLike[str] | None) -> Path:
    base = Path(data_dir_of_npz).expanduser() if data_dir_of_npz else resolve_data_dir("")
    return base if base.suffix == ".npz" else base / f"{source}.npz"


def make_demo_site(
    *,
    source: str = "pneumoniamnist",
    data_dir_of_npz: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str],
    split: str = "train",
    count: int = 100,
    seed: int = 0,
    institution: str = "medfed Demo Hospital",
    overwrite: bool = False,
) -> Path:
    """Write ``count`` images of a MedMNIST split as a DICOM site folder with ``labels.csv``.

    Args:
        source: A key of :data:`DEMO_SOURCES` (``pneumoniamnist``, ``breastmnist``, ``retinamnist``).
        data_dir_of_npz: Folder holding ``<source>.npz`` (or the ``.npz`` itself);
            ``None``: :func:`federation.data.resolve_data_dir` (``$MEDFED_DATA_DIR``).
        out_dir: The site folder to create.
        split: ``train``, ``val`` or ``test``.
        count: Number of images (chosen at random without replacement).
        seed: Seed of the choice, fake patients, vendors and UIDs (same seed, same site).
        institution: InstitutionName written into every file.
        overwrite: Allow writing into a non-empty ``out_dir``.

    Returns:
        ``out_dir``; images under ``out_dir/images/<PatientID>/``, labels in
        ``out_dir/labels.csv`` (columns ``sop_instance_uid, path, label``).

    Raises:
        ValueError: Unknown source or split, or ``count`` outside ``[1, split size]``.
        FileNotFoundError: The ``.npz`` file is missing.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
    """
    if source not in DEMO_SOURCES:
        raise ValueError(f"unknown demo source {source!r}; choose from {', '.join(sorted(DEMO_SOURCES))}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    npz = _npz_path(source, data_dir_of_npz)
    if not npz.is_file():
        raise FileNotFoundError(f"{npz} not found (set --data-dir or $MEDFED_DATA_DIR to the folder of {source}.npz)")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass overwrite=True / --force)")
    with np.load(npz, allow_pickle=False) as data:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
    if not 1 <= count <= len(labels):
        raise ValueError(f"count must be in [1, {len(labels)}] for {source} {split}, got {count}")
    spec = DEMO_SOURCES[source]
    rng = np.random.default_rng([seed, 7])
    chosen = np.sort(rng.choice(len(labels), size=count, replace=False))
    rows: list[tuple[str, str, int]] = []
    for number, src_index in enumerate(chosen, start=1):
        key = ("medfed-demo", source, split, seed, int(src_index))
        scanner = spec.scanners[int(rng.integers(len(spec.scanners)))]
        patient_id = f"MF{seed % 100:02d}{int(src_index):06d}"
        ds = _image_dataset(images[src_index], spec=spec, scanner=scanner, key=key, rng=rng,
                            patient_id=patient_id, number=number, institution=institution)
        rel = f"images/{patient_id}/{scanner.modality}_{number:05d}.dcm"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out / rel, enforce_file_format=True)
        rows.append((str(ds.SOPInstanceUID), rel, int(labels[src_index])))
    with open(out / DEFAULT_LABELS_NAME, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)
    logger.info("wrote demo site %s: %d %s %s images", out, count, source, split)
    return out
