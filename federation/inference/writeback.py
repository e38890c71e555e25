"""Results back into the PACS: a DICOM Comprehensive SR per source series (highdicom).

A viewer lists the report in the patient's study, next to the series it is about. It
references that series' instances as evidence, carries the score, the predicted class
and the operating point, names the model (name, version, SHA-256 of the exported
program) and is marked as research output, not for clinical use (series description,
a text item, and the title). Segmentation results (DICOM SEG) are not written yet.
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
    """STOW-RS the reports into the PACS (the only write medfed makes to it); returns how many were stored."""
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
