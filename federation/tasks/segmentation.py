"""``segmentation``: one label per pixel/voxel, MONAI DiceCELoss, Dice/HD95/volume error.

A sample is one image or one volume with its label map ``(H, W)`` / ``(D, H, W)``
(background 0). Training minimises MONAI's :class:`~monai.losses.DiceCELoss`
(softmax, one-hot targets, Dice per sample and class, never pooled over the
batch, so one sample's loss depends on that sample only - what DP-SGD's
per-sample clipping needs). Evaluation predicts whole images/volumes (arg-max)
and scores them with :mod:`federation.metrics.segmentation`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from federation.metrics.segmentation import (
    CaseMetrics,
    case_metrics,
    global_segmentation_metrics,
    segmentation_metric_names,
    site_segmentation_metrics,
)
from federation.tasks.base import Task
from federation.training.batches import split_batch
from federation.training.device import model_device

if TYPE_CHECKING:
    from federation.config.schema import ExperimentConfig
    from federation.data.sites import SiteData

logger = logging.getLogger(__name__)



@torch.no_grad()
def predict_masks(
    *, model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device | None, task: SegmentationTask
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Arg-max label maps, true label maps, the summed per-sample loss and the model's classes.

    The model's train/eval mode is restored afterwards.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("cannot evaluate on an empty dataset")
    device = device if device is not None else model_device(model)
    was_training = model.training
    model.to(device)
    model.eval()
    preds, truths, loss_sum, classes = [], [], 0.0, 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images, targets = split_batch(batch)
            logits = model(images.to(device)).float()
            classes = int(logits.shape[1])
            targets = targets.to(device)
            loss_sum += float(task.per_sample_loss(logits, targets).sum())
            preds.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
            truths.append(targets.to(torch.uint8).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(preds), np.concatenate(truths), loss_sum, classes


class SegmentationTask(Task):
    """Semantic segmentation of 2-D images or 3-D volumes (background is class 0)."""

    name = "segmentation"
    headline = "dice"
    clinical_reports = True

    def __init__(self) -> None:
        from monai.losses import DiceCELoss, DiceLoss  # noqa: PLC0415 - MONAI loads with the task

        self._dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        self._dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

    def targets(self, *, labels: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        """The label maps without their channel axis, ``(N, *spatial)`` uint8."""
        del labels
        if masks is None:
            raise ValueError("data.task=segmentation needs a dataset with label maps (masks), this one has none")
        return masks[:, 0]

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy of each sample ``(B,)``; their mean equals MONAI's DiceCELoss."""
        logits = logits.float()
        dice = self._dice(logits, targets[:, None]).flatten(1).mean(dim=1)
        ce = F.cross_entropy(logits, targets, reduction="none").flatten(1).mean(dim=1)
        return dice + ce

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MONAI :class:`~monai.losses.DiceCELoss` of the batch."""
        return self._dice_ce(logits.float(), targets[:, None])

    def case_scores(
        self, *, model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device | None
    ) -> tuple[CaseMetrics, float]:
        """Per-case scores of ``model`` on ``dataset`` and the mean loss (both stay where computed)."""
        pred, truth, loss_sum, classes = predict_masks(
            model=model, dataset=dataset, batch_size=batch_size, device=device, task=self
        )
        return case_metrics(pred=pred, truth=truth, num_classes=classes), loss_sum / len(pred)

    def evaluate(
        self, *, model: nn.Module, dataset: Dataset, batch_size: int = 32, device: torch.device | None = None
    ) -> dict[str, float]:
        """``loss``, ``dice`` (mean over foreground classes), ``dice-c`` and ``hd95-c`` per class."""
        cases, loss = self.case_scores(model=model, dataset=dataset, batch_size=batch_size, device=device)
        return {"loss": loss, **global_segmentation_metrics(cases)}

    def site_metrics(
        self, *, model: nn.Module, data: SiteData, config: ExperimentConfig, device: torch.device | None = None
    ) -> dict[str, float]:
        """Case count, loss, and Dice/HD95/volume-error aggregates over >= 5 cases each."""
        cases, loss = self.case_scores(
            model=model, dataset=data.test, batch_size=config.train.batch_size, device=device
        )
        metrics = {"num-examples": float(cases.num_cases), "loss": float(loss)}
        metrics.update(site_segmentation_metrics(cases, confidence=config.clinical.confidence))
        return metrics

    def metric_names(self) -> frozenset[str]:
        """See :func:`federation.metrics.segmentation.segmentation_metric_names`."""
        return segmentation_metric_names()
