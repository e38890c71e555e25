"""Results back into the PACS: a DICOM Comprehensive SR (classification) or SEG (segmentation) per series (highdicom).

A viewer lists the report in the patient's study, next to the series it is about. It
references that series' instances as evidence, carries the score, the predicted class
and the operating point, names the model (name, version, SHA-256 of the exported
program) and is marked as research output, not for clinical use (series description,
a text item, and the title). A SEG references the segmented images and carries the same
notice and model identity (:func:`segmentation_object`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

logger = logging.getLogger(__name__)

RESEARCH_NOTICE = "medfed research output - NOT FOR CLINICAL USE"
SERIES_NUMBER = 9901
_SCHEME = "99MEDFED"


@dataclass(frozen=True)
class ModelIdentity:
    """What the report says about the model: name, version and the SHA-256 of the exported program."""

    name: str
    version: str
    sha256: str

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ModelIdentity:
        """From an export's ``model.json`` (architecture and run name, round and medfed version, program hash)."""
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            medfed = version("medfed")
        except PackageNotFoundError:
            medfed = "unknown"
        arch = (meta.get("model") or {}).get("name", "model")
        program = str(meta.get("program", "model.pt2"))
        return cls(name=f"medfed {arch} ({meta.get('run', 'run')})",
                   version=f"round {meta.get('round', '?')}, medfed {medfed}",
                   sha256=str((meta.get("sha256") or {}).get(program, "")))


def _code(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept  # noqa: PLC0415

    return CodedConcept(value=value, scheme_designator=_SCHEME, meaning=meaning)


def classification_report(
    *,
    evidence: Sequence[Dataset],
    p_positive: float,
    positive_label: str,
    predicted_label: str,
    threshold: float,
    model: ModelIdentity,
    institution: str = "",
) -> Dataset:
    """A Comprehensive SR with a classification result for the series of ``evidence``.

    Args:
        evidence: The source instances (headers suffice), all of one study.
        p_positive: The model's probability of the positive class (for a series: the mean over its images).
        positive_label: Name of the positive class.
        predicted_label: Name of the predicted class.
        threshold: The operating point (positive when ``p_positive >= threshold``).
        model: The model's name, version and SHA-256.
        institution: InstitutionName of the report.

    Returns:
        The SR dataset, ready for STOW-RS.
    """
    from highdicom.sr import (  # noqa: PLC0415
        CodedConcept,
        ComprehensiveSR,
        ContainerContentItem,
        NumContentItem,
        TextContentItem,
    )

    def text(code: str, meaning: str, value: str) -> Any:
        return TextContentItem(name=_code(code, meaning), value=value, relationship_type="CONTAINS")

    root = ContainerContentItem(name=_code("RESULT", "medfed classification result (research)"))
    unit = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    root.ContentSequence = [
        text("NOTICE", "Notice", RESEARCH_NOTICE),
        NumContentItem(name=_code("P-POS", f"Probability of {positive_label}"), value=round(float(p_positive), 6),
                       unit=unit, relationship_type="CONTAINS"),
        text("PRED", "Predicted class", predicted_label),
        NumContentItem(name=_code("THRESH", "Decision threshold"), value=float(threshold), unit=unit,
                       relationship_type="CONTAINS"),
        text("MODEL", "Model name", model.name),
        text("VERSION", "Model version", model.version),
        text("SHA256", "Model SHA-256", model.sha256),
        text("SERIES", "Source series", str(evidence[0].SeriesInstanceUID)),
    ]
    report = ComprehensiveSR(
        evidence=list(evidence), content=root, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medfed",
        institution_name=institution or None, is_complete=True,
    )
    report.SeriesDescription = RESEARCH_NOTICE[:64]
    report.ManufacturerModelName = model.name[:64]
    report.SoftwareVersions = model.version[:64]
    return report


def store_reports(client: Any, reports: Sequence[Dataset]) -> int:
    """Store the reports into the PACS (STOW-RS or C-STORE: the only write medfed makes to it); returns how many."""
    for report in reports:
        client.store_instances(datasets=[report])
    logger.info("stored %d research report(s) in the PACS", len(reports))
    return len(reports)


def cohort_reports(*, cache_dir: Any, predictions: Sequence[Any], meta: dict[str, Any]) -> list[Dataset]:
    """One report per cached series from per-image predictions (names relative to ``cache_dir``).

    A series' score is the mean of its images' probabilities; its predicted class the
    arg-max of the mean. Images are matched to series through the cache's ``manifest.json``.
    """
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from pydicom import dcmread  # noqa: PLC0415

    root = Path(cache_dir)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    series_of = {entry["path"]: entry["series_instance_uid"] for entry in manifest.values()}
    grouped: dict[str, list[Any]] = {}
    for pred in predictions:
        uid = series_of.get(pred.name.split("#", 1)[0])
        if uid is not None:
            grouped.setdefault(uid, []).append(pred)
    names = list(meta.get("label_names") or [])
    positive = int(meta.get("positive_class", 1))
    model = ModelIdentity.from_meta(meta)
    reports = []
    for uid, preds in sorted(grouped.items()):
        probs = np.mean([p.probs for p in preds], axis=0)
        evidence = [dcmread(root / path, stop_before_pixels=True)
                    for path in sorted({p.name.split("#", 1)[0] for p in preds})]
        label = lambda k: names[k] if k < len(names) else f"class-{k}"  # noqa: E731
        reports.append(classification_report(
            evidence=evidence, p_positive=float(probs[positive]), positive_label=label(positive),
            predicted_label=label(int(np.argmax(probs))), threshold=float(meta.get("threshold", 0.5)), model=model))
    return reports


def segmentation_object(*, source_images: Sequence[Dataset], labelmap: Any, label_names: Sequence[str],
                        model: ModelIdentity) -> Dataset:
    """A DICOM SEG (highdicom, binary segments) of one series from a label map at the images' resolution.

    Args:
        source_images: The series' single-frame images (with pixel data), in the order of ``labelmap``.
        labelmap: ``uint8 (N, rows, columns)``, 0 background, ``k`` the class ``label_names[k]``.
        label_names: Class names, background first.
        model: The model's name, version and SHA-256 (in the algorithm identification).

    Returns:
        The SEG dataset, marked research output (content label, description, series description).
    """
    import numpy as np  # noqa: PLC0415
    from highdicom import AlgorithmIdentificationSequence  # noqa: PLC0415
    from highdicom.seg import Segmentation, SegmentDescription  # noqa: PLC0415
    from highdicom.sr import CodedConcept  # noqa: PLC0415
    from pydicom.sr.codedict import codes  # noqa: PLC0415

    algorithm = AlgorithmIdentificationSequence(name=model.name[:64], family=codes.cid7162.ArtificialIntelligence,
                                                version=model.version[:64], parameters={"sha256": model.sha256})
    category = CodedConcept(value="91723000", scheme_designator="SCT", meaning="Anatomical Structure")
    segments = [
        SegmentDescription(segment_number=k, segment_label=str(name)[:64], segmented_property_category=category,
                           segmented_property_type=_code(f"CLASS-{k}", str(name)[:64]), algorithm_type="AUTOMATIC",
                           algorithm_identification=algorithm)
        for k, name in enumerate(label_names) if k > 0
    ]
    seg = Segmentation(
        source_images=list(source_images), pixel_array=np.asarray(labelmap, dtype=np.uint8),
        segmentation_type="BINARY", segment_descriptions=segments, series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER + 1, sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medfed",
        manufacturer_model_name=model.name[:64], software_versions=model.version[:64], device_serial_number="none",
        content_label="MEDFED_RESEARCH", content_description=RESEARCH_NOTICE[:64], omit_empty_frames=False,
    )
    seg.SeriesDescription = RESEARCH_NOTICE[:64]
    return seg


def cohort_segmentations(*, cache_dir: Any, module: Any, inputs: Sequence[Any], meta: dict[str, Any]) -> list[Dataset]:
    """One SEG per cached series: each image segmented by the exported model, masks resized back (nearest)."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = Path(cache_dir)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    series_of = {entry["path"]: entry["series_instance_uid"] for entry in manifest.values()}
    grouped: dict[str, list[Any]] = {}
    for item in inputs:
        if "#" not in item.name and item.name in series_of:
            grouped.setdefault(series_of[item.name], []).append(item)
    return segment_series(root=root, grouped=grouped, module=module, meta=meta)


def file_segmentations(*, root: Any, module: Any, inputs: Sequence[Any],
                       meta: dict[str, Any]) -> tuple[list[Dataset], dict[str, str]]:
    """``predict --input`` on DICOM files: one SEG per series among ``inputs`` (names relative to ``root``).

    Returns the SEG objects and, by input name, why an input got none (not a single-frame
    DICOM image: a SEG must reference its source instance).
    """
    from pathlib import Path  # noqa: PLC0415

    from pydicom import dcmread  # noqa: PLC0415
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415

    base = Path(root)
    grouped: dict[str, list[Any]] = {}
    skipped: dict[str, str] = {}
    for item in inputs:
        if "#" in item.name:
            skipped[item.name] = "a frame of a multi-frame or .npz input: no single source instance to reference"
            continue
        try:
            header = dcmread(base / item.name, stop_before_pixels=True)
            grouped.setdefault(str(header.SeriesInstanceUID), []).append(item)
        except (InvalidDicomError, AttributeError, OSError) as err:
            skipped[item.name] = f"not a DICOM image with a SeriesInstanceUID ({type(err).__name__})"
    failed: dict[str, str] = {}
    segs = segment_series(root=base, grouped=grouped, module=module, meta=meta, failed=failed)
    for uid, why in failed.items():
        skipped.update({item.name: f"its series' SEG could not be built: {why}" for item in grouped[uid]})
    return segs, skipped


def segment_series(*, root: Any, grouped: dict[str, list[Any]], module: Any, meta: dict[str, Any],
                   failed: dict[str, str] | None = None) -> list[Dataset]:
    """One SEG per series of ``grouped`` (series UID -> inputs under ``root``), masks resized back (nearest).

    A series whose SEG cannot be built (e.g. two slices at one position) raises ValueError,
    or with ``failed`` given is recorded there (series UID -> reason) and the others go on.
    """
    from pathlib import Path  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415, N812
    from pydicom import dcmread  # noqa: PLC0415

    from federation.inference.predict import predict_probabilities  # noqa: PLC0415

    names = list(meta.get("label_names") or [])
    model = ModelIdentity.from_meta(meta)
    out = []
    for uid, items in sorted(grouped.items()):
        sources = [dcmread(Path(root) / item.name) for item in items]
        probs = predict_probabilities(module, np.stack([item.image for item in items]))
        classes = probs.argmax(axis=1).astype(np.uint8)  # (N, h, w)
        size = (int(sources[0].Rows), int(sources[0].Columns))
        labelmap = F.interpolate(torch.from_numpy(classes)[:, None].float(), size=size, mode="nearest")[:, 0]
        k = probs.shape[1]
        try:
            out.append(segmentation_object(
                source_images=sources, labelmap=labelmap.numpy().astype(np.uint8), model=model,
                label_names=names[:k] if len(names) >= k else [f"class-{i}" for i in range(k)]))
        except ValueError as err:  # highdicom's checks of the source images (positions, sizes)
            if failed is None:
                raise
            failed[uid] = str(err)
    return out
