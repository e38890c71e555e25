"""Ghost clipping in one backward pass: mixed ghost norms plus book-keeping.

Opacus' ghost clipping (:class:`~opacus.grad_sample.GradSampleModuleFastGradientClipping`
with :class:`~opacus.utils.fast_gradient_clipping_utils.DPLossFastGradientClipping`)
runs two full backward passes: the first computes per-sample gradient norms (and,
wastefully, the full parameter gradients), the second back-propagates the loss
reweighted by the clipping factors ``c_i = min(1, C / ||g_i||)``.

:class:`GhostClippingModule` keeps Opacus' hooks and norm samplers but:

1. runs the norm pass with :func:`torch.autograd.grad` towards the outputs of the
   first trainable layers (those whose inputs need no gradient, e.g. the stem
   convolution on the images), so autograd skips every weight-gradient kernel and
   the first layers' backward entirely (only the output gradients that each layer's
   hook needs are computed);
2. keeps, per layer, what the clipped sum needs ("book-keeping", Bu et al. 2023,
   "Differentially private optimization on large model at small cost") and, once
   every norm is known, forms ``sum_i c_i * grad_i`` without a second backward pass:

   * convolutions whose per-sample gradients were materialized for the norm (large
     feature maps, see :func:`~federation.privacy.fast_clipping.norms.ghost_is_cheaper`),
     GroupNorm and InstanceNorm: the ``c``-weighted sum of those per-sample gradients;
   * ghost-normed convolutions, linear layers and anything else: the layer's
     input and output gradient. Per-sample gradients are linear in the output
     gradient, so the clipped sum is the ordinary weight-gradient kernel
     (convolution / matmul) applied to the ``c_i``-scaled output gradients.

Output gradients are captured by tensor hooks registered on each layer's output
during the forward pass (Opacus registers module full-backward hooks, whose
input/output wrapping cost ~6-10 ms per step on the default CNN, measured on CPU).
The clipped sum is formed by an autograd callback queued by the first hook of the
pass, so a plain ``loss.backward()`` through the module also ends with clipped
gradients (it just computes the weight gradients once for nothing);
:meth:`GhostClippingModule.clipped_backward` is the fast way.

The result, written to ``p.grad``, is exactly what Opacus' second pass produces
(the clipped per-sample gradient sum); :class:`~opacus.optimizers.DPOptimizerFastGradientClipping`
then adds the noise and divides by the expected batch size as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from opacus.utils.module_utils import requires_grad, trainable_parameters
from torch import Tensor, nn

from federation.privacy.fast_clipping.norms import (
    CONV_TYPES,
    NORM_TYPES,
    conv_padding,
    conv_weight_norms,
    norm_layer_grad_samples,
    saved_group_norm_stats,
)

logger = logging.getLogger(__name__)

NormSampler = Callable[[nn.Module, Sequence[Tensor], Tensor], dict[nn.Parameter, Tensor]]

KEEP_ELEMENTS = 1 << 26
"""Materialized per-sample conv gradients larger than this (elements, whole batch) are not kept
for the clipped sum (recomputed with one weight-gradient kernel instead); 256 MB in float32."""


def _conv_clipped_sum(layer: nn.Module, x: Tensor, g: Tensor) -> dict[nn.Parameter, Tensor]:
    """Weight/bias gradient of a convolution for input ``x`` and (already scaled) output gradient ``g``."""
    x, padding = conv_padding(layer, x)
    spatial = x.dim() - 2
    want_w = layer.weight.requires_grad
    want_b = layer.bias is not None and layer.bias.requires_grad
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        g, x, layer.weight.to(g.dtype), [layer.out_channels] if layer.bias is not None else None,
        list(layer.stride), padding, list(layer.dilation), False, [0] * spatial, layer.groups,
        [False, want_w, want_b],
    )
    result: dict[nn.Parameter, Tensor] = {}
    if want_w:
        result[layer.weight] = grad_w
    if want_b:
        result[layer.bias] = grad_b
    return result


def _linear_clipped_sum(layer: nn.Linear, x: Tensor, g: Tensor) -> dict[nn.Parameter, Tensor]:
    """Weight/bias gradient of a linear layer (any number of middle dimensions)."""
    result: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        result[layer.weight] = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = g.reshape(-1, g.shape[-1]).sum(dim=0)
    return result


def clipped_sum(
    module: nn.Module, activations: Sequence[Tensor], backprops: Tensor, coef: Tensor, *,
    grad_samplers: dict,
) -> dict[nn.Parameter, Tensor]:
    """``sum_i coef_i * grad_i`` for each trainable parameter of ``module``, from its input and output gradient.

    Args:
        module: The layer.
        activations: Its inputs, as captured by Opacus (batch first).
        backprops: Gradient of the per-sample losses w.r.t. its output (batch first).
        coef: ``(B,)`` clipping factors.
        grad_samplers: Opacus' per-sample gradient functions by layer type; layers
            without a fast path form per-sample gradients of the scaled output
            gradient with these (or with functorch) and sum them.

    Returns:
        The clipped gradient sum per parameter.
    """
    scaled = backprops * coef.to(backprops.dtype).view(-1, *([1] * (backprops.dim() - 1)))
    x = activations[0].to(backprops.dtype) if activations else None
    if type(module) in CONV_TYPES and x is not None:
        return _conv_clipped_sum(module, x, scaled)
    if type(module) is nn.Linear and x is not None:
        return _linear_clipped_sum(module, x, scaled)
    sampler = grad_samplers.get(type(module), ft_compute_per_sample_gradient)
    return {p: gs.sum(dim=0) for p, gs in sampler(module, list(activations), scaled).items()}


def _weighted(coef: Tensor, grad_samples: dict[nn.Parameter, Tensor]) -> dict[nn.Parameter, Tensor]:
    """``sum_i coef_i * grad_samples[p][i]`` per parameter."""
    return {p: torch.tensordot(coef.to(gs.dtype), gs, dims=1) for p, gs in grad_samples.items()}


def _norms(grad_samples: dict[nn.Parameter, Tensor]) -> dict[nn.Parameter, Tensor]:
    return {p: torch.linalg.vector_norm(gs.reshape(gs.shape[0], -1), dim=1) for p, gs in grad_samples.items()}


class GhostClippingModule(GradSampleModuleFastGradientClipping):
    """Opacus' fast-gradient-clipping module with a single-backward clipped gradient.

    Use :meth:`clipped_backward` instead of ``loss.backward()``; it leaves the
    clipped per-sample gradient sum in ``p.grad`` for
    :class:`~opacus.optimizers.DPOptimizerFastGradientClipping`.

    Args:
        m: The module to wrap.
        max_grad_norm: Per-sample clipping bound ``C``.
        batch_first: Whether inputs are batch first.
        loss_reduction: ``"mean"`` or ``"sum"`` (how the optimizer scales the sum).
        strict: Refuse modules with buffers (Opacus' validation).
    """

    def __init__(
        self, m: nn.Module, *, max_grad_norm: float, batch_first: bool = True,
        loss_reduction: str = "mean", strict: bool = True,
    ) -> None:
        super().__init__(
            m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
            force_functorch=False, max_grad_norm=max_grad_norm, use_ghost_clipping=True,
        )
        self._frontier: list[Tensor] = []
        """Where the norm pass stops: outputs of this forward pass's layers whose inputs need no
        gradient, and leaf inputs that do (a batch with ``requires_grad``)."""
        self._norm_stats: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        """GroupNorm forward statistics of this forward pass, by layer (saves recomputing them)."""
        self._kept_grads: list[dict[nn.Parameter, Tensor]] = []
        self._kept_io: list[tuple[nn.Module, list[Tensor], Tensor]] = []
        self._pass_open = False
        self._backprop_scale = 1.0
        self.last_clipping_coef: Tensor | None = None
        """The ``(B,)`` clipping factors of the last backward pass (not private: debugging only)."""
        # Per-instance norm samplers (Opacus looks them up through self.NORM_SAMPLERS):
        # the registry's, wrapped so that they also keep what the clipped sum needs.
        self.NORM_SAMPLERS = {cls: self._keeping_sampler(cls, fn) for cls, fn in type(self).NORM_SAMPLERS.items()}

    def _keeping_sampler(self, cls: type[nn.Module], registered: NormSampler) -> NormSampler:
        """A norm sampler for layers of type ``cls`` that also records book-keeping data."""

        def conv(layer: nn.Module, activations: Sequence[Tensor], backprops: Tensor) -> dict:
            x = activations[0].to(backprops.dtype)
            g = backprops.reshape(x.shape[0], layer.out_channels, -1)
            keep = layer.weight.numel() * x.shape[0] <= KEEP_ELEMENTS
            norms: dict[nn.Parameter, Tensor] = {}
            kept: dict[nn.Parameter, Tensor] = {}
            if layer.weight.requires_grad:
                norms[layer.weight], grads = conv_weight_norms(layer, x, g, keep=keep)
                if grads is not None:
                    kept[layer.weight] = grads
            if layer.bias is not None and layer.bias.requires_grad:
                kept[layer.bias] = g.sum(dim=2)
                norms[layer.bias] = torch.linalg.vector_norm(kept[layer.bias], dim=1)
            if layer.weight.requires_grad and layer.weight not in kept:
                self._kept_io.append((layer, list(activations), backprops))
                kept.pop(layer.bias, None)  # the weight-gradient kernel returns the bias too
            self._kept_grads.append(kept)
            return norms

        def per_sample(layer: nn.Module, activations: Sequence[Tensor], backprops: Tensor) -> dict:
            stats = self._norm_stats.pop(layer, None)
            grad_samples = norm_layer_grad_samples(layer, activations, backprops, stats=stats)
            self._kept_grads.append(grad_samples)
            return _norms(grad_samples)

        def io(layer: nn.Module, activations: Sequence[Tensor], backprops: Tensor) -> dict:
            self._kept_io.append((layer, list(activations), backprops))
            return registered(layer, activations, backprops)

        if cls in CONV_TYPES:
            return conv
        if cls in NORM_TYPES:
            return per_sample
        return io

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False) -> None:
        """Capture each trainable layer's input (forward hook) and output gradient (tensor hook on its output).

        Same contract as Opacus' ``add_hooks`` (one forward hook per layer, handles in
        ``autograd_grad_sample_hooks``, :meth:`disable_hooks` honoured), but the output
        gradient reaches :meth:`capture_backprops_hook` through a hook on the output
        tensor rather than a module full-backward hook, which wraps every layer's
        inputs and outputs in extra autograd nodes.
        """
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        on_grad = partial(self._output_grad_hook, loss_reduction=loss_reduction, batch_first=batch_first)
        for module in self.iterate_submodules(self._module):
            if type(module) in (DPRNN, DPLSTM, DPGRU):  # their RNNLinear layers carry the hooks
                continue
            if force_functorch or self._get_module_type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=batch_first)
            self.autograd_grad_sample_hooks.append(
                module.register_forward_hook(partial(self._forward_hook, on_grad=on_grad))
            )
        self.enable_hooks()

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: object, *, on_grad: Callable) -> None:
        """Record the layer input; hook its output's gradient; note the output if the input needs no gradient."""
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled() and requires_grad(module)):
            return
        self.capture_activations_hook(module, inputs, output)
        out = output if isinstance(output, Tensor) else output[0]
        if not out.requires_grad:  # the layer detached its output: nothing to clip through it
            return
        out.register_hook(partial(on_grad, module))
        if isinstance(module, nn.GroupNorm) and (stats := saved_group_norm_stats(out)) is not None:
            self._norm_stats[module] = stats
        graded = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
        if not graded:
            self._frontier.append(out)
        # Inputs that are leaves requiring grad (not parameters), e.g. a batch the caller wants
        # gradients for: the pass must reach them as well, or layers on their path get no norm.
        for t in graded:
            if t.grad_fn is None and not isinstance(t, nn.Parameter) and all(t is not f for f in self._frontier):
                self._frontier.append(t)

    def _output_grad_hook(self, module: nn.Module, grad: Tensor, *, loss_reduction: str, batch_first: bool) -> None:
        self.capture_backprops_hook(module, (), (grad,), loss_reduction=loss_reduction, batch_first=batch_first)

    def forward(self, *args, **kwargs):  # noqa: D102
        self._frontier = []
        self._norm_stats.clear()
        return self._module(*args, **kwargs)

    def rearrange_grad_samples(self, *, module, backprops, loss_reduction, batch_first):  # noqa: D102
        if not self._pass_open:  # first hook of this backward pass: finish the pass when autograd is done
            self._pass_open = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_pass)
        # Opacus multiplies every layer's output gradient by the batch size under a mean loss
        # (a full pass over each feature map); per-sample gradients are linear in it, so the
        # factor is applied to the (B,) norms and clipping factors instead.
        activations, backprops = super().rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction="sum", batch_first=batch_first
        )
        self._backprop_scale = float(module.max_batch_len) if loss_reduction == "mean" else 1.0
        if type(module) not in self.NORM_SAMPLERS:  # no norm sampler: Opacus materializes
            self._kept_io.append((module, activations, backprops))
        return activations, backprops

    def get_norm_sample(self) -> Tensor:
        """Per-sample gradient norms of the whole model (of the loss as reduced, see :meth:`rearrange_grad_samples`)."""
        norms = super().get_norm_sample() * self._backprop_scale
        self.per_sample_gradient_norms = norms
        return norms

    def _reset_hook_state(self) -> None:
        """Forget captured activations and forward counts of a batch whose backward did not reach every layer."""
        for p in self.trainable_parameters:
            p._forward_counter = 0
        for module in self._module.modules():
            if hasattr(module, "activations"):
                module.activations = []
            if hasattr(module, "max_batch_len"):
                del module.max_batch_len

    def _finish_pass(self) -> None:
        """End of a backward pass (autograd callback): set ``p.grad`` to the clipped per-sample gradient sum.

        Overwrites ``p.grad`` (after a plain ``loss.backward()`` it holds the unclipped
        gradient of this batch; gradient accumulation over batches is not supported,
        as in Opacus with Poisson sampling).

        Raises:
            RuntimeError: If some trainable parameter got no per-sample norm.
        """
        params = dict(trainable_parameters(self._module))
        try:
            missing = [name for name, p in params.items() if getattr(p, "_norm_sample", None) is None]
            if missing:
                self._reset_hook_state()
                raise RuntimeError(
                    f"ghost clipping computed no per-sample norm for {missing[:5]} (not reached when "
                    "back-propagating to the first layers' outputs); use privacy.grad_sample_mode='hooks' for this model"
                )
            coef = self.get_clipping_coef()
            weights = coef * self._backprop_scale  # the kept gradients are of the unscaled output gradients
            sums = [_weighted(weights, kept) for kept in self._kept_grads]
            sums += [clipped_sum(module, activations, backprops, weights, grad_samplers=self.GRAD_SAMPLERS)
                     for module, activations, backprops in self._kept_io]
            clipped: dict[nn.Parameter, Tensor] = {}
            for grads in sums:
                for p, grad in grads.items():
                    grad = grad.to(p.dtype).view_as(p)
                    clipped[p] = grad if p not in clipped else clipped[p] + grad
            for p in params.values():
                p.grad = clipped[p]
            self.last_clipping_coef = coef
        finally:
            self._pass_open = False
            self._kept_grads.clear()
            self._kept_io.clear()
            for p in params.values():
                p._norm_sample = None

    def clipped_backward(self, losses: Tensor) -> Tensor:
        """Write ``sum_i min(1, C / ||grad_i||) * grad_i`` into ``p.grad`` of every trainable parameter.

        The norm pass back-propagates only to the outputs of the first trainable
        layers of the last forward pass (those whose inputs need no gradient) and to
        leaf inputs that require gradients, so autograd computes no weight gradient
        and nothing below those layers. A plain
        ``losses.mean().backward()`` gives the same result (the pass is finished by an
        autograd callback), but computes every weight gradient twice.

        Args:
            losses: ``(B,)`` per-sample losses of the batch just run through the module.

        Returns:
            The ``(B,)`` clipping factors that were applied.

        Raises:
            RuntimeError: If some trainable parameter got no per-sample norm (it is
                not on a path from a layer's output to the loss); train it with
                ``grad_sample_mode="hooks"`` instead.
        """
        reduced = losses.mean() if self.loss_reduction == "mean" else losses.sum()
        self.last_clipping_coef = None
        frontier, self._frontier = self._frontier, []
        if frontier:
            torch.autograd.grad(reduced, frontier, allow_unused=True)
        else:
            reduced.backward()
        if self.last_clipping_coef is None:
            raise RuntimeError("the backward pass reached no layer with trainable parameters")
        return self.last_clipping_coef
