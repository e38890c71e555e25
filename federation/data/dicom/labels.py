"""The labels CSV of a site: one row per image, keyed by SOP Instance UID or relative path."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_KEY_COLUMN = "sop_instance_uid"
#: The key column used when the CSV has no ``DEFAULT_KEY_COLUMN``: image paths relative to the site folder.
PATH_KEY_COLUMN = "path"
DEFAULT_LABEL_COLUMN = "label"
DEFAULT_LABELS_NAME = "labels.csv"


def normalize_key(key: str) -> str:
    """Canonical form of a CSV key: stripped, ``/`` separators, no leading ``./``."""
    key = key.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _as_int(value: str) -> int | None:
    try:
        number = float(value)
    except ValueError:
        return None
    if number != int(number) or number < 0:
        return None
    return int(number)


@dataclass(frozen=True)
class LabelTable:
    """A parsed labels CSV.

    Attributes:
        path: The CSV file.
        key_column: Column holding the SOP Instance UID or relative path of each image.
        label_column: Column holding the class.
        labels: Key -> label value (first value seen for the key).
        conflicts: Keys listed more than once with different labels -> the values.
        empty: Keys whose label cell is empty.
        label_names: Class names in index order.
    """

    path: Path
    key_column: str
    label_column: str
    labels: dict[str, str]
    conflicts: dict[str, tuple[str, ...]]
    empty: frozenset[str]
    label_names: tuple[str, ...]

    def encode(self, value: str) -> int | None:
        """Return the class index of a label value, or ``None`` if it is not a known class."""
        value = value.strip()
        if value in self.label_names:
            return self.label_names.index(value)
        number = _as_int(value)
        if number is not None and number < len(self.label_names):
            return number
        return None


def _find_column(fieldnames: Sequence[str], wanted: str, what: str, path: Path) -> str:
    by_lower = {name.strip().lower(): name for name in fieldnames}
    found = by_lower.get(wanted.strip().lower())
    if found is None:
        raise ValueError(f"{path}: no {what} column {wanted!r}; columns are {', '.join(fieldnames) or '(none)'}")
    return found


def _key_column(fieldnames: Sequence[str], wanted: str, path: Path) -> str:
    """The key column: ``wanted``, or ``path`` when ``wanted`` is the default and the CSV has only ``path``."""
    try:
        return _find_column(fieldnames, wanted, "key", path)
    except ValueError:
        if wanted.strip().lower() != DEFAULT_KEY_COLUMN:
            raise
    try:
        found = _find_column(fieldnames, PATH_KEY_COLUMN, "key", path)
    except ValueError:
        raise ValueError(f"{path}: no key column {DEFAULT_KEY_COLUMN!r} nor {PATH_KEY_COLUMN!r}; columns are "
                         f"{', '.join(fieldnames) or '(none)'}; name the column holding each image's SOP Instance "
                         "UID or relative path (--key-column, or data.dicom_key_column)") from None
    logger.info("labels %s: no %r column, keyed by its %r column", path, DEFAULT_KEY_COLUMN, found)
    return found


def _sniff_dialect(sample: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        return csv.excel


def infer_label_names(values: Sequence[str]) -> tuple[str, ...]:
    """Class names for label values: ``0..max`` if all are integers (at least 2), else sorted names."""
    distinct = sorted({v.strip() for v in values if v.strip()})
    numbers = [_as_int(v) for v in distinct]
    if distinct and all(n is not None for n in numbers):
        top = max(n for n in numbers if n is not None)
        return tuple(str(i) for i in range(max(2, top + 1)))
    return tuple(distinct)


def read_labels(
    path: str | os.PathLike[str],
    *,
    key_column: str = DEFAULT_KEY_COLUMN,
    label_column: str = DEFAULT_LABEL_COLUMN,
    label_names: Sequence[str] | None = None,
) -> LabelTable:
    """Read a labels CSV (comma, semicolon or tab separated; UTF-8 with or without BOM).

    Args:
        path: The CSV file.
        key_column: Column with the image key (SOP Instance UID or path relative to
            the site folder); matched case-insensitively. With the default
            (``sop_instance_uid``), a CSV without that column but with a ``path``
            column is keyed by ``path``.
        label_column: Column with the class (a name or a 0-based integer).
        label_names: Class names in index order. ``None``: inferred, ``0..max`` when
            every label is an integer, else the sorted distinct values.

    Returns:
        The :class:`LabelTable`.

    Raises:
        FileNotFoundError: The CSV does not exist.
        ValueError: A column is missing, or fewer than two classes are known.
    """
    csv_path = Path(path).expanduser()
    text = csv_path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(text.splitlines(), dialect=_sniff_dialect(text[:4096]))
    fieldnames = list(reader.fieldnames or [])
    key_col = _key_column(fieldnames, key_column, csv_path)
    label_col = _find_column(fieldnames, label_column, "label", csv_path)
    labels: dict[str, str] = {}
    seen: dict[str, set[str]] = {}
    empty: set[str] = set()
    for row in reader:
        key = normalize_key(row.get(key_col) or "")
        if not key:
            continue
        value = (row.get(label_col) or "").strip()
        if not value:
            empty.add(key)
            continue
        labels.setdefault(key, value)
        seen.setdefault(key, set()).add(value)
    conflicts = {k: tuple(sorted(v)) for k, v in seen.items() if len(v) > 1}
    names = tuple(str(n).strip() for n in label_names) if label_names else infer_label_names(list(labels.values()))
    if len(names) < 2:
        raise ValueError(f"{csv_path}: need at least 2 classes, found {list(names)} in column {label_col!r}")
    logger.info("labels %s: %d keyed rows, classes %s", csv_path, len(labels), names)
    return LabelTable(
        path=csv_path,
        key_column=key_col,
        label_column=label_col,
        labels=labels,
        conflicts=conflicts,
        empty=frozenset(empty - set(labels)),
        label_names=names,
    )
