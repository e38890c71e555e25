"""Datasets, site partitioning and per-site data for medfed.

Public API:

* :func:`resolve_data_dir` - where dataset files live.
* :func:`register_dataset`, :func:`available_datasets`, :func:`load_dataset`,
  :class:`DatasetSplits` - the dataset registry (``synthetic``, the MedMNIST 2-D and
  3-D flags, ``heart_disease`` and ``dicom`` are built in), cached per process.
* :func:`partition_indices` - IID or Dirichlet label-skew split into sites.
* :func:`load_site_data`, :class:`SiteData`, :func:`load_central_test`,
  :func:`describe_sites` - what each site (and the server) gets.
* :func:`apply_site_shift`, :func:`shift_site_images` - per-site scanner differences.

Names are imported from their submodule on first use (:mod:`federation._lazy`), so
``federation.data.paths`` or the DICOM label helpers load without torch.
"""

from federation._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "federation.data.medmnist": ("MEDMNIST_INFO", "file_md5", "load_medmnist"),
        "federation.data.partition": ("MAX_DIRICHLET_TRIES", "partition_indices", "partition_like"),
        "federation.data.paths": ("DATA_DIR_ENV", "resolve_data_dir"),
        "federation.data.registry": (
            "DataMismatch",
            "DatasetInfo",
            "DatasetSplits",
            "available_datasets",
            "check_site_data",
            "clear_dataset_cache",
            "dataset_info",
            "declared_info_problems",
            "is_site_only",
            "load_dataset",
            "register_dataset",
            "resize_images",
            "site_shift_strength",
            "stratified_subset",
        ),
        "federation.data.sites": (
            "SiteData",
            "describe_sites",
            "load_central_test",
            "load_site_data",
            "site_name",
            "site_partitions",
        ),
        "federation.data.synthetic": (
            "SYNTHETIC_SITE_SHIFT",
            "apply_site_shift",
            "generate_synthetic",
            "load_synthetic",
            "site_shift_params",
        ),
        "federation.data.shift": ("AcquisitionProfile", "acquisition_profile", "shift_site_images"),
    },
)
