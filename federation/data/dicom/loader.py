"""Turn a site folder of DICOM files plus a labels CSV into checked, model-ready arrays.

:func:`check_site` reports what a site holds and what it cannot use;
:func:`load_dicom_site` returns the usable images; :func:`load_dicom_splits` is
the dataset-registry loader (``loader(*, config, data_dir, seed) -> DatasetSplits``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import UID

from federation.data.dicom.index import FileRecord, SiteIndex, build_index
from federation.data.dicom.labels import (
    DEFAULT_KEY_COLUMN,
    DEFAULT_LABEL_COLUMN,
    DEFAULT_LABELS_NAME,
    LabelTable,
    read_labels,
)
from federation.data.dicom.reader import (
    Frames,
    Normalize,
    decoder_problem,
    frame_indices,
    install_hint,
    match_channels,
    read_image,
    resize_image,
)
from federation.data.dicom.report import QuarantinedFile, Reason, SiteReport

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 4
"""Threads decoding pixel data (pydicom and numpy release the GIL for much of it)."""


@dataclass(frozen=True, kw_only=True)
class DicomReadOptions:
    """How a site folder's DICOM files are selected and read: one object for :func:`check_site`,
    :func:`load_dicom_site`, :func:`load_site_samples` and :func:`load_site_sample_set`.

    Attributes:
        key_column: CSV column with each image's SOP Instance UID or relative path.
        label_column: CSV column with the class.
        modalities: Allowed Modality values (empty: all).
        label_names: Class names in index order (empty: inferred from the CSV).
        frames: ``"first"``, ``"middle"`` or ``"all"`` frames of multi-frame images
            (each frame a sample with the image's label).
        cache_dir: Where the header index is cached (``None``: inside the data folder).
        channels: 1 or 3 output channels; 0 picks the majority of the usable images
            and converts the rest (gray repeated, colour to luma).
        normalize: Display-value scaling, see :func:`federation.data.dicom.read_image`.
        workers: Decoding threads.
        patient_salt: Keys the PatientID hashes (the split groups) with the site's secret
            (:func:`federation.data.dicom.confine.site_salt`); empty keeps the plain hash.
    """

    key_column: str = DEFAULT_KEY_COLUMN
    label_column: str = DEFAULT_LABEL_COLUMN
    modalities: Collection[str] = ()
    label_names: Sequence[str] = ()
    frames: Frames = "first"
    cache_dir: str | os.PathLike[str] | None = None
    channels: int = 0
    normalize: Normalize = "auto"
    workers: int = DEFAULT_WORKERS
    patient_salt: bytes = b""


_DEFAULTS = DicomReadOptions()


@dataclass(frozen=True)
class SiteItem:
    """A usable image: its index record and class index."""

    record: FileRecord
    label: int

    @property
    def group(self) -> str:
        """Patient (hashed ID), else study, else file: images of one group stay in one split."""
        rec = self.record
        return rec.patient_key or rec.study_instance_uid or rec.path


@dataclass
class _Selection:
    index: SiteIndex
    table: LabelTable
    items: list[SiteItem]
    quarantined: list[QuarantinedFile]


def _labels_path(data_dir: Path, labels_csv: str | os.PathLike[str] | None) -> Path:
    if labels_csv is None or str(labels_csv) == "":
        return data_dir / DEFAULT_LABELS_NAME
    path = Path(labels_csv).expanduser()
    if not path.is_absolute() and not path.exists() and (data_dir / path).exists():
        return data_dir / path
    return path


def _decoder_reason(tsyntax: str, cache: dict[str, tuple[Reason, str] | None]) -> tuple[Reason, str] | None:
    if tsyntax not in cache:
        try:
            problem = decoder_problem(tsyntax)
            cache[tsyntax] = (Reason.NO_DECODER, problem) if problem else None
        except NotImplementedError:
            cache[tsyntax] = (Reason.UNSUPPORTED, f"pydicom has no decoder for transfer syntax {tsyntax}")
    return cache[tsyntax]


def _label_of(rec: FileRecord, table: LabelTable) -> tuple[int, None] | tuple[None, tuple[Reason, str]]:
    keys = [k for k in (rec.path, rec.sop_instance_uid) if k]
    values = {table.labels[k] for k in keys if k in table.labels}
    if not values:
        why = "its label cell is empty" if any(k in table.empty for k in keys) else "no row in the labels CSV"
        return None, (Reason.UNLABELED, f"{why} (SOP Instance UID {rec.sop_instance_uid or '-'}, path {rec.path})")
    conflicting = set(values)
    for key in keys:
        conflicting.update(table.conflicts.get(key, ()))
    if len(conflicting) > 1:
        return None, (Reason.BAD_LABEL, f"listed with different labels: {', '.join(sorted(conflicting))}")
    value = values.pop()
    label = table.encode(value)
    if label is None:
        return None, (Reason.BAD_LABEL, f"label {value!r} is not one of the classes {list(table.label_names)}")
    return label, None


def _judge(
    rec: FileRecord,
    table: LabelTable,
    allowed: set[str],
    decoders: dict[str, tuple[Reason, str] | None],
    first_of_uid: dict[str, str],
) -> tuple[int, None] | tuple[None, tuple[Reason, str]]:
    """The class index of a file, or the first problem that stops its use."""
    if not rec.ok:
        return None, (Reason(rec.reason), rec.detail)
    problem = _decoder_reason(rec.transfer_syntax, decoders)
    if problem is None and allowed and rec.modality not in allowed:
        wanted = ", ".join(sorted(allowed))
        problem = (Reason.WRONG_MODALITY, f"modality {rec.modality or '(none)'} not in {wanted}")
    if problem is None and rec.sop_instance_uid:
        first = first_of_uid.setdefault(rec.sop_instance_uid, rec.path)
        if first != rec.path:
            problem = (Reason.DUPLICATE, f"same SOP Instance UID as {first}")
    if problem is not None:
        return None, problem
    return _label_of(rec, table)


def select_usable(
    index: SiteIndex, table: LabelTable, *, modalities: Collection[str] | None = None
) -> tuple[list[SiteItem], list[QuarantinedFile]]:
    """Apply the header, decoder, modality, duplicate and label checks to an index.

    Args:
        index: The site's header index.
        table: The labels CSV.
        modalities: Allowed Modality values (case-insensitive); empty or ``None`` allows all.

    Returns:
        ``(usable items, quarantined)``; every file and every unmatched CSV key ends up
        in exactly one of the two lists.
    """
    allowed = {m.strip().upper() for m in (modalities or ()) if m.strip()}
    decoders: dict[str, tuple[Reason, str] | None] = {}
    first_of_uid: dict[str, str] = {}
    matched: set[str] = set()
    items: list[SiteItem] = []
    quarantined: list[QuarantinedFile] = []
    for rec in index.records:
        matched.update(k for k in (rec.path, rec.sop_instance_uid) if k)
        label, problem = _judge(rec, table, allowed, decoders, first_of_uid)
        if problem is not None:
            quarantined.append(QuarantinedFile(path=rec.path, reason=problem[0], detail=problem[1]))
        elif label is not None:
            items.append(SiteItem(record=rec, label=label))
    for key in sorted((set(table.labels) | table.empty) - matched):
        quarantined.append(
            QuarantinedFile(path=key, reason=Reason.MISSING_IMAGE, detail="no file with this SOP Instance UID or path")
        )
    return items, quarantined


def _select(data_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None, *,
            options: DicomReadOptions, use_cache: bool = True) -> _Selection:
    root = Path(data_dir).expanduser().resolve()
    csv_path = _labels_path(root, labels_csv)
    table = read_labels(csv_path, key_column=options.key_column, label_column=options.label_column,
                        label_names=options.label_names or None)
    index = build_index(root, cache_dir=options.cache_dir, use_cache=use_cache, exclude=(csv_path,),
                        patient_salt=options.patient_salt)
    items, quarantined = select_usable(index, table, modalities=options.modalities or None)
    return _Selection(index=index, table=table, items=items, quarantined=quarantined)


def _decode_all(
    root: Path,
    items: Sequence[SiteItem],
    *,
    frames: Frames,
    normalize: Normalize,
    workers: int,
    handle: Callable[[int, np.ndarray], None],
) -> tuple[list[int], list[QuarantinedFile]]:
    """Decode every item (threaded, in order); pass images to ``handle``; return ok positions, failures."""

    def decode(item: SiteItem) -> np.ndarray | QuarantinedFile:
        rec = item.record
        try:
            return read_image(root / rec.path, frames=frames, num_frames=rec.frames,
                              transfer_syntax=rec.transfer_syntax, normalize=normalize)
        except Exception as exc:  # noqa: BLE001 - a bad file must never stop the site
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            hint = install_hint(rec.transfer_syntax) if UID(rec.transfer_syntax).is_compressed else ""
            if hint:
                detail += f" (another decoder may read it: {hint})"
            return QuarantinedFile(path=rec.path, reason=Reason.DECODE_ERROR, detail=detail)

    ok: list[int] = []
    failed: list[QuarantinedFile] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for pos, result in enumerate(pool.map(decode, items)):
            if isinstance(result, QuarantinedFile):
                failed.append(result)
            else:
                handle(pos, result)
                ok.append(pos)
    return ok, failed


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(Counter(values).most_common())


def _report(sel: _Selection, items: Sequence[SiteItem], extra: list[QuarantinedFile], *,
            samples: int, pixels_checked: bool) -> SiteReport:
    names = sel.table.label_names
    per_label = Counter(item.label for item in items)
    recs = [item.record for item in items]
    return SiteReport(
        data_dir=str(sel.index.data_dir),
        labels_csv=str(sel.table.path),
        files_scanned=len(sel.index.records),
        usable=len(items),
        samples=samples,
        label_names=names,
        label_counts={name: per_label.get(i, 0) for i, name in enumerate(names)},
        modalities=_counts(r.modality or "(none)" for r in recs),
        image_sizes=_counts(f"{r.rows}x{r.columns}" + (f"x{r.frames}f" if r.frames > 1 else "") for r in recs),
        manufacturers=_counts(r.manufacturer or "(unknown)" for r in recs),
        transfer_syntaxes=_counts(UID(r.transfer_syntax).name for r in recs),
        quarantined=sorted(sel.quarantined + extra, key=lambda q: (q.path, q.reason.value)),
        index_parsed=sel.index.parsed,
        index_reused=sel.index.reused,
        index_path=str(sel.index.path or ""),
        pixels_checked=pixels_checked,
    )


def check_site(
    data_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    *,
    options: DicomReadOptions = _DEFAULTS,
    decode: bool = True,
) -> SiteReport:
    """Check a hospital's DICOM folder against its labels CSV; never raises for bad files.

    Args:
        data_dir: The site folder (searched recursively).
        labels_csv: The labels CSV; ``None`` means ``<data_dir>/labels.csv``. A relative
            path that does not exist from the working directory is tried inside ``data_dir``.
        options: How the files are selected and read (its ``frames`` gives the sample count;
            ``channels`` and ``normalize`` do not apply).
        decode: Also decode every usable image's pixel data (catches corrupt
            compressed data); ``False`` checks headers only.

    Returns:
        The :class:`SiteReport`; ``report.ok`` is false when nothing usable remains.

    Raises:
        FileNotFoundError: The labels CSV does not exist.
        NotADirectoryError: ``data_dir`` is not a folder.
        ValueError: A CSV column is missing or fewer than two classes are known.
    """
    sel = _select(data_dir, labels_csv, options=options)
    failed: list[QuarantinedFile] = []
    items = sel.items
    if decode and items:
        ok, failed = _decode_all(sel.index.data_dir, items, frames=options.frames, normalize="auto",
                                 workers=options.workers, handle=lambda pos, img: None)
        items = [items[i] for i in ok]
    samples = sum(len(frame_indices(item.record.frames, options.frames)) for item in items)
    report = _report(sel, items, failed, samples=samples, pixels_checked=decode)
    logger.info("site %s: %d usable, %d quarantined", report.data_dir, report.usable, len(report.quarantined))
    return report


def _choose_channels(items: Sequence[SiteItem], channels: int) -> int:
    if channels in (1, 3):
        return channels
    if channels != 0:
        raise ValueError(f"channels must be 0 (auto), 1 or 3, got {channels}")
    color = sum(1 for it in items if it.record.samples_per_pixel == 3 or it.record.photometric == "PALETTE COLOR")
    return 3 if color > len(items) - color else 1


SEX_CODES = {"F": 0, "M": 1, "O": 2}
"""Codes of ``SiteSamples.sex`` (-1 unknown); the same as :data:`federation.metrics.clinical.SEX_CODES`."""


@dataclass(frozen=True, eq=False)
class SiteSamples:
    """A site's usable samples with their split groups and subgroup attributes.

    Attributes:
        images: ``float32 (N, C, H, W)`` in ``[0, 1]``.
        labels: ``int64 (N,)``.
        groups: Hashed patient ID, study UID or file path of each sample (for splits).
        sex: ``int8 (N,)`` codes of :data:`SEX_CODES`, -1 unknown.
        age: ``int16 (N,)`` age in whole years, -1 unknown.
        paths: Each sample's file, relative to the site folder.
        report: The site report.
    """

    images: np.ndarray
    labels: np.ndarray
    groups: list[str]
    sex: np.ndarray
    age: np.ndarray
    paths: list[str]
    report: SiteReport
    native_channels: int = 0
    """Channels most usable images have as stored (1 or 3), before any conversion to ``channels``."""


def load_site_samples(
    data_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    *,
    image_size: int,
    options: DicomReadOptions = _DEFAULTS,
) -> tuple[np.ndarray, np.ndarray, list[str], SiteReport]:
    """Like :func:`load_dicom_site`, also returning each sample's split group.

    Returns:
        ``(images, labels, groups, report)``; ``groups[i]`` is the hashed patient ID,
        study UID or file path of sample ``i``. :func:`load_site_sample_set` also
        gives the subgroup attributes.
    """
    samples = load_site_sample_set(data_dir, labels_csv, image_size=image_size, options=options)
    return samples.images, samples.labels, samples.groups, samples.report


def load_site_sample_set(
    data_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    *,
    image_size: int,
    options: DicomReadOptions = _DEFAULTS,
) -> SiteSamples:
    """Load every usable labelled image with its split group and sex/age (see :func:`load_dicom_site`)."""
    sel = _select(data_dir, labels_csv, options=options)
    items = sel.items
    frames = options.frames
    chans = _choose_channels(items, options.channels)
    counts = [len(frame_indices(it.record.frames, frames)) for it in items]
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    images = np.zeros((int(starts[-1]), chans, image_size, image_size), dtype=np.float32)
    filled = np.zeros(len(images), dtype=bool)

    def handle(pos: int, img: np.ndarray) -> None:
        img = resize_image(match_channels(img, chans), size=image_size)
        start, n = int(starts[pos]), min(len(img), counts[pos])
        images[start : start + n] = img[:n]
        filled[start : start + n] = True

    ok, failed = _decode_all(sel.index.data_dir, items, frames=frames, normalize=options.normalize,
                             workers=options.workers, handle=handle)
    used = [items[i] for i in ok]

    def per_sample(values: Sequence[Any], dtype: Any) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=dtype), counts)[filled]

    labels = per_sample([it.label for it in items], np.int64)
    sex = per_sample([SEX_CODES.get(it.record.patient_sex, -1) for it in items], np.int8)
    age = per_sample([it.record.patient_age for it in items], np.int16)
    keep = np.flatnonzero(filled)
    groups_all = [g for it, n in zip(items, counts) for g in [it.group] * n]
    paths_all = [p for it, n in zip(items, counts) for p in [it.record.path] * n]
    report = _report(sel, used, failed, samples=int(filled.sum()), pixels_checked=True)
    return SiteSamples(
        images=np.ascontiguousarray(images[filled]),
        labels=labels,
        groups=[groups_all[i] for i in keep],
        sex=sex,
        age=age,
        paths=[paths_all[i] for i in keep],
        report=report,
        native_channels=_choose_channels(items, 0) if items else 0,
    )


def load_dicom_site(
    data_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    *,
    image_size: int,
    options: DicomReadOptions = _DEFAULTS,
) -> tuple[np.ndarray, np.ndarray, SiteReport]:
    """Load every usable labelled image of a site, resized and scaled to ``[0, 1]``.

    Bad files are quarantined (listed in the report), never raised.

    Args:
        data_dir: The site folder.
        labels_csv: The labels CSV (``None``: ``<data_dir>/labels.csv``).
        image_size: Output side length.
        options: How the files are selected and read (:class:`DicomReadOptions`).

    Returns:
        ``(images float32 (N, C, H, W), labels int64 (N,), report)``.

    Raises:
        FileNotFoundError: The labels CSV does not exist.
        NotADirectoryError: ``data_dir`` is not a folder.
        ValueError: A CSV column is missing or fewer than two classes are known.
    """
    images, labels, _, report = load_site_samples(data_dir, labels_csv, image_size=image_size, options=options)
    return images, labels, report
