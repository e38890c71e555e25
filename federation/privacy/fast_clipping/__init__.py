"""Fast per-sample gradient clipping for convolutional networks (medfed's ``ghost`` mode).

* :mod:`~federation.privacy.fast_clipping.norms`: per-sample gradient norm samplers
  for convolutions (mixed ghost / materialized, Bu et al. 2022), GroupNorm and
  InstanceNorm, registered with Opacus' norm-sampler registry on import.
* :mod:`~federation.privacy.fast_clipping.bookkeeping`: :class:`GhostClippingModule`,
  which turns those norms into the clipped gradient sum with one backward pass.
* :func:`select_grad_sample_mode`: what ``privacy.grad_sample_mode="auto"`` picks.

Example::

    from federation.privacy.fast_clipping import GhostClippingModule

    dp_model = GhostClippingModule(model, max_grad_norm=1.0)
    images.requires_grad_(True)            # lets the norm pass skip weight gradients
    losses = F.cross_entropy(dp_model(images), labels, reduction="none")
    dp_model.clipped_backward(losses, inputs=images)   # p.grad = clipped sum
"""

from __future__ import annotations

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

GRAD_SAMPLE_MODES = ("auto", "ghost", "hooks", "ew", "functorch")
"""Values of ``privacy.grad_sample_mode``."""


def select_grad_sample_mode(model: nn.Module) -> str:
    """The ``grad_sample_mode`` that ``"auto"`` resolves to for ``model``.

    ``"ghost"`` when every trainable layer has a norm sampler (convolutions,
    linear, embedding, group/instance norm: all medfed networks), since on CPU it
    was the fastest mode for every registered model in ``bench/dp_cost.py`` and it
    never holds per-sample gradients of the whole model (see docs/BENCHMARKS.md,
    "P2 DP-SGD cost", also for GPU figures, where it is not always the fastest);
    ``"hooks"`` otherwise, the mode that supports the most layer types.

    Args:
        model: The (unwrapped) network.

    Returns:
        ``"ghost"`` or ``"hooks"``.
    """
    return "ghost" if not uncovered_layers(model) else "hooks"


__all__ = [
    "GRAD_SAMPLE_MODES",
    "MEDFED_NORM_SAMPLERS",
    "GhostClippingModule",
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
