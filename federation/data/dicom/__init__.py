"""Hospital sites stored as DICOM: ingestion, header index, quarantine and site checks.

Public API:

* :func:`check_site` -> :class:`SiteReport` (with :class:`QuarantinedFile` /
  :class:`Reason`), rendered by :func:`render_site_report`.
* :func:`load_dicom_site` - usable labelled images as ``float32 (N, C, H, W)`` in ``[0, 1]``;
  :func:`load_site_sample_set` also gives sex/age per sample (:class:`SiteSamples`).
* :func:`load_dicom_splits` - the dataset-registry loader (settings: :class:`DicomSettings`).
* :func:`build_index` - the cached header index (:class:`SiteIndex`, :class:`FileRecord`).
* :func:`read_image`, :func:`decoder_problem` - one file's pixels; missing decoders.
* :func:`read_labels` - the labels CSV (:class:`LabelTable`).
* :func:`make_demo_site` - a realistic demo site written from a MedMNIST split.
"""

from federation.data.dicom.dataset import DicomSettings, load_dicom_splits, split_by_group
from federation.data.dicom.demo import DEMO_SOURCES, make_demo_site
from federation.data.dicom.index import INDEX_FILENAME, FileRecord, SiteIndex, build_index, index_path_for
from federation.data.dicom.labels import (
    DEFAULT_KEY_COLUMN,
    DEFAULT_LABEL_COLUMN,
    DEFAULT_LABELS_NAME,
    LabelTable,
    read_labels,
)
from federation.data.dicom.loader import (
    SEX_CODES,
    SiteItem,
    SiteSamples,
    check_site,
    load_dicom_site,
    load_site_sample_set,
    load_site_samples,
    select_usable,
)
from federation.data.dicom.reader import (
    decoder_problem,
    frame_indices,
    install_hint,
    match_channels,
    read_image,
    resize_image,
    to_display,
)
from federation.data.dicom.report import QuarantinedFile, Reason, SiteReport, render_site_report

__all__ = [
    "DEFAULT_KEY_COLUMN",
    "DEFAULT_LABELS_NAME",
    "DEFAULT_LABEL_COLUMN",
    "DEMO_SOURCES",
    "INDEX_FILENAME",
    "DicomSettings",
    "FileRecord",
    "LabelTable",
    "QuarantinedFile",
    "Reason",
    "SEX_CODES",
    "SiteIndex",
    "SiteItem",
    "SiteReport",
    "SiteSamples",
    "build_index",
    "check_site",
    "decoder_problem",
    "frame_indices",
    "index_path_for",
    "install_hint",
    "load_dicom_site",
    "load_dicom_splits",
    "load_site_sample_set",
    "load_site_samples",
    "make_demo_site",
    "match_channels",
    "read_image",
    "read_labels",
    "render_site_report",
    "resize_image",
    "select_usable",
    "split_by_group",
    "to_display",
]
