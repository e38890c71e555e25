"""``basic_unet``: MONAI's :class:`~monai.networks.nets.BasicUNet` for segmentation, 2-D or 3-D, DP-ready.

Layout (``w = model.width``): feature widths ``w, w, 2w, 4w, 8w`` down four max-pool
levels and ``w`` at the top of the decoder, two 3 x 3 convolutions per level, skip
connections, ``num_classes`` logits per pixel/voxel. Odd sides are padded by
MONAI's ``UpCat`` (any side >= 16 works; 32 with instance norm, whose deepest level
needs more than one voxel). Three changes to MONAI's defaults make it trainable
with DP-SGD and medfed's fast per-sample clipping:

* ``upsample="nontrainable"``: a 1 x 1 convolution then linear interpolation instead
  of a transposed convolution, so every parametrized layer is a convolution or a
  norm (``privacy.grad_sample_mode=ghost`` covers them);
* normalization follows ``model.norm`` (group or affine instance norm);
* ReLU that never works in place (MONAI's in-place LeakyReLU breaks Opacus' hooks).
"""

from __future__ import annotations

import math

from monai.networks.nets import BasicUNet
from torch import nn

from federation.config.schema import ModelConfig
from federation.models.layers import ACT, MAX_GROUPS, norm_spec

MIN_INPUT_SIZE = {"group": 16, "instance": 32, "batch": 16}
"""Smallest input side per ``model.norm`` (four 2x poolings; instance norm needs > 1 voxel at the bottom)."""


def build_basic_unet(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Build the ``basic_unet`` (see the module docstring) for 2-D images or 3-D volumes.

    Args:
        config: ``norm``, ``width`` (first level's features) and ``dropout`` are used.
        in_channels: Image channels.
        num_classes: Mask classes including background (output channels).
        spatial_dims: 2 or 3.
    """
    w = config.width
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        features=(w, w, 2 * w, 4 * w, 8 * w, w),
        act=ACT,
        norm=norm_spec(config.norm, num_groups=math.gcd(w, MAX_GROUPS)),
        dropout=config.dropout,
        upsample="nontrainable",
    )
