"""Hospital sites stored as DICOM: ingestion, header index, quarantine and site checks.

Public API:

* :func:`check_site` -> :class:`SiteReport` (with :class:`QuarantinedFile` /
  :class:`Reason`), rendered by :func:`render_site_report`.
* :func:`load_dicom_site` - usable labelled images as ``float32 (N, C, H, W)`` in ``[0, 1]``;
  :func:`load_site_sample_set` also gives sex/age per sample (:class:`SiteSamples`); how files are
  selected and read is one :class:`DicomReadOptions` for all of them.
* :func:`load_dicom_splits` - the dataset-registry loader (settings: :class:`DicomSettings`).
* :func:`build_index` - the cached header index (:class:`SiteIndex`, :class:`FileRecord`).
* :func:`read_image`, :func:`decoder_problem` - one file's pixels; missing decoders.
* :func:`read_labels` - the labels CSV (:class:`LabelTable`).
* :func:`make_demo_site` - a realistic demo site written from a MedMNIST split.

Names are imported from their submodule on first use (:mod:`federation._lazy`): the
label-file constants and helpers load without pydicom or torch.
"""

from federation._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "federation.data.dicom.dataset": ("DicomSettings", "load_dicom_splits", "split_by_group"),
        "federation.data.dicom.demo": ("DEMO_SOURCES", "make_demo_site"),
        "federation.data.dicom.index": ("INDEX_FILENAME", "FileRecord", "SiteIndex", "build_index", "index_path_for"),
        "federation.data.dicom.labels": (
            "DEFAULT_KEY_COLUMN",
            "DEFAULT_LABEL_COLUMN",
            "DEFAULT_LABELS_NAME",
            "LabelTable",
            "read_labels",
        ),
        "federation.data.dicom.loader": (
            "SEX_CODES",
            "DicomReadOptions",
            "SiteItem",
            "SiteSamples",
            "check_site",
            "load_dicom_site",
            "load_site_sample_set",
            "load_site_samples",
            "select_usable",
        ),
        "federation.data.dicom.reader": (
            "decoder_problem",
            "frame_indices",
            "install_hint",
            "match_channels",
            "read_image",
            "resize_image",
            "to_display",
        ),
        "federation.data.dicom.report": ("QuarantinedFile", "Reason", "SiteReport", "render_site_report"),
    },
)
