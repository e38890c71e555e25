"""What a site data check found: reason codes, quarantined files and the :class:`SiteReport`."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Reason(str, Enum):
    """Why a file (or a label row) was set aside. The value is a stable code."""

    NOT_DICOM = "not_dicom"
    UNREADABLE = "unreadable"
    TRUNCATED = "truncated"
    NO_PIXEL_DATA = "no_pixel_data"
    NO_DECODER = "no_decoder"
    UNSUPPORTED = "unsupported"
    DECODE_ERROR = "decode_error"
    WRONG_MODALITY = "wrong_modality"
    DUPLICATE = "duplicate"
    UNLABELED = "unlabeled"
    BAD_LABEL = "bad_label"
    MISSING_IMAGE = "missing_image"

    @property
    def text(self) -> str:
        """One-line human explanation of the code."""
        return REASON_TEXT[self]


REASON_TEXT: dict[Reason, str] = {
    Reason.NOT_DICOM: "not a DICOM file (no 'DICM' preamble / file meta information)",
    Reason.UNREADABLE: "DICOM header could not be parsed",
    Reason.TRUNCATED: "file ends before its pixel data does",
    Reason.NO_PIXEL_DATA: "no Pixel Data element (not an image)",
    Reason.NO_DECODER: "compressed pixel data and no installed decoder for it",
    Reason.UNSUPPORTED: "image layout or transfer syntax medfed cannot use",
    Reason.DECODE_ERROR: "pixel data could not be decoded",
    Reason.WRONG_MODALITY: "modality not among the allowed ones",
    Reason.DUPLICATE: "same SOP Instance UID as another file",
    Reason.UNLABELED: "image has no row in the labels CSV",
    Reason.BAD_LABEL: "label value unknown or contradictory",
    Reason.MISSING_IMAGE: "labels CSV row matches no image file",
}


@dataclass(frozen=True)
class QuarantinedFile:
    """One file (or labels CSV row) that is not used, and why.

    Attributes:
        path: Path relative to the site folder; for :attr:`Reason.MISSING_IMAGE`
            the CSV key (a SOP Instance UID or a path) that matched nothing.
        reason: The reason code.
        detail: Specific explanation (e.g. the decoder packages to install).
    """

    path: str
    reason: Reason
    detail: str = ""


@dataclass
class SiteReport:
    """Summary of one hospital's DICOM folder after indexing, labelling and filtering.

    Counts over *usable* images unless the name says otherwise.

    Attributes:
        data_dir: The site folder.
        labels_csv: The labels file.
        files_scanned: Files looked at under ``data_dir``.
        usable: Images that pass every check.
        samples: Training samples they give (more than ``usable`` with ``frames="all"``).
        label_names: Class names, in class-index order.
        label_counts: Usable images per class name (every class listed).
        modalities: Usable images per Modality.
        image_sizes: Usable images per ``"<rows>x<columns>"``.
        manufacturers: Usable images per Manufacturer (``"(unknown)"`` if absent).
        transfer_syntaxes: Usable images per transfer syntax name.
        quarantined: Every file or CSV row set aside, with its reason.
        index_parsed: Headers parsed for this report (not found in the index cache).
        index_reused: Headers taken from the index cache.
        index_path: Where the index cache lives (``""`` if it could not be written).
        pixels_checked: Whether pixel data was decoded (else header checks only).
    """

    data_dir: str
    labels_csv: str
    files_scanned: int = 0
    usable: int = 0
    samples: int = 0
    label_names: tuple[str, ...] = ()
    label_counts: dict[str, int] = field(default_factory=dict)
    modalities: dict[str, int] = field(default_factory=dict)
    image_sizes: dict[str, int] = field(default_factory=dict)
    manufacturers: dict[str, int] = field(default_factory=dict)
    transfer_syntaxes: dict[str, int] = field(default_factory=dict)
    quarantined: list[QuarantinedFile] = field(default_factory=list)
    index_parsed: int = 0
    index_reused: int = 0
    index_path: str = ""
    pixels_checked: bool = False

    @property
    def ok(self) -> bool:
        """True when at least one usable image remains."""
        return self.usable > 0

    @property
    def reason_counts(self) -> dict[str, int]:
        """Quarantined items per reason code, most frequent first."""
        return dict(Counter(q.reason.value for q in self.quarantined).most_common())

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (reasons as their codes)."""
        out = asdict(self)
        out["label_names"] = list(self.label_names)
        out["quarantined"] = [
            {"path": q.path, "reason": q.reason.value, "detail": q.detail} for q in self.quarantined
        ]
        out["reason_counts"] = self.reason_counts
        out["ok"] = self.ok
        return out


def _breakdown_table(report: SiteReport) -> Any:
    from rich.table import Table

    table = Table(title="Usable images by", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", style="cyan", overflow="fold")
    table.add_column("images", justify="right")
    sections = [
        ("label", report.label_counts),
        ("modality", report.modalities),
        ("size", report.image_sizes),
        ("manufacturer", report.manufacturers),
        ("transfer syntax", report.transfer_syntaxes),
    ]
    for name, counts in sections:
        for i, (key, value) in enumerate(counts.items() or [("(none)", 0)]):
            table.add_row(name if i == 0 else "", key, str(value), end_section=i == max(len(counts), 1) - 1)
    return table


def render_site_report(report: SiteReport, *, max_quarantined: int = 50) -> Any:
    """Build a rich renderable (a ``Group`` of tables) for a :class:`SiteReport`.

    Args:
        report: The report.
        max_quarantined: Quarantined rows listed individually; the rest are counted.

    Returns:
        A ``rich.console.Group`` to pass to ``Console.print``.
    """
    from rich.console import Group
    from rich.table import Table

    status = "[bold green]OK[/]" if report.ok else "[bold red]NOTHING USABLE[/]"
    summary = Table(title=f"Site check: {report.data_dir}", title_justify="left", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("status", status)
    summary.add_row("labels", report.labels_csv)
    summary.add_row("files scanned", str(report.files_scanned))
    summary.add_row("usable images", str(report.usable))
    summary.add_row("training samples", str(report.samples))
    summary.add_row("quarantined", str(len(report.quarantined)))
    summary.add_row("pixel data checked", "yes" if report.pixels_checked else "no (headers only)")
    summary.add_row("index", f"{report.index_path or '(not cached)'} "
                    f"({report.index_reused} reused, {report.index_parsed} parsed)")

    parts: list[Any] = [summary, _breakdown_table(report)]
    if report.quarantined:
        reasons = ", ".join(f"{code}: {n}" for code, n in report.reason_counts.items())
        table = Table(title=f"Quarantined files ({reasons})", title_justify="left")
        table.add_column("path", overflow="fold")
        table.add_column("reason", style="yellow")
        table.add_column("detail", overflow="fold")
        for item in report.quarantined[:max_quarantined]:
            table.add_row(item.path, item.reason.value, item.detail or item.reason.text)
        hidden = len(report.quarantined) - max_quarantined
        if hidden > 0:
            table.add_row(f"... {hidden} more", "", "")
        parts.append(table)
    return Group(*parts)
