"""Integrated gradients (Sundararajan et al., 2017) against a flat image (attribution ``integrated_gradients``).

The class's log-probability is integrated along the straight path from a
*baseline* - the image's own mean intensity per channel, i.e. the same image with
all structure removed - to the image (midpoint rule, :data:`STEPS` points). Each
pixel's attribution is ``(x - baseline) * mean gradient``, summed over channels;
the map is its positive part (evidence *for* the class) scaled to a maximum of 1.
By the completeness axiom the attributions add up to the difference of the
log-probability between image and baseline, so, unlike Grad-CAM, structure that
every image shares (zero-padding borders) earns nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from federation.inference.attribution import scale_unit

STEPS = 32
"""Points on the path from baseline to image."""

_CHUNK_PIXELS = 1 << 20
"""Input pixels per backward pass (bounds memory on large images)."""


class IntegratedGradientsExplainer:
    """Integrated gradients for one model (any spatial rank).

    Args:
        model: Classifier returning logits; used in eval mode, weights unchanged.
        steps: Points on the path, >= 1.
    """

    def __init__(self, model: nn.Module, *, steps: int = STEPS) -> None:
        if steps < 1:
            raise ValueError(f"integrated gradients need steps >= 1, got {steps}")
        self.model = model
        self.steps = steps

    def _attribute(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        baseline = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)
        total = torch.zeros_like(x)
        for alpha in (torch.arange(self.steps, dtype=x.dtype) + 0.5) / self.steps:
            point = (baseline + alpha * (x - baseline)).requires_grad_(True)
            logp = torch.log_softmax(self.model(point), dim=1)
            (grad,) = torch.autograd.grad(logp.gather(1, classes[:, None]).sum(), point)
            total += grad
        return ((x - baseline) * total / self.steps).sum(dim=1)

    def __call__(self, images: np.ndarray | torch.Tensor, *, class_index: int | None = None) -> np.ndarray:
        """Maps of ``images`` ``(N, C, *spatial)`` for ``class_index`` (default: each image's arg-max class).

        Returns:
            ``float32 (N, *spatial)`` maps in ``[0, 1]`` (all zero where nothing speaks for the class).
        """
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if isinstance(images, np.ndarray) else images.float()
        was_training = self.model.training
        self.model.eval()
        chunk = max(1, _CHUNK_PIXELS // max(1, x[0].numel()))
        maps = []
        try:
            with torch.enable_grad():
                for lo in range(0, len(x), chunk):
                    part = x[lo : lo + chunk].detach()
                    if class_index is None:
                        with torch.no_grad():
                            classes = self.model(part).argmax(dim=1)
                    else:
                        classes = torch.full((len(part),), int(class_index), dtype=torch.long)
                    maps.append(self._attribute(part, classes).detach().cpu().numpy())
        finally:
            self.model.train(was_training)
        return scale_unit(np.concatenate(maps)) if maps else np.zeros((0, *x.shape[2:]), np.float32)
