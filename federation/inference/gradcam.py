"""Grad-CAM maps with MONAI's :class:`monai.visualize.GradCAM`, and their PNG overlays.

The map is computed at the network's last convolution (override with
``target_layer``), upsampled to the input size and scaled to ``[0, 1]`` by MONAI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn


def default_target_layer(model: nn.Module) -> str:
    """Name of the last convolution module of ``model`` (the usual Grad-CAM layer).

    Raises:
        ValueError: The model has no convolution.
    """
    convs = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolution layer for Grad-CAM; pass target_layer")
    return convs[-1]


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
        self._cam = GradCAM(nn_module=model, target_layers=self.target_layer)

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


@dataclass(frozen=True, eq=False)
class Overlay:
    """One panel: the input, its Grad-CAM map and the caption."""

    image: np.ndarray
    cam: np.ndarray
    title: str


def _display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[0] == 3:
        return np.clip(img.transpose(1, 2, 0), 0.0, 1.0), None
    return img.reshape(img.shape[-2:]), "gray"


def save_overlays(panels: Sequence[Overlay], path: str | os.PathLike[str], *, suptitle: str = "") -> Path:
    """Draw panels side by side (image in grey, Grad-CAM in 'jet' at 40 %) and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.3), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        shown, cmap = _display(panel.image)
        ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0)
        ax.imshow(panel.cam, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
        ax.set_title(panel.title, fontsize=8, y=1.0)  # a fixed y skips matplotlib's per-draw title placement
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    # Fixed margins instead of tight_layout(): axes are off, so there is nothing to fit,
    # and the layout pass cost 0.1 s per figure (a 10-site gallery: 1.4 s).
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.85 if suptitle else 0.9, wspace=0.08)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
