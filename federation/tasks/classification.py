"""``classification``: one label per image, cross-entropy, ROC AUC and the clinical aggregates."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from federation.metrics.clinical import site_metric_names
from federation.tasks.base import Task


class ClassificationTask(Task):
    """Whole-image classification (the default task)."""

    name = "classification"
    headline = "auc"
    clinical_reports = True

    def targets(self, *, labels: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        """The image labels (a mask, where the dataset has one, is not used)."""
        del masks
        return labels

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each sample."""
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (one fused call, as before tasks existed: bit-identical training)."""
        return F.cross_entropy(logits.float(), targets)

    def evaluate(
        self, *, model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | None = None
    ) -> dict[str, float]:
        """``loss``, ``auc`` and ``accuracy`` (:func:`federation.training.evaluate`)."""
        from federation.training.evaluate import evaluate  # noqa: PLC0415

        return evaluate(model=model, dataset=dataset, batch_size=batch_size, device=device).metrics()

    def metric_names(self) -> frozenset[str]:
        """What the site's clinical evaluation (``client.site``, :func:`site_metrics` is ``None``) may send: ``num-examples``, ``loss``, ``auc``, ``accuracy`` and every clinical aggregate."""
        return frozenset({"num-examples", "loss", "auc", "accuracy"}) | site_metric_names()
