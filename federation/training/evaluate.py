"""Evaluate a classifier on a dataset: loss, ROC AUC, accuracy and the raw probabilities."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from federation.metrics import classification_metrics
from federation.training.batches import split_batch
from federation.training.results import EvalResult
from federation.training.device import model_device

logger = logging.getLogger(__name__)



@torch.no_grad()
def _predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, float]:
    """Softmax probabilities, labels and summed cross-entropy over ``loader``."""
    probs, labels, loss_sum = [], [], 0.0
    for batch in loader:
        images, targets = split_batch(batch)
        logits = model(images.to(device, non_blocking=True)).float()
        targets = targets.to(device, non_blocking=True)
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        labels.append(targets.cpu().numpy())
    return np.concatenate(probs), np.concatenate(labels), loss_sum


def evaluate(
    *,
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` without gradients.

    Args:
        model: A classifier returning logits ``(N, C)``. Its train/eval mode is
            restored afterwards.
        dataset: ``(image, label)`` items (or ``{"image", "label"}`` mappings).
        batch_size: Evaluation batch size.
        device: Where to run; ``None`` uses the device the model is on. The model
            is moved there.

    Returns:
        The :class:`EvalResult` (metrics from :func:`federation.metrics.classification_metrics`).

    Raises:
        ValueError: On an empty dataset or a non-positive batch size.
    """
    num_examples = len(dataset)  # type: ignore[arg-type]
    if num_examples == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device if device is not None else model_device(model)
    was_training = model.training
    model.to(device)
    model.eval()
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
        probs, labels, loss_sum = _predict(model, loader, device)
    finally:
        model.train(was_training)
    loss = loss_sum / num_examples
    metrics = classification_metrics(labels=labels, probs=probs, loss=loss)
    result = EvalResult(
        num_examples=num_examples,
        loss=float(metrics.get("loss", loss)),
        auc=float(metrics["auc"]),
        accuracy=float(metrics["accuracy"]),
        probs=probs,
        labels=labels,
    )
    logger.debug("evaluated %d examples: %s", num_examples, result.metrics())
    return result
