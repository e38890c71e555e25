"""``resnet18`` / ``resnet10``: a DP-compatible ResNet with basic blocks.

MONAI's :class:`monai.networks.nets.ResNet` hard-codes BatchNorm inside its blocks
and uses in-place ReLU and ``out += residual``, all of which break Opacus'
per-sample gradient hooks. This is a small re-implementation built from
:class:`monai.networks.blocks.Convolution` (conv -> norm [-> ReLU]) with the norm
taken from ``model.norm``, non-in-place ReLU and ``out = out + identity``.

Layout (CIFAR-style stem, chosen for small MedMNIST images)::

    stem:   3x3 conv, 64 channels, stride 1, no max-pool
    layer1: 64  channels, stride 1      (blocks per layer: resnet18 [2, 2, 2, 2],
    layer2: 128 channels, stride 2                          resnet10 [1, 1, 1, 1])
    layer3: 256 channels, stride 2
    layer4: 512 channels, stride 2
    global average pool -> dropout(model.dropout) -> Linear(512, num_classes)

The ImageNet stem (7x7 stride-2 conv + max-pool) would leave a 28-px image at 1x1
after layer4; the CIFAR stem keeps 28 -> 28 -> 14 -> 7 -> 4. The cost is that large
inputs (e.g. 224 px) are processed at full resolution in layer1, which is slow.
Minimum input side: 8 px with group/batch norm (the supported floor, as
``data.image_size``; layer4 may be 1x1), 9 px with instance norm, which needs more
than one pixel in layer4 (9 -> 5 -> 3 -> 2).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import Convolution
from monai.networks.layers import Pool
from torch import Tensor, nn

from federation.config.schema import ModelConfig
from federation.models.layers import ACT, norm_spec

CHANNELS = (64, 128, 256, 512)
"""Channels of the four ResNet stages."""

MIN_INPUT_SIZE = {"group": 8, "batch": 8, "instance": 9}
"""Smallest input side per ``model.norm``."""


def _conv(
    *, spatial_dims: int, c_in: int, c_out: int, norm: str, stride: int = 1, kernel_size: int = 3, act: bool = True
) -> Convolution:
    """Conv (no bias) -> norm [-> ReLU] as one MONAI block; padding keeps 'same' size at stride 1."""
    return Convolution(
        spatial_dims=spatial_dims,
        in_channels=c_in,
        out_channels=c_out,
        strides=stride,
        kernel_size=kernel_size,
        act=ACT if act else None,
        norm=norm_spec(norm, channels=c_out),
        bias=False,
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and an identity (or 1x1 projection) shortcut.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first conv (and of the projection shortcut).
        norm: ``"group"``, ``"instance"`` or ``"batch"``.
    """

    def __init__(self, *, spatial_dims: int, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv(spatial_dims=spatial_dims, c_in=in_channels, c_out=out_channels, norm=norm, stride=stride)
        self.conv2 = _conv(spatial_dims=spatial_dims, c_in=out_channels, c_out=out_channels, norm=norm, act=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _conv(
                spatial_dims=spatial_dims,
                c_in=in_channels,
                c_out=out_channels,
                norm=norm,
                stride=stride,
                kernel_size=1,
                act=False,
            )
        self.act = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(conv2(conv1(x)) + shortcut(x))`` (no in-place ops)."""
        out = self.conv2(self.conv1(x))
        out = out + self.shortcut(x)
        return self.act(out)


class ResNet(nn.Module):
    """CIFAR-stem ResNet with basic blocks and configurable normalization.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input image channels.
        num_classes: Number of output logits.
        layers: Basic blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        norm: ``"group"``, ``"instance"`` or ``"batch"``.
        dropout: Dropout probability before the classifier.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        layers: Sequence[int] = (2, 2, 2, 2),
        norm: str = "group",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != len(CHANNELS):
            raise ValueError(f"layers must have {len(CHANNELS)} entries, got {tuple(layers)}")
        self.stem = _conv(spatial_dims=spatial_dims, c_in=in_channels, c_out=CHANNELS[0], norm=norm)
        stages: list[nn.Module] = []
        c_in = CHANNELS[0]
        for i, (c_out, n_blocks) in enumerate(zip(CHANNELS, layers, strict=True)):
            blocks = []
            for b in range(n_blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                block = BasicBlock(
                    spatial_dims=spatial_dims, in_channels=c_in, out_channels=c_out, stride=stride, norm=norm
                )
                blocks.append(block)
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convs (fan-out, as torchvision), zero classifier bias."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``(batch, num_classes)`` logits for ``x`` of shape ``(batch, C, *spatial)``."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.flatten(self.pool(x))
        return self.fc(self.dropout(x))


def _build(layers: Sequence[int], config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> ResNet:
    return ResNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        layers=layers,
        norm=config.norm,
        dropout=config.dropout,
    )


def build_resnet18(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Registry builder for ``resnet18`` (blocks ``[2, 2, 2, 2]``, ~11.2M parameters).

    Args:
        config: Model section; uses ``norm`` and ``dropout`` (``width`` is ignored).
        in_channels: Input image channels.
        num_classes: Number of output logits.
        spatial_dims: 2 or 3.

    Returns:
        A :class:`ResNet`.
    """
    return _build((2, 2, 2, 2), config, in_channels, num_classes, spatial_dims)


def build_resnet10(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Registry builder for ``resnet10`` (blocks ``[1, 1, 1, 1]``, ~4.9M parameters).

    Args:
        config: Model section; uses ``norm`` and ``dropout`` (``width`` is ignored).
        in_channels: Input image channels.
        num_classes: Number of output logits.
        spatial_dims: 2 or 3.

    Returns:
        A :class:`ResNet`.
    """
    return _build((1, 1, 1, 1), config, in_channels, num_classes, spatial_dims)
