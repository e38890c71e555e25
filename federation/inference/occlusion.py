"""Occlusion maps with MONAI's :class:`monai.visualize.OcclusionSensitivity`.

A patch of about :data:`MASK_FRACTION` of the image side slides over the image
(overlapping by :data:`OVERLAP`); each patch is replaced by the image's mean and
the drop of the class's log-probability is recorded. The map is the positive
part of that drop, scaled so that its maximum is 1: hot = hiding this region
lowers the model's belief in the class. Unlike Grad-CAM it measures what the
model's *output* depends on relative to a reference, so image-independent border
activations of zero-padded convolutions (the hottest Grad-CAM pixels of the
default preset's model) do not show up.

Cost: about ``(1 / (MASK_FRACTION * (1 - OVERLAP)))^2`` (~200) forward passes per
image, whatever the image size.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.visualize import OcclusionSensitivity
from torch import nn

from federation.inference.attribution import scale_unit

MASK_FRACTION = 0.18
"""Side of the occluding patch as a fraction of the image side (5 px at 28 px)."""

OVERLAP = 0.6
"""Overlap of neighbouring patches (MONAI's default)."""


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=1)


class OcclusionExplainer:
    """Occlusion sensitivity for one model (2-D or 3-D inputs).

    Args:
        model: Classifier returning logits; used in eval mode, weights unchanged.
        mask_fraction: Patch side as a fraction of each image side, in ``(0, 1]``.
        mode: MONAI's fill of the hidden patch (``"mean_img"``, ``"mean_patch"``, ``"gaussian"``).
        n_batch: Occluded copies per forward pass; 0: as many as fit about 4 M input pixels (at most 512).
    """

    def __init__(
        self, model: nn.Module, *, mask_fraction: float = MASK_FRACTION, mode: str = "mean_img", n_batch: int = 0
    ) -> None:
        if not 0.0 < mask_fraction <= 1.0:
            raise ValueError(f"occlusion mask_fraction must be in (0, 1], got {mask_fraction}")
        self.model = model
        self.mask_fraction = mask_fraction
        self.mode = mode
        self.n_batch = n_batch

    def _sensitivity(self, spatial: tuple[int, ...]) -> OcclusionSensitivity:
        mask = [max(1, round(self.mask_fraction * s)) for s in spatial]
        n_batch = self.n_batch or max(1, min(512, (1 << 22) // max(1, int(np.prod(spatial)))))
        return OcclusionSensitivity(
            nn_module=self.model, mask_size=mask, n_batch=n_batch, verbose=False, mode=self.mode,
            overlap=OVERLAP, activate=_log_softmax,
        )

    def __call__(self, images: np.ndarray | torch.Tensor, *, class_index: int | None = None) -> np.ndarray:
        """Maps of ``images`` ``(N, C, *spatial)`` for ``class_index`` (default: each image's arg-max class).

        Returns:
            ``float32 (N, *spatial)`` maps in ``[0, 1]``; an image whose class
            log-probability no patch lowers gets an all-zero map.
        """
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if isinstance(images, np.ndarray) else images.float()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                base = _log_softmax(self.model(x))
                occlusion = self._sensitivity(tuple(x.shape[2:]))
                maps = []
                for i in range(len(x)):
                    k = int(base[i].argmax()) if class_index is None else int(class_index)
                    occluded = occlusion(x[i : i + 1])[0][0, k]
                    maps.append((base[i, k] - occluded).cpu().numpy())
        finally:
            self.model.train(was_training)
        return scale_unit(np.stack(maps)) if maps else np.zeros((0, *x.shape[2:]), np.float32)
