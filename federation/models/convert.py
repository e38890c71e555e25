"""Make a BatchNorm network trainable under DP-SGD without losing its pretrained statistics.

BatchNorm mixes the samples of a batch in training mode, so per-sample gradients do
not exist and Opacus refuses it. Networks pretrained on ImageNet carry BatchNorm
statistics that matter. ``model.batchnorm`` (with ``model.norm=batch``) converts
every BatchNorm layer:

* ``frozen``: :class:`FrozenBatchNorm`, ``y = (x - running_mean) / sqrt(running_var +
  eps) * weight + bias`` with all four as buffers: a frozen per-channel affine whose
  output equals the BatchNorm's in eval mode, in training mode too. The state_dict
  keeps BatchNorm's names, so BatchNorm checkpoints load into it unchanged.
* ``group``: ``GroupNorm`` (groups from :func:`federation.models.layers.group_count`)
  whose affine starts from the BatchNorm's weight and bias; it normalises with
  per-sample statistics, so the running statistics are dropped and outputs change.

Both pass Opacus' :class:`~opacus.validators.ModuleValidator`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from federation.models.layers import group_count

BATCHNORM_MODES = ("keep", "frozen", "group")
"""``model.batchnorm`` values."""


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine (buffers, no parameters), for 1-D to 3-D inputs.

    Args:
        num_features: Channels.
        eps: BatchNorm's epsilon.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm:
        """A frozen copy of ``bn``'s current statistics and affine."""
        frozen = cls(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.track_running_stats and bn.running_mean is not None:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
        return frozen.to(next(iter(bn.buffers()), torch.empty(0)).device)

    def forward(self, x: Tensor) -> Tensor:
        """``x * scale + shift`` per channel (dimension 1)."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)

    def extra_repr(self) -> str:
        """Channels and epsilon."""
        return f"{self.num_features}, eps={self.eps}"


def _group_from_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> nn.GroupNorm:
    group = nn.GroupNorm(group_count(bn.num_features), bn.num_features, eps=bn.eps, affine=True)
    if bn.affine:
        with torch.no_grad():
            group.weight.copy_(bn.weight)
            group.bias.copy_(bn.bias)
    return group


def convert_batchnorm(model: nn.Module, *, mode: str) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` in place (``mode``: frozen or group; keep: nothing).

    Args:
        model: Any network.
        mode: A :data:`BATCHNORM_MODES` value.

    Returns:
        ``model`` (the same object; a bare BatchNorm module is returned converted).

    Raises:
        ValueError: Unknown ``mode`` (the message lists the valid ones).
    """
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"model.batchnorm: unknown mode {mode!r}; valid: {', '.join(BATCHNORM_MODES)}")
    if mode == "keep":
        return model
    make = FrozenBatchNorm.from_batchnorm if mode == "frozen" else _group_from_batchnorm
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return make(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, make(child))
        else:
            convert_batchnorm(child, mode=mode)
    return model


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (BatchNorm, GroupNorm, InstanceNorm, LayerNorm, frozen BN)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                               nn.LayerNorm, FrozenBatchNorm))


def norm_state_names(model: nn.Module) -> list[str]:
    """State_dict names (parameters and buffers) of ``model``'s normalisation layers: what FedBN keeps local."""
    names = []
    for mod_name, module in model.named_modules():
        if is_norm_layer(module):
            prefix = f"{mod_name}." if mod_name else ""
            names += [prefix + n for n, _ in module.named_parameters(recurse=False)]
            names += [prefix + n for n, _ in module.named_buffers(recurse=False)]
    return sorted(names)
