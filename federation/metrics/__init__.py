"""Evaluation metrics (numpy, pinned against scikit-learn and SciPy by tests) and their aggregation over sites.

* :mod:`federation.metrics.classification` - AUC, accuracy, NaN-safe weighted means.
* :mod:`federation.metrics.clinical` - a site's clinical report as aggregate numbers
  (operating point, intervals, calibration, ROC grid, suppressed subgroups).
* :mod:`federation.metrics.disclosure` - what of it may leave the site (no count of fewer than k patients).
* :mod:`federation.metrics.intervals` - Wilson and DeLong confidence intervals.
* :mod:`federation.metrics.calibration` - reliability bins, ECE, Brier score.
"""

from federation.metrics.calibration import ReliabilityBins, brier_score, expected_calibration_error, reliability_bins
from federation.metrics.classification import classification_metrics, weighted_mean
from federation.metrics.clinical import ClinicalSettings, clinical_metrics, site_metric_names
from federation.metrics.intervals import AucInterval, delong_auc_interval, wilson_interval

__all__ = [
    "AucInterval",
    "ClinicalSettings",
    "ReliabilityBins",
    "brier_score",
    "classification_metrics",
    "clinical_metrics",
    "delong_auc_interval",
    "expected_calibration_error",
    "reliability_bins",
    "site_metric_names",
    "weighted_mean",
    "wilson_interval",
]
