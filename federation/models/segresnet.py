"""``segresnet``: MONAI's :class:`~monai.networks.nets.SegResNet` for segmentation, 2-D or 3-D, DP-ready.

Layout (``w = model.width`` initial filters): residual encoder blocks ``(1, 2, 2, 4)``
at widths ``w, 2w, 4w, 8w`` (three stride-2 convolutions: sides divisible by 8),
a decoder of one residual block per level, ``num_classes`` logits per pixel/voxel
(Myronenko 2018, without the VAE branch). DP-ready as built here:

* ``upsample_mode="nontrainable"`` (MONAI's default): a 1 x 1 convolution then
  linear interpolation, no transposed convolution, so every parametrized layer is a
  convolution or a norm (``privacy.grad_sample_mode=ghost`` covers them);
* normalization follows ``model.norm`` (group norm with up to 8 groups, or affine
  instance norm);
* ReLU that never works in place (MONAI's default is in place, which breaks Opacus' hooks),
  and residual blocks that add their shortcut out of place (:class:`ResBlock`: MONAI's
  ``x += identity`` modifies a view Opacus' backward hooks return).
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks.segresnet_block import ResBlock as MonaiResBlock
from monai.networks.nets import SegResNet
from torch import nn

from federation.config.schema import ModelConfig
from federation.models.layers import ACT, MAX_GROUPS, norm_spec

MIN_INPUT_SIZE = {"group": 8, "instance": 16, "batch": 8}
"""Smallest input side per ``model.norm`` (three stride-2 levels; instance norm needs > 1 voxel at the bottom)."""


class ResBlock(MonaiResBlock):
    """MONAI's SegResNet residual block with an out-of-place shortcut add (same weights, same output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv2(act(norm2(conv1(act(norm1(x)))))) + x``."""
        out = self.conv1(self.act(self.norm1(x)))
        return self.conv2(self.act(self.norm2(out))) + x


def build_segresnet(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Build the ``segresnet`` (see the module docstring) for 2-D images or 3-D volumes.

    Args:
        config: ``norm``, ``width`` (initial filters) and ``dropout`` are used.
        in_channels: Image channels.
        num_classes: Mask classes including background (output channels).
        spatial_dims: 2 or 3.
    """
    w = config.width
    model = SegResNet(
        spatial_dims=spatial_dims,
        init_filters=w,
        in_channels=in_channels,
        out_channels=num_classes,
        dropout_prob=config.dropout or None,
        act=ACT,
        norm=norm_spec(config.norm, num_groups=math.gcd(w, MAX_GROUPS)),
        upsample_mode="nontrainable",
    )
    for block in model.modules():
        if type(block) is MonaiResBlock:
            block.__class__ = ResBlock  # only forward differs: no in-place add
    return model
