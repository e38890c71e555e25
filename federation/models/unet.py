"""``unet``: MONAI's :class:`~monai.networks.nets.UNet` for segmentation, 2-D or 3-D, DP-ready.

Layout (``w = model.width``): encoder channels ``w, 2w, 4w, 8w`` with three
stride-2 downsamplings (image sides must be divisible by 8), skip connections,
``num_classes`` output channels (logits per pixel/voxel). Two changes to MONAI's
defaults make it trainable with DP-SGD and medfed's fast per-sample clipping:

* upsampling is nearest-neighbour interpolation followed by a convolution instead
  of a transposed convolution (:class:`UpsampleConvUNet`), so every parametrized
  layer is a convolution or a norm, which ``privacy.grad_sample_mode=ghost``
  covers (:mod:`federation.privacy.fast_clipping`);
* normalization follows ``model.norm`` (group or affine instance norm; BatchNorm is
  refused under DP) and the activation is a ReLU that never works in place
  (MONAI's default PReLU has no Opacus per-sample gradient).
"""

from __future__ import annotations

import math

from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from torch import nn

from federation.config.schema import ModelConfig
from federation.models.layers import ACT, MAX_GROUPS, norm_spec

DEPTH = 3
"""Stride-2 downsamplings: input sides must be divisible by ``2 ** DEPTH``."""
MIN_INPUT_SIZE = 2**DEPTH
"""Smallest input side (pixels/voxels)."""


class UpsampleConvUNet(UNet):
    """MONAI's UNet whose decoder upsamples by interpolation + convolution (no transposed convolution)."""

    def _get_up_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
        conv = Convolution(
            self.dimensions,
            in_channels,
            out_channels,
            strides=1,
            kernel_size=self.up_kernel_size,
            act=self.act,
            norm=self.norm,
            dropout=self.dropout,
            bias=self.bias,
            conv_only=is_top,
            adn_ordering=self.adn_ordering,
        )
        return nn.Sequential(nn.Upsample(scale_factor=strides, mode="nearest"), conv)


def build_unet(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Build the ``unet`` (see the module docstring) for 2-D images or 3-D volumes.

    Args:
        config: ``norm``, ``width`` (first encoder's channels) and ``dropout`` are used.
        in_channels: Image channels.
        num_classes: Mask classes including background (output channels).
        spatial_dims: 2 or 3.
    """
    width = config.width
    channels = tuple(width * 2**k for k in range(DEPTH + 1))
    return UpsampleConvUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=channels,
        strides=(2,) * DEPTH,
        num_res_units=0,
        act=ACT,
        norm=norm_spec(config.norm, num_groups=math.gcd(width, MAX_GROUPS)),
        dropout=config.dropout,
    )
