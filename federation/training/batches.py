"""The batch layouts training and evaluation accept."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of a collated batch; labels as ``(N,)`` int64.

    Args:
        batch: A tuple/list whose first two items are images and labels, or a
            mapping with ``"image"`` and ``"label"`` keys.

    Raises:
        TypeError: For any other batch layout.
    """
    if isinstance(batch, Mapping):
        images, labels = batch["image"], batch["label"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        raise TypeError(f"cannot split a batch of type {type(batch).__name__} into (image, label)")
    labels = torch.as_tensor(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    return torch.as_tensor(images), labels.long()
