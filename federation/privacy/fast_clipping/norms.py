"""Per-sample gradient norms of convolutions and normalization layers (mixed ghost clipping).

Opacus' ghost clipping (``grad_sample_mode="ghost"``) needs, for every trainable
layer, the per-sample gradient *norm* only: the clipped gradient is then obtained
by a second backward pass through a per-sample-reweighted loss. Stock Opacus ships
such *norm samplers* for ``nn.Linear`` and ``nn.Embedding`` only, and falls back to
materializing full per-sample gradients for everything else. This module adds
norm samplers for ``nn.Conv1d/2d/3d``, ``nn.GroupNorm`` and
``nn.InstanceNorm1d/2d/3d`` and registers them with Opacus' norm-sampler registry
(:func:`opacus.grad_sample.register_norm_sampler`) when it is imported.

Convolution maths (Bu et al. 2022, "Scalable and efficient training of large
convolutional neural networks with differential privacy"). Unfold the layer input
of sample ``i`` to ``a_i`` of shape ``(T, d)`` (``T`` output positions, ``d =
C_in / groups * prod(kernel)``) and reshape the output gradient to ``g_i`` of
shape ``(T, p)`` (``p = C_out / groups``); per group, the per-sample weight
gradient is ``G_i = g_i^T a_i`` (``p x d``). Its squared Frobenius norm is either

* **ghost**: ``sum_{t,t'} (a_t . a_t') (g_t . g_t')`` - two ``T x T`` Gram matrices,
  ``O(T^2 (d + p))`` work and ``T^2`` memory per sample, never forming ``G_i``; or
* **materialize**: form ``G_i``, ``O(T d p)`` work and ``d p`` memory per sample,
  then take its norm; either as a batched matmul of unfolded patches in
  cache-sized chunks (``"unfold"``) or with the weight-gradient kernel itself,
  the batch folded into convolution groups (``"kernel"``).

"Mixed" ghost clipping picks, per layer and per call, the cheaper of the two:
ghost when ``T (d + p) < d p`` (``2 T (d + p) < d p`` when the per-sample
gradients are kept for the clipped sum, see :func:`ghost_is_cheaper`). At 28 px
this materializes the large early feature maps (ResNet-18 layer1: ``T = 784``) and
uses ghost norms for the deep, wide layers (layer4: ``T = 16``,
``d p = 4608 * 512``), where per-sample gradients would cost ``B * 9.4 MB``. The
bias gradient is ``sum_t g_t`` and is always formed.

Normalization layers have per-sample gradients of size ``(B, C)``, so their norm
samplers simply form them (with the layer's fused backward kernel, batch folded into
groups: :func:`norm_layer_grad_samples`) and take the norm.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooksFastGradientClipping, register_norm_sampler
from opacus.utils.module_utils import trainable_modules
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ConvMethod = Literal["auto", "ghost", "unfold", "kernel"]
"""How :func:`conv_norm_sample` gets a convolution's per-sample weight-gradient norms."""

CONV_METHODS: tuple[str, ...] = get_args(ConvMethod)

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

CHUNK_ELEMENTS = 1 << 21
"""Samples are processed in chunks whose largest intermediate holds about this many elements.

Unfolded patches of a whole batch are large (ResNet-18 layer1, 64 samples: 115 MB);
chunks of ~8 MB stay in cache and make the norm about 1.7x faster on CPU.
"""

KERNEL_MAX_OUT_CHANNELS = 64
"""Materialized per-sample conv gradients use the weight-gradient kernel (batch folded into groups) up
to this many output channels and unfold + batched matmul above (the faster of the two on CPU, measured
at 28 px, batch 64, 1 thread, with the same grouped kernel reached through vmap: 16 channels 6.7 vs
15.3 ms, 64 channels 92 vs 119 ms, 128 channels 164 vs 85 ms)."""

UNFOLD_MAX_FAN_IN = 16
"""...but unfold + batched matmul for layers whose patches are this small (``C_in / groups * prod(kernel)``,
e.g. a first layer on 1-channel images: 0.8 vs 1.6 ms at 28 px, 16 channels, batch 64, 2 threads)."""

KERNEL_LOOP_MIN_POSITIONS = 32768
"""3-D convolutions with at least this many output positions (32^3) get their per-sample weight gradients
from the ungrouped weight-gradient kernel once per sample instead of once with the batch folded into
groups, which CPU kernels handle poorly for large volumes (the hippo preset's 40 x 56 x 40 volumes, batch 8,
16 -> 8 channels, 2 threads: 1.5 s per-sample loop vs 9.3 s grouped; at 20 x 28 x 20 the grouped kernel
still wins, 0.14 vs 0.55 s)."""

_STOCK_NORM_SAMPLERS = dict(GradSampleHooksFastGradientClipping.NORM_SAMPLERS)
"""Opacus' own norm samplers (Linear, Embedding), captured before ours are registered."""


def _padding(layer: nn.Module, spatial: int) -> list[tuple[int, int]]:
    """``(left, right)`` padding per spatial dim of a conv layer (ints, ``"same"`` or ``"valid"``)."""
    if layer.padding == "valid":
        return [(0, 0)] * spatial
    if layer.padding == "same":
        pads = []
        for k, dil in zip(layer.kernel_size, layer.dilation):
            total = dil * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(int(p), int(p)) for p in layer.padding]


def conv_padding(layer: nn.Module, x: Tensor) -> tuple[Tensor, list[int]]:
    """Return ``(x', padding)`` such that ``conv(x', padding=padding)`` equals ``layer(x)``'s conv.

    Non-zero padding modes (reflect, replicate, circular) and asymmetric ``"same"``
    padding are applied to ``x`` explicitly (then ``padding`` is all zeros); plain
    symmetric zero padding is returned as per-dimension amounts.
    """
    pads = _padding(layer, x.dim() - 2)
    if layer.padding_mode == "zeros" and all(left == right for left, right in pads):
        return x, [left for left, _ in pads]
    flat = [v for pair in reversed(pads) for v in pair]  # F.pad wants the last dim first
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, flat, mode=mode), [0] * len(pads)


def unfold_conv_input(layer: nn.Module, x: Tensor) -> Tensor:
    """Unfold a conv layer's input ``(B, C_in, *S)`` to patches ``(B, C_in * prod(kernel), T)``.

    Handles any spatial rank (1D/2D/3D), stride, dilation, integer or string padding
    and every ``padding_mode``; patch entries are ordered channel-major, as in the
    layer's weight ``(C_out, C_in / groups, *kernel)``, so groups are contiguous.

    Args:
        layer: An ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.
        x: The layer's input.

    Returns:
        The patches; ``T`` is the number of output positions.
    """
    spatial = x.dim() - 2
    x, padding = conv_padding(layer, x)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    for dim, (k, dil, step) in enumerate(zip(layer.kernel_size, layer.dilation, layer.stride)):
        x = x.unfold(2 + dim, dil * (k - 1) + 1, step)  # (B, C, O_1.., K'_1..) after all dims
    if any(dil != 1 for dil in layer.dilation):
        index = (Ellipsis, *(slice(None, None, dil) for dil in layer.dilation))
        x = x[index]
    batch, channels = x.shape[:2]
    outputs, kernel = x.shape[2:2 + spatial], x.shape[2 + spatial:]
    order = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]
    return x.permute(order).reshape(batch, channels * math.prod(kernel), math.prod(outputs))


def ghost_is_cheaper(*, positions: int, fan_in: int, fan_out: int, book_keeping: bool = False) -> bool:
    """Whether the ghost norm costs less than materializing the per-sample gradients.

    For the norm alone, ghost (``T^2 (d + p)``) against materializing (``T d p``).
    With ``book_keeping`` (the clipped sum is formed from what the norm pass kept)
    ghost also pays one weight-gradient kernel (``T d p``) for the clipped sum,
    while materialized gradients only need a weighted sum; ghost then wins only at
    half the cost: ``2 T (d + p) < d p`` (measured on the default CNN's 64-channel
    7 x 7 layers, ghost norm plus kernel 6.5 ms against 5.5 ms materialized).
    """
    factor = 2 if book_keeping else 1
    return factor * positions * (fan_in + fan_out) < fan_in * fan_out


def _sq_norms_ghost(a: Tensor, g: Tensor) -> Tensor:
    """``||g_i a_i^T||_F^2`` for ``a`` (N, d, T), ``g`` (N, p, T) through ``T x T`` Gram matrices."""
    gram_a = torch.bmm(a.transpose(1, 2), a)
    gram_g = torch.bmm(g.transpose(1, 2), g)
    return (gram_a * gram_g).sum(dim=(1, 2))


def _kernel_conv_grads(layer: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients ``(B, *weight.shape)`` from one weight-gradient convolution.

    The batch is folded into the channels and the groups (input ``(1, B C_in, *S)``,
    ``B * groups`` groups), so the layer's own weight-gradient kernel returns every
    sample's gradient at once; on CPU this beats unfold + batched matmul for layers
    with few output channels (see :data:`KERNEL_MAX_OUT_CHANNELS`). Large 3-D outputs
    (:data:`KERNEL_LOOP_MIN_POSITIONS`) call the ungrouped kernel once per sample instead.
    """
    x, padding = conv_padding(layer, x)
    batch, spatial = x.shape[0], x.dim() - 2
    if spatial == 3 and g.shape[-1] >= KERNEL_LOOP_MIN_POSITIONS:  # large volumes: one ungrouped call per sample
        out = _output_size(layer, x, padding)
        return torch.stack([torch.ops.aten.convolution_backward(
            g[i:i + 1].reshape(1, layer.out_channels, *out), x[i:i + 1], layer.weight.detach().to(g.dtype), None,
            list(layer.stride), padding, list(layer.dilation), False, [0] * spatial, layer.groups,
            [False, True, False])[1] for i in range(batch)])
    g = g.reshape(1, batch * layer.out_channels, *_output_size(layer, x, padding))
    # The weight-gradient kernel reads the weight's shape, never its values: an uninitialized
    # tensor of the batched shape saves copying the weight B times.
    weight = layer.weight.new_empty((batch * layer.out_channels, *layer.weight.shape[1:]), dtype=g.dtype)
    grads = torch.ops.aten.convolution_backward(
        g, x.reshape(1, -1, *x.shape[2:]), weight, None, list(layer.stride), padding,
        list(layer.dilation), False, [0] * spatial, batch * layer.groups, [False, True, False],
    )[1]
    return grads.reshape(batch, *layer.weight.shape)


def materialize_method(*, fan_in: int, out_channels: int) -> Literal["unfold", "kernel"]:
    """How to form per-sample conv gradients: ``"kernel"`` or ``"unfold"`` (see the two thresholds)."""
    if fan_in <= UNFOLD_MAX_FAN_IN or out_channels > KERNEL_MAX_OUT_CHANNELS:
        return "unfold"
    return "kernel"


def _output_size(layer: nn.Module, x: Tensor, padding: list[int]) -> list[int]:
    """Spatial output size of ``layer`` on the (already padded as needed) input ``x``."""
    return [
        (size + 2 * pad - dil * (k - 1) - 1) // step + 1
        for size, pad, dil, k, step in zip(x.shape[2:], padding, layer.dilation, layer.kernel_size, layer.stride)
    ]


def conv_weight_norms(
    layer: nn.Module, x: Tensor, g: Tensor, *, method: ConvMethod = "auto", keep: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Per-sample weight-gradient norms of a convolution, and the per-sample gradients if formed.

    Args:
        layer: ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` whose weight requires grad.
        x: The layer input ``(B, C_in, *S)``.
        g: The gradient w.r.t. the layer output, ``(B, C_out, T)``.
        method: ``"ghost"``, ``"unfold"``, ``"kernel"`` or ``"auto"`` (ghost when
            :func:`ghost_is_cheaper`, else :func:`materialize_method`).
        keep: Return the per-sample weight gradients ``(B, *weight.shape)`` when the
            materializing path formed them (``None`` on the ghost path), for
            book-keeping; ``"auto"`` then materializes more often.

    Returns:
        ``((B,) norms, per-sample gradients or None)``.
    """
    batch, groups = x.shape[0], layer.groups
    if batch == 0:
        return g.new_zeros(0), (g.new_zeros(0, *layer.weight.shape) if keep else None)
    positions = g.shape[-1]
    fan_in = layer.weight[0].numel()
    fan_out = layer.out_channels // groups
    if method == "auto":
        ghost = ghost_is_cheaper(positions=positions, fan_in=fan_in, fan_out=fan_out, book_keeping=keep)
        method = "ghost" if ghost else materialize_method(fan_in=fan_in, out_channels=layer.out_channels)
    if method == "kernel":
        grads_k = _kernel_conv_grads(layer, x, g)
        norms = torch.linalg.vector_norm(grads_k.reshape(batch, -1), dim=1)
        return norms, (grads_k if keep else None)
    ghost = method == "ghost"
    per_sample = groups * max(fan_in * positions, positions * positions if ghost else fan_in * fan_out)
    chunk = max(1, CHUNK_ELEMENTS // per_sample)
    squares, grads = [], []
    for xc, gc in zip(x.split(chunk), g.split(chunk)):
        a = unfold_conv_input(layer, xc).reshape(xc.shape[0] * groups, fan_in, positions)
        gg = gc.reshape(xc.shape[0] * groups, fan_out, positions)
        if ghost:
            squares.append(_sq_norms_ghost(a, gg))
        else:
            grad = torch.bmm(gg, a.transpose(1, 2))  # (N * groups, p, d)
            squares.append(torch.linalg.vector_norm(grad, dim=(1, 2)).square())
            if keep:
                grads.append(grad.reshape(xc.shape[0], *layer.weight.shape))
    norms = torch.cat(squares).reshape(batch, groups).sum(dim=1).clamp(min=0).sqrt()
    return norms, (torch.cat(grads) if grads else None)


def conv_norm_sample(
    layer: nn.Module,
    activations: Sequence[Tensor],
    backprops: Tensor,
    *,
    method: ConvMethod = "auto",
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient norms of a convolution's weight and bias (an Opacus norm sampler).

    Args:
        layer: ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.
        activations: ``[input]`` of the layer, as captured by Opacus' forward hook.
        backprops: Gradient of the (batch-size-scaled) loss w.r.t. the layer output.
        method: ``"ghost"``, ``"unfold"``, ``"kernel"`` or ``"auto"`` (see
            :func:`conv_weight_norms`).

    Returns:
        ``{parameter: (B,) norms}`` for the weight and bias that require gradients.

    Raises:
        ValueError: On an unknown ``method``.
    """
    if method not in CONV_METHODS:
        raise ValueError(f"unknown conv norm method {method!r}; expected one of {', '.join(CONV_METHODS)}")
    x = activations[0].to(backprops.dtype)
    g = backprops.reshape(x.shape[0], layer.out_channels, -1)
    result: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        result[layer.weight] = conv_weight_norms(layer, x, g, method=method)[0]
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = torch.linalg.vector_norm(g.sum(dim=2), dim=1)
    return result


def _norms_of(grad_samples: dict[nn.Parameter, Tensor]) -> dict[nn.Parameter, Tensor]:
    """Per-sample L2 norms of per-sample gradients ``(B, *shape)``."""
    return {p: torch.linalg.vector_norm(gs.reshape(gs.shape[0], -1), dim=1) for p, gs in grad_samples.items()}


def saved_group_norm_stats(output: Tensor) -> tuple[Tensor, Tensor] | None:
    """The ``(B, G)`` mean and reciprocal standard deviation a GroupNorm's forward saved for its backward.

    Read from the output's autograd node (``NativeGroupNormBackward0``), so that
    :func:`norm_layer_grad_samples` need not recompute them; ``None`` when the output
    came from another kernel (InstanceNorm, a custom layer).
    """
    node = output.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()


def norm_layer_grad_samples(
    layer: nn.Module, activations: Sequence[Tensor], backprops: Tensor, *,
    stats: tuple[Tensor, Tensor] | None = None,
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients ``(B, C)`` of a GroupNorm's or affine InstanceNorm's scale and shift.

    The batch is folded into the groups (input ``(1, B C, S)``, ``B G`` groups; an
    InstanceNorm is a GroupNorm with one channel per group), so the layer's own fused
    backward kernel, whose scale and shift gradients sum over the batch, returns them
    per sample: ``sum_s g x_hat`` and ``sum_s g``, without forming ``g x_hat``
    (Opacus' grad samplers multiply and reduce separately: 1.4x slower on the
    default CNN's layers).

    Args:
        layer: ``nn.GroupNorm`` or ``nn.InstanceNorm1d/2d/3d`` (in training, i.e. batch statistics).
        activations: ``[input]`` of the layer.
        backprops: Gradient w.r.t. the layer output.
        stats: The forward pass's ``(B, G)`` mean and reciprocal standard deviation
            (:func:`saved_group_norm_stats`); recomputed from the input when ``None``.

    Returns:
        ``{parameter: (B, C) per-sample gradients}`` for the parameters that require gradients.
    """
    x = activations[0].to(backprops.dtype)
    batch, channels = x.shape[:2]
    groups = layer.num_groups if isinstance(layer, nn.GroupNorm) else channels
    if batch == 0:
        grad_scale = grad_shift = x.new_zeros(0, channels)
    else:
        size = math.prod(x.shape[2:])
        flat_x, flat_g = x.reshape(1, batch * channels, size), backprops.reshape(1, batch * channels, size)
        if stats is None:
            _, mean, rstd = torch.ops.aten.native_group_norm(
                flat_x, None, None, 1, batch * channels, size, batch * groups, layer.eps
            )
        else:
            mean, rstd = (t.to(x.dtype).reshape(1, batch * groups) for t in stats)
        _, grad_scale, grad_shift = torch.ops.aten.native_group_norm_backward(
            flat_g, flat_x, mean, rstd, flat_x.new_ones(batch * channels), 1, batch * channels, size,
            batch * groups, [False, True, True],
        )
    result: dict[nn.Parameter, Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        result[layer.weight] = grad_scale.reshape(batch, channels)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = grad_shift.reshape(batch, channels)
    return result


def norm_layer_norm_sample(
    layer: nn.Module, activations: Sequence[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient norms of a GroupNorm's or affine InstanceNorm's parameters (an Opacus norm sampler)."""
    return _norms_of(norm_layer_grad_samples(layer, activations, backprops))


def _auto_conv_norm_sample(
    layer: nn.Module, activations: Sequence[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """The registered conv norm sampler: :func:`conv_norm_sample` with ``method="auto"``."""
    return conv_norm_sample(layer, activations, backprops, method="auto")


MEDFED_NORM_SAMPLERS = {
    **{cls: _auto_conv_norm_sample for cls in CONV_TYPES},
    **{cls: norm_layer_norm_sample for cls in NORM_TYPES},
}
"""The norm samplers this module adds to Opacus, by layer type."""


def register_norm_samplers() -> None:
    """Register medfed's norm samplers with Opacus (idempotent; done on import)."""
    for cls, sampler in MEDFED_NORM_SAMPLERS.items():
        register_norm_sampler(cls)(sampler)


def covered_types() -> set[type[nn.Module]]:
    """Layer types whose per-sample gradient norms Opacus' ghost clipping now computes directly."""
    return set(GradSampleHooksFastGradientClipping.NORM_SAMPLERS)


def uncovered_layers(model: nn.Module) -> list[str]:
    """Names of trainable submodules without a norm sampler (ghost clipping materializes those).

    Args:
        model: The network (plain or wrapped).

    Returns:
        ``"name (Type)"`` strings, empty when every trainable layer is covered.
    """
    covered = covered_types()
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in trainable_modules(model)
            if type(m) not in covered]


@contextlib.contextmanager
def stock_norm_samplers() -> Iterator[None]:
    """Temporarily restore Opacus' own norm-sampler registry (for benchmarks and comparisons)."""
    registry = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    saved = dict(registry)
    registry.clear()
    registry.update(_STOCK_NORM_SAMPLERS)
    try:
        yield
    finally:
        registry.clear()
        registry.update(saved)


register_norm_samplers()
