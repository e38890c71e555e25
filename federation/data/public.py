"""The public slice of a dataset (``data.public_fraction``): held out of every site, for central pretraining.

With ``data.public_fraction = f`` the pooled training split loses a stratified,
seeded ``f`` of its images before it is cut into sites
(:func:`federation.data.registry.public_indices`), so no site ever holds them;
:func:`load_public` returns exactly those images. Pretraining on them
(``medfed pretrain``) needs no privacy accounting: they are declared public.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from federation.config.schema import DataConfig
from federation.data.registry import load_dataset, public_indices
from federation.tasks import get_task


def load_public(config: DataConfig, *, seed: int) -> TensorDataset:
    """Return the public slice as ``TensorDataset(images, targets)`` (labels, or masks for segmentation).

    Raises:
        ValueError: ``data.public_fraction`` is 0 (nothing is declared public).
    """
    if config.public_fraction <= 0:
        raise ValueError("data.public_fraction is 0: no training image is declared public; set e.g. "
                         "data.public_fraction=0.2 (the same value for the pretraining and the federation)")
    full = load_dataset(config.model_copy(update={"public_fraction": 0.0}), seed=seed)
    idx = public_indices(full.train_labels, fraction=config.public_fraction, seed=seed)
    masks = None if full.train_masks is None else full.train_masks[idx]
    targets = get_task(config.task).targets(labels=full.train_labels[idx], masks=masks)
    targets = np.array(targets) if targets.dtype == np.uint8 else np.array(targets, dtype=np.int64)
    return TensorDataset(torch.from_numpy(np.array(full.train_images[idx])), torch.from_numpy(targets))
