"""Registry of on-site attribution methods (explanation maps) by name.

An *attributor* is built for one model, ``factory(model, **options)``, and called
as ``attributor(images, class_index=k)`` on ``(N, C, H, W)`` images; it returns
``float32 (N, H, W)`` maps in ``[0, 1]`` at the input's size, 1 = strongest
evidence for class ``k``. Built-in methods (one module each):

* ``integrated_gradients`` (default) - :mod:`federation.inference.integrated_gradients`:
  integrated gradients of the class's log-probability from a flat image.
* ``occlusion`` - :mod:`federation.inference.occlusion`, MONAI's
  :class:`~monai.visualize.OcclusionSensitivity`: how much the class's
  log-probability drops when a patch is hidden.
* ``gradcam`` - :mod:`federation.inference.gradcam`, MONAI's
  :class:`~monai.visualize.GradCAM` at the last convolution.

The default was chosen by measurement on a slice separate from the test split
(site *training* images of the default preset's final model; ``bench/explain_pointing.py
--split train``, docs/RESULTS.md): pointing game integrated gradients 0.99,
occlusion 0.98, Grad-CAM 0.16 (7x7 cells at the last convolution of a 28-pixel
image; before medfed stopped MONAI from flipping its scale, 0.04).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import nn

DEFAULT_ATTRIBUTION = "integrated_gradients"
"""Method used by ``medfed explain`` and the gallery unless ``--method`` says otherwise."""


class Attributor(Protocol):
    """An explanation method bound to one model."""

    def __call__(self, images: np.ndarray | torch.Tensor, *, class_index: int | None = None) -> np.ndarray:
        """Maps ``float32 (N, H, W)`` in ``[0, 1]`` for ``class_index`` (default: each image's arg-max class)."""
        ...


AttributorFactory = Callable[..., Attributor]
"""``factory(model, **options) -> Attributor``."""

_REGISTRY: dict[str, AttributorFactory] = {}


def register_attribution(name: str, factory: AttributorFactory, *, replace: bool = False) -> None:
    """Register an attribution method under ``name``.

    Raises:
        ValueError: If ``name`` is taken and ``replace`` is false.
    """
    if name in _REGISTRY and not replace:
        raise ValueError(f"attribution method {name!r} is already registered")
    _REGISTRY[name] = factory


def _ensure_builtin() -> None:
    if "gradcam" in _REGISTRY:
        return
    from federation.inference.gradcam import GradCamExplainer  # noqa: PLC0415
    from federation.inference.integrated_gradients import IntegratedGradientsExplainer  # noqa: PLC0415
    from federation.inference.occlusion import OcclusionExplainer  # noqa: PLC0415

    register_attribution("gradcam", GradCamExplainer, replace=True)
    register_attribution("integrated_gradients", IntegratedGradientsExplainer, replace=True)
    register_attribution("occlusion", OcclusionExplainer, replace=True)


def available_attributions() -> list[str]:
    """Names of the registered attribution methods, sorted."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def make_attributor(name: str, model: nn.Module, **options: object) -> Attributor:
    """Build the attribution method ``name`` for ``model``.

    Args:
        name: A registered method (:func:`available_attributions`).
        model: Classifier returning logits.
        **options: Passed to the method (e.g. ``target_layer`` for ``gradcam``).

    Raises:
        ValueError: Unknown name (the message lists the valid ones) or bad options.
    """
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attribution method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](model, **options)


def scale_unit(maps: np.ndarray) -> np.ndarray:
    """Clip ``(N, H, W)`` maps at 0 and divide each by its maximum (all-zero maps stay 0)."""
    out = np.clip(np.asarray(maps, dtype=np.float32), 0.0, None)
    peak = out.reshape(len(out), -1).max(axis=1) if out.size else np.zeros(0, np.float32)
    scale = np.where(peak > 0, peak, 1.0).astype(np.float32)
    return out / scale.reshape(-1, *([1] * (out.ndim - 1)))
