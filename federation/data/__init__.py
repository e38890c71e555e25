"""Datasets, site partitioning and per-site data for medfed.

Public API:

* :func:`resolve_data_dir` - where dataset files live.
* :func:`register_dataset`, :func:`available_datasets`, :func:`load_dataset`,
  :class:`DatasetSplits` - the dataset registry (``synthetic``, ``pneumoniamnist``,
  ``breastmnist``, ``retinamnist`` are built in), cached per process.
* :func:`partition_indices` - IID or Dirichlet label-skew split into sites.
* :func:`load_site_data`, :class:`SiteData`, :func:`load_central_test`,
  :func:`describe_sites` - what each site (and the server) gets.
* :func:`apply_site_shift` - per-site scanner differences.
"""

from federation.data.medmnist import MEDMNIST_INFO, file_md5, load_medmnist
from federation.data.partition import MAX_DIRICHLET_TRIES, partition_indices, partition_like
from federation.data.paths import DATA_DIR_ENV, resolve_data_dir
from federation.data.registry import (
    DatasetInfo,
    DatasetSplits,
    available_datasets,
    clear_dataset_cache,
    dataset_info,
    load_dataset,
    register_dataset,
    resize_images,
    site_shift_strength,
    stratified_subset,
)
from federation.data.sites import (
    SiteData,
    describe_sites,
    load_central_test,
    load_site_data,
    site_name,
    site_partitions,
)
from federation.data.synthetic import (
    SYNTHETIC_SITE_SHIFT,
    apply_site_shift,
    generate_synthetic,
    load_synthetic,
    site_shift_params,
)

__all__ = [
    "DATA_DIR_ENV",
    "MAX_DIRICHLET_TRIES",
    "MEDMNIST_INFO",
    "SYNTHETIC_SITE_SHIFT",
    "DatasetInfo",
    "DatasetSplits",
    "SiteData",
    "apply_site_shift",
    "available_datasets",
    "clear_dataset_cache",
    "dataset_info",
    "describe_sites",
    "file_md5",
    "generate_synthetic",
    "load_central_test",
    "load_dataset",
    "load_medmnist",
    "load_site_data",
    "load_synthetic",
    "partition_indices",
    "partition_like",
    "register_dataset",
    "resize_images",
    "resolve_data_dir",
    "site_name",
    "site_partitions",
    "site_shift_params",
    "site_shift_strength",
    "stratified_subset",
]

# Datasets in their own modules register on import: UCI Heart Disease (4 real
# hospitals, tabular) and the MedMNIST 3-D volumes.
from federation.data import heart as _heart  # noqa: E402,F401
from federation.data import medmnist3d as _medmnist3d  # noqa: E402,F401
from federation.data.shift import AcquisitionProfile, acquisition_profile, shift_site_images  # noqa: E402

__all__ += ["AcquisitionProfile", "acquisition_profile", "shift_site_images"]

# DICOM folders (a hospital's own images) register last: they build on the registry.
from federation.data.dicom import load_dicom_splits as _load_dicom_splits  # noqa: E402

register_dataset("dicom", _load_dicom_splits, replace=True)
