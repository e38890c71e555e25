"""Evaluation metrics (sklearn-backed) and their aggregation over sites."""

from federation.metrics.classification import classification_metrics, weighted_mean

__all__ = ["classification_metrics", "weighted_mean"]
