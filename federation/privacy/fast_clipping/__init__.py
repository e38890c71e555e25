"""Fast per-sample gradient clipping for convolutional networks (medfed's ``ghost`` mode).

* :mod:`~federation.privacy.fast_clipping.norms`: per-sample gradient norm samplers
  for convolutions (mixed ghost / materialized, Bu et al. 2022), GroupNorm and
  InstanceNorm, registered with Opacus' norm-sampler registry on import.
* :mod:`~federation.privacy.fast_clipping.bookkeeping`: :class:`GhostClippingModule`,
  which turns those norms into the clipped gradient sum with one backward pass.
* :mod:`~federation.privacy.fast_clipping.optimizer`: :class:`GhostDPOptimizer`,
  Opacus' fast-gradient-clipping optimizer without its per-step deep copies.
* :func:`select_grad_sample_mode`: what ``privacy.grad_sample_mode="auto"`` picks.

Example::

    from federation.privacy.fast_clipping import GhostClippingModule

    dp_model = GhostClippingModule(model, max_grad_norm=1.0)
    losses = F.cross_entropy(dp_model(images), labels, reduction="none")
    dp_model.clipped_backward(losses)   # p.grad = clipped sum, one backward pass
"""

from __future__ import annotations

import torch
from torch import nn

from federation.privacy.fast_clipping.bookkeeping import GhostClippingModule, clipped_sum
from federation.privacy.fast_clipping.norms import (
    MEDFED_NORM_SAMPLERS,
    conv_norm_sample,
    covered_types,
    ghost_is_cheaper,
    register_norm_samplers,
    stock_norm_samplers,
    uncovered_layers,
    unfold_conv_input,
)
from federation.privacy.fast_clipping.optimizer import GhostDPOptimizer

GRAD_SAMPLE_MODES = ("auto", "ghost", "hooks", "ew", "functorch")
"""Values of ``privacy.grad_sample_mode``."""


GPU_GHOST_MAX_LAYERS = 64
"""On CUDA, ``auto`` picks ``ghost`` only for networks with at most this many
parametrized layers (the CNN: 13, ResNet-18: 41); deeper ones (DenseNet-121: 242)
get ``hooks``."""


def _parametrized_layers(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False)))


def select_grad_sample_mode(model: nn.Module, *, device: torch.device | str | None = None) -> str:
    """The ``grad_sample_mode`` that ``"auto"`` resolves to for ``model`` on ``device``.

    ``"hooks"`` when some trainable layer has no norm sampler (``hooks`` supports
    the most layer types). Otherwise, measured in ``bench/dp_cost.py`` and
    ``bench/gpu_bench.py`` (docs/BENCHMARKS.md, "P2 DP-SGD cost"):

    * CPU: ``"ghost"``, the fastest mode for every registered network, and it never
      holds per-sample gradients of the whole model.
    * CUDA: ``"ghost"`` for networks of at most :data:`GPU_GHOST_MAX_LAYERS`
      parametrized layers (fastest for the CNN, on par with hooks for ResNet-18
      with 6 GB less memory); ``"hooks"`` for deeper ones, where ghost's extra
      per-layer kernels made DenseNet-121 1.4x slower than hooks on an H200.

    Args:
        model: The (unwrapped) network.
        device: Where it trains; ``None`` = the device of its first parameter.

    Returns:
        ``"ghost"`` or ``"hooks"``.
    """
    if uncovered_layers(model):
        return "hooks"
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if torch.device(device).type == "cuda" and _parametrized_layers(model) > GPU_GHOST_MAX_LAYERS:
        return "hooks"
    return "ghost"


__all__ = [
    "GPU_GHOST_MAX_LAYERS",
    "GRAD_SAMPLE_MODES",
    "MEDFED_NORM_SAMPLERS",
    "GhostClippingModule",
    "GhostDPOptimizer",
    "clipped_sum",
    "conv_norm_sample",
    "covered_types",
    "ghost_is_cheaper",
    "register_norm_samplers",
    "select_grad_sample_mode",
    "stock_norm_samplers",
    "uncovered_layers",
    "unfold_conv_input",
]
