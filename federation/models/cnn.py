"""``cnn``: the default network, a small, fast, DP-friendly convolutional classifier.

Layout (``w = model.width``, every conv 3x3 / 3x3x3, conv -> norm -> ReLU, built from
:class:`monai.networks.blocks.Convolution`)::

    stage 1: in -> w   (stride 1), w  -> w
    stage 2: w  -> 2w  (stride 2), 2w -> 2w
    stage 3: 2w -> 4w  (stride 2), 4w -> 4w
    global average pool -> dropout(model.dropout) -> Linear(4w, num_classes)

About 72k parameters at ``width=16`` in 2D (1 input channel); works for
``spatial_dims`` 2 and 3 and any input side >= 8 (the supported floor, as
``data.image_size``; the last stage then sees 2x2, enough for instance norm).
"""

from __future__ import annotations

from monai.networks.blocks import Convolution
from monai.networks.layers import Pool
from torch import Tensor, nn

from federation.config.schema import ModelConfig
from federation.models.layers import ACT, norm_spec

MIN_INPUT_SIZE = 8
"""Smallest supported input side (two stride-2 stages leave 2x2)."""


class SmallCNN(nn.Module):
    """Three-stage conv net with global average pooling and a linear head.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input image channels.
        num_classes: Number of output logits.
        width: Channels of the first stage (stages use w, 2w, 4w).
        norm: ``"group"``, ``"instance"`` or ``"batch"``.
        dropout: Dropout probability before the classifier.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        width: int = 16,
        norm: str = "group",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for block in range(2):
                layers.append(
                    Convolution(
                        spatial_dims=spatial_dims,
                        in_channels=c_in,
                        out_channels=c_out,
                        strides=2 if (stage > 0 and block == 0) else 1,
                        kernel_size=3,
                        act=ACT,
                        norm=norm_spec(norm, channels=c_out),
                        bias=False,
                    )
                )
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(p=dropout)
        self.classifier = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``(batch, num_classes)`` logits for ``x`` of shape ``(batch, C, *spatial)``."""
        x = self.features(x)
        x = self.flatten(self.pool(x))
        return self.classifier(self.dropout(x))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit/zero norms, zero classifier bias (deterministic under a seed)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def build_cnn(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Registry builder for ``cnn``.

    Args:
        config: Model section; uses ``width``, ``norm`` and ``dropout``.
        in_channels: Input image channels.
        num_classes: Number of output logits.
        spatial_dims: 2 or 3.

    Returns:
        A :class:`SmallCNN`.
    """
    return SmallCNN(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        width=config.width,
        norm=config.norm,
        dropout=config.dropout,
    )
