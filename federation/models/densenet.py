"""``densenet121``: MONAI's DenseNet-121 with DP-safe normalization and activations.

:class:`monai.networks.nets.DenseNet121` defaults to BatchNorm and in-place ReLU;
here it is built with ``norm`` from ``model.norm`` (GroupNorm with 8 groups, or
affine InstanceNorm) and ``act=("relu", {"inplace": False})``. Every DenseNet-121
feature map has a multiple of 32 channels (64 + 32k, halved at transitions, and a
128-channel bottleneck), so 8 groups always divide them.

``model.dropout`` is applied right before the final linear layer (MONAI's own
``dropout_prob``, which acts after every dense layer, is left at 0).

Input size: the stem (stride-2 conv + stride-2 max-pool) and three stride-2
transitions shrink the image about 32 times, so inputs must be at least 29 px per
side with GroupNorm/BatchNorm (the last dense block then sees 1x1). InstanceNorm
normalizes over space and needs more than one pixel there, so it needs at least
61 px. 28-px MedMNIST images must therefore be resized (``data.image_size``, e.g.
to 32 or 64) before they reach this network.
"""

from __future__ import annotations

from collections import OrderedDict

from monai.networks.nets import DenseNet121
from torch import nn

from federation.config.schema import ModelConfig
from federation.models.layers import ACT, norm_spec

GROUPS = 8
"""GroupNorm groups in every DenseNet-121 norm layer (all channel counts divide by 32)."""

MIN_INPUT_SIZE = {"group": 29, "batch": 29, "instance": 61}
"""Smallest input side per ``model.norm``."""


def build_densenet121(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Registry builder for ``densenet121``.

    Args:
        config: Model section; uses ``norm`` and ``dropout`` (``width`` is ignored:
            DenseNet-121 has a fixed layout).
        in_channels: Input image channels.
        num_classes: Number of output logits.
        spatial_dims: 2 or 3.

    Returns:
        A :class:`monai.networks.nets.DenseNet121` (randomly initialized, not pretrained).
    """
    model = DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        act=ACT,
        norm=norm_spec(config.norm, num_groups=GROUPS),
        pretrained=False,
    )
    if config.dropout > 0:
        head = model.class_layers
        model.class_layers = nn.Sequential(
            OrderedDict(
                [
                    ("relu", head.relu),
                    ("pool", head.pool),
                    ("flatten", head.flatten),
                    ("dropout", nn.Dropout(p=config.dropout)),
                    ("out", head.out),
                ]
            )
        )
    return model
