"""A cached header index of a site's DICOM folder.

Headers are read once with ``stop_before_pixels=True`` and stored, one record per
file, in a JSON index (default ``<data folder>/.medfed-index.json``). A record is
reused while the file's signature (relative path, size, ``mtime_ns``) is unchanged,
so a 10k-file site does not re-parse its headers every round. Records hold only
file-intrinsic facts and problems; label, modality and decoder checks are applied
afterwards, so changing those settings (or installing a decoder) never needs a
rebuild. No patient-identifying values are stored (patient IDs only as a hash,
keyed at a real site with its secret salt: :func:`federation.data.dicom.confine.patient_key`);
sex and age in whole years are kept for subgroup evaluation, which only ever sends
aggregates of groups of at least ``clinical.min_group_size`` patients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

from federation.data.dicom.confine import patient_key, salt_fingerprint
from federation.data.dicom.reader import SUPPORTED_PHOTOMETRICS
from federation.data.dicom.report import Reason

logger = logging.getLogger(__name__)

INDEX_FILENAME = ".medfed-index.json"
"""Index file name inside the site folder (the default location)."""

INDEX_FORMAT = "medfed-dicom-index"
INDEX_VERSION = 2
"""Bump whenever :func:`read_header` records or judges differently: old indexes are then rebuilt."""

IGNORED_SUFFIXES = frozenset({".csv", ".tsv", ".json", ".jsonl", ".txt", ".md", ".log", ".yaml", ".yml"})
"""Side-car files in a site folder that are never DICOM and are not reported."""
IGNORED_NAMES = frozenset({"DICOMDIR"})

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_UNDEFINED = 0xFFFFFFFF
_TAIL_BYTES = 1 << 16


@dataclass(frozen=True)
class FileRecord:
    """Header facts of one file under the site folder.

    Attributes:
        path: POSIX path relative to the site folder.
        size: File size in bytes (part of the signature).
        mtime_ns: Modification time in ns (part of the signature).
        reason: ``""`` when the header is fine, else a :class:`Reason` code.
        detail: Explanation of ``reason``.
        sop_instance_uid, sop_class_uid, modality, manufacturer, transfer_syntax,
        photometric, study_instance_uid, series_instance_uid: Header values (``""`` if absent).
        rows, columns, frames, samples_per_pixel, bits_allocated, bits_stored: Image
            pixel module values (0 if absent).
        patient_key: Short SHA-256 of PatientID (for patient-level splits), ``""`` if absent.
        patient_sex: ``"F"``, ``"M"``, ``"O"`` from PatientSex, ``""`` if absent or other.
        patient_age: Age in whole years from PatientAge (``nnnY/M/W/D``), else from
            PatientBirthDate and the study date; -1 if unknown.
    """

    path: str
    size: int
    mtime_ns: int
    reason: str = ""
    detail: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    manufacturer: str = ""
    transfer_syntax: str = ""
    photometric: str = ""
    rows: int = 0
    columns: int = 0
    frames: int = 1
    samples_per_pixel: int = 1
    bits_allocated: int = 0
    bits_stored: int = 0
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    patient_key: str = ""
    patient_sex: str = ""
    patient_age: int = -1

    @property
    def ok(self) -> bool:
        """True when the header raised no problem."""
        return not self.reason


@dataclass
class SiteIndex:
    """The index of one site folder.

    Attributes:
        data_dir: The site folder (absolute).
        records: One record per scanned file, sorted by path.
        parsed: Headers parsed in this call.
        reused: Records reused from the cache.
        path: The index file, or ``None`` if it could not be read or written.
    """

    data_dir: Path
    records: list[FileRecord]
    parsed: int
    reused: int
    path: Path | None


def index_path_for(data_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return where the index of ``data_dir`` is cached.

    Args:
        data_dir: The site folder.
        cache_dir: A folder for index files; ``None`` keeps the index in the site folder.

    Returns:
        ``<data_dir>/.medfed-index.json``, or ``<cache_dir>/medfed-index-<name>-<hash>.json``
        (hash of the absolute site path, so several sites can share a cache folder).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if cache_dir is None or str(cache_dir) == "":
        return data_dir / INDEX_FILENAME
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser().resolve() / f"medfed-index-{data_dir.name}-{digest}.json"


def scan_files(data_dir: Path, *, exclude: frozenset[Path] = frozenset()) -> list[tuple[str, Path, os.stat_result]]:
    """List candidate files under ``data_dir`` (hidden and side-car files skipped), sorted."""
    found: list[tuple[str, Path, os.stat_result]] = []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or name in IGNORED_NAMES or path.suffix.lower() in IGNORED_SUFFIXES:
                continue
            if path in exclude:
                continue
            try:
                stat = path.stat()
            except OSError as exc:
                logger.warning("cannot stat %s: %s", path, exc)
                continue
            found.append((path.relative_to(data_dir).as_posix(), path, stat))
    return found


def build_index(
    data_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    exclude: tuple[str | os.PathLike[str], ...] = (),
    patient_salt: bytes = b"",
) -> SiteIndex:
    """Index every file under a site folder, reusing cached records of unchanged files.

    Args:
        data_dir: The site folder.
        cache_dir: Where the index is kept (see :func:`index_path_for`).
        use_cache: Read and write the index file; ``False`` parses everything.
        exclude: Files not to index (e.g. the labels CSV if it has no ``.csv`` suffix).
        patient_salt: The site's secret salt of the PatientID keys (empty: plain hash);
            an index written with another salt is rebuilt.

    Returns:
        The :class:`SiteIndex`. An unwritable cache location is logged, not raised.

    Raises:
        NotADirectoryError: ``data_dir`` is not a folder.
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"site data folder {root} does not exist or is not a folder")
    cache_path = index_path_for(root, cache_dir)
    cached = _load_cache(cache_path, salt=salt_fingerprint(patient_salt)) if use_cache else {}
    skip = frozenset(Path(p).expanduser().resolve() for p in exclude) | {cache_path}
    records: list[FileRecord] = []
    parsed = reused = 0
    for rel, path, stat in scan_files(root, exclude=skip):
        old = cached.get(rel)
        if old is not None and old.size == stat.st_size and old.mtime_ns == stat.st_mtime_ns:
            records.append(old)
            reused += 1
        else:
            records.append(read_header(path, rel=rel, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                                       patient_salt=patient_salt))
            parsed += 1
    saved: Path | None = cache_path if use_cache else None
    if use_cache and (parsed or len(cached) != len(records)):
        saved = _save_cache(cache_path, root, records, salt=salt_fingerprint(patient_salt))
    logger.info("indexed %s: %d files (%d parsed, %d from cache)", root, len(records), parsed, reused)
    return SiteIndex(data_dir=root, records=records, parsed=parsed, reused=reused, path=saved)


def _load_cache(path: Path, *, salt: str) -> dict[str, FileRecord]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable DICOM index %s: %s", path, exc)
        return {}
    if not isinstance(payload, dict) or (payload.get("format"), payload.get("version")) != (INDEX_FORMAT, INDEX_VERSION):
        logger.info("DICOM index %s has another format/version; rebuilding it", path)
        return {}
    if payload.get("salt", "") != salt:
        logger.info("DICOM index %s keys patients with another salt; rebuilding it", path)
        return {}
    names = {f.name for f in fields(FileRecord)}
    out: dict[str, FileRecord] = {}
    for item in payload.get("files", []):
        try:
            record = FileRecord(**{k: v for k, v in item.items() if k in names})
        except TypeError:
            continue
        out[record.path] = record
    return out


def _save_cache(path: Path, root: Path, records: list[FileRecord], *, salt: str) -> Path | None:
    payload = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "salt": salt,
        "data_dir": str(root),
        "files": [asdict(r) for r in records],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot write DICOM index %s (%s); headers will be re-read next time", path, exc)
        return None
    return path


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _int(ds: pydicom.Dataset, keyword: str, default: int = 0) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def read_header(path: Path, *, rel: str, size: int, mtime_ns: int, patient_salt: bytes = b"") -> FileRecord:
    """Parse one file's header (never its pixels) into a :class:`FileRecord`; never raises.

    Args:
        path: The file.
        rel: Its path relative to the site folder.
        size: Its size in bytes.
        mtime_ns: Its modification time.
        patient_salt: The site's salt of the PatientID key (empty: plain SHA-256).

    Returns:
        The record; ``reason`` is set when the file is not a usable image.
    """
    base: dict[str, Any] = {"path": rel, "size": size, "mtime_ns": mtime_ns}
    try:
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-conformant values: judged by the checks below
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            values = _header_values(ds, patient_salt=patient_salt)
            problem = _image_problem(ds, values) or _pixel_problem(fp, ds, values["transfer_syntax"], size)
    except InvalidDicomError as exc:
        return FileRecord(**base, reason=Reason.NOT_DICOM.value, detail=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001 - any parser failure quarantines the file
        return FileRecord(**base, reason=Reason.UNREADABLE.value, detail=f"{type(exc).__name__}: {exc}"[:300])
    reason, detail = problem if problem else ("", "")
    return FileRecord(**base, reason=reason, detail=detail, **values)


def _header_values(ds: pydicom.Dataset, *, patient_salt: bytes = b"") -> dict[str, Any]:
    meta = getattr(ds, "file_meta", None)
    patient = _text(ds, "PatientID")
    return {
        "sop_instance_uid": _text(ds, "SOPInstanceUID") or (_text(meta, "MediaStorageSOPInstanceUID") if meta else ""),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "modality": _text(ds, "Modality").upper(),
        "manufacturer": _text(ds, "Manufacturer"),
        "transfer_syntax": _text(meta, "TransferSyntaxUID") if meta is not None else "",
        "photometric": _text(ds, "PhotometricInterpretation").upper(),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "frames": max(1, _int(ds, "NumberOfFrames", 1)),
        "samples_per_pixel": _int(ds, "SamplesPerPixel", 1),
        "bits_allocated": _int(ds, "BitsAllocated"),
        "bits_stored": _int(ds, "BitsStored"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "series_instance_uid": _text(ds, "SeriesInstanceUID"),
        "patient_key": patient_key(patient, salt=patient_salt),
        "patient_sex": sex if (sex := _text(ds, "PatientSex").upper()) in ("F", "M", "O") else "",
        "patient_age": patient_age_years(ds),
    }


_AGE_UNIT_DAYS = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}


def patient_age_years(ds: pydicom.Dataset) -> int:
    """Age in whole years: PatientAge (``"065Y"``, ``"018M"``, ...), else birth date to study date; -1 if unknown."""
    text = _text(ds, "PatientAge").upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in _AGE_UNIT_DAYS:
        return int(int(text[:3]) * _AGE_UNIT_DAYS[text[3]] // 365.25) if text[3] != "Y" else int(text[:3])
    birth = _text(ds, "PatientBirthDate")
    when = next((d for d in (_text(ds, k) for k in ("StudyDate", "SeriesDate", "ContentDate")) if d), "")
    try:
        b, w = (datetime.strptime(v[:8], "%Y%m%d").date() for v in (birth, when))
    except ValueError:
        return -1
    years = w.year - b.year - ((w.month, w.day) < (b.month, b.day))
    return years if 0 <= years <= 150 else -1


def _image_problem(ds: pydicom.Dataset, values: dict[str, Any]) -> tuple[str, str] | None:
    """Problems visible in the header alone (file meta, image pixel module)."""
    if not values["transfer_syntax"]:
        return Reason.NOT_DICOM.value, "file meta information has no Transfer Syntax UID (0002,0010)"
    if not UID(values["transfer_syntax"]).is_transfer_syntax:
        return Reason.UNSUPPORTED.value, f"unknown transfer syntax {values['transfer_syntax']}"
    return None


def _pixel_problem(fp: BinaryIO, ds: pydicom.Dataset, tsyntax: str, size: int) -> tuple[str, str] | None:
    """Inspect the Pixel Data element header the reader stopped at; check layout and length."""
    pos = fp.tell()
    head = fp.read(12)
    if tsyntax == DeflatedExplicitVRLittleEndian:
        return _layout_problem(ds)  # the stream is inflated: file offsets mean nothing
    if len(head) < 8:
        return Reason.NO_PIXEL_DATA.value, "no Pixel Data (7FE0,0010) element"
    implicit, little = ds.original_encoding
    endian = "<" if little is not False else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    tag = (group << 16) | element
    if tag in _FLOAT_PIXEL_DATA:
        return Reason.UNSUPPORTED.value, "Float/Double Float Pixel Data is not supported"
    if tag != _PIXEL_DATA:
        return Reason.NO_PIXEL_DATA.value, "no Pixel Data (7FE0,0010) element"
    layout = _layout_problem(ds)
    if layout:
        return layout
    vr = head[4:6]
    implicit = implicit or not (vr.isalpha() and vr.isupper())  # some writers mix VR encodings
    if implicit or vr in _LONG_VRS:
        offset = 8 if implicit else 12
        (length,) = struct.unpack(endian + "I", head[offset - 4 : offset])
    else:
        offset = 8
        (length,) = struct.unpack(endian + "H", head[6:8])
    if length == _UNDEFINED:
        fp.seek(max(pos, size - _TAIL_BYTES))
        delimiter = struct.pack(endian + "HHI", 0xFFFE, 0xE0DD, 0)
        if delimiter not in fp.read():
            return Reason.TRUNCATED.value, "encapsulated Pixel Data has no sequence delimiter (file cut short)"
        return None
    end = pos + offset + length
    if end > size:
        return Reason.TRUNCATED.value, f"Pixel Data declares {length} bytes but the file ends {end - size} bytes early"
    expected = get_expected_length(ds, "bytes")
    if length < expected:
        return Reason.TRUNCATED.value, f"Pixel Data holds {length} bytes, the image needs {expected}"
    return None


def _layout_problem(ds: pydicom.Dataset) -> tuple[str, str] | None:
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if not ds.get(k)]
    if missing:
        return Reason.UNSUPPORTED.value, f"image pixel module lacks {', '.join(missing)}"
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric not in SUPPORTED_PHOTOMETRICS:
        return Reason.UNSUPPORTED.value, f"PhotometricInterpretation {photometric or '(missing)'!r} is not supported"
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples not in (1, 3):
        return Reason.UNSUPPORTED.value, f"SamplesPerPixel {samples} is not supported"
    return None
