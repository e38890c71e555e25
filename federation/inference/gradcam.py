"""Grad-CAM maps with MONAI's :class:`monai.visualize.GradCAM` (attribution method ``gradcam``).

The map is computed at the network's last convolution (override with
``target_layer``), upsampled to the input size and scaled to ``[0, 1]`` by MONAI.

Scaling: MONAI's default post-processing (``default_normalizer``) maps the
maximum to 0 and the minimum to 1 - it *flips* the map - so medfed passes
:func:`_unit_scale` instead (0 stays 0, the maximum becomes 1). With the flip, the
hottest pixel shown was the coldest Grad-CAM cell, and the ~2/3 of cells that
Grad-CAM's ReLU sets to 0 all tied at "1", so the pointing game picked the
top-left pixel: 0 of 277 hits on the default preset's model (issue 19). The
remaining limit of Grad-CAM here is resolution: the last convolution of the
default CNN sees 7x7 cells of a 28-pixel image (``bench/explain_pointing.py``,
docs/RESULTS.md compare it with the other methods).
The PNG drawing lives in :mod:`federation.inference.overlays` (re-exported here).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn

from federation.inference.overlays import Overlay, save_overlays

__all__ = ["GradCamExplainer", "Overlay", "default_target_layer", "grad_cam", "save_overlays"]


def default_target_layer(model: nn.Module) -> str:
    """Name of the last convolution module of ``model`` (the usual Grad-CAM layer).

    Raises:
        ValueError: The model has no convolution.
    """
    convs = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolution layer for Grad-CAM; pass target_layer")
    return convs[-1]


def _unit_scale(maps: torch.Tensor) -> torch.Tensor:
    """Scale each upsampled map ``(N, 1, *spatial)`` to a maximum of 1 (negatives clipped; all-zero maps stay 0)."""
    maps = maps.clamp(min=0)
    peak = maps.flatten(1).amax(dim=1).view(-1, *([1] * (maps.ndim - 1)))
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


class GradCamExplainer:
    """Grad-CAM for one model with MONAI's :class:`~monai.visualize.GradCAM`.

    MONAI registers forward/backward hooks on the target layer for the model's
    lifetime, so build one explainer per model and call it repeatedly.

    Args:
        model: Classifier returning logits; used in eval mode, weights unchanged.
        target_layer: Module name (see ``model.named_modules()``); default
            :func:`default_target_layer`.
    """

    def __init__(self, model: nn.Module, *, target_layer: str | None = None) -> None:
        self.model = model
        self.target_layer = target_layer or default_target_layer(model)
        names = {name for name, _ in model.named_modules()}
        if self.target_layer not in names:
            raise ValueError(f"Grad-CAM layer {self.target_layer!r} is not a module of {type(model).__name__}")
        self._cam = GradCAM(nn_module=model, target_layers=self.target_layer, postprocessing=_unit_scale)

    def __call__(self, images: np.ndarray | torch.Tensor, *, class_index: int | None = None) -> np.ndarray:
        """Maps of ``images`` ``(N, C, H, W)`` for ``class_index`` (default: each image's arg-max class).

        Returns:
            ``float32 (N, H, W)`` maps in ``[0, 1]``, the input's spatial size.
        """
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if isinstance(images, np.ndarray) else images
        was_training = self.model.training
        try:
            with torch.enable_grad():
                maps = self._cam(x.float(), class_idx=class_index)
        finally:
            self.model.train(was_training)
        return maps.detach().cpu().numpy()[:, 0].astype(np.float32)


def grad_cam(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    class_index: int | None = None,
    target_layer: str | None = None,
) -> np.ndarray:
    """One-off Grad-CAM maps ``(N, H, W)``; see :class:`GradCamExplainer` for repeated use."""
    return GradCamExplainer(model, target_layer=target_layer)(images, class_index=class_index)
