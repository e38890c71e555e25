"""``logreg``: logistic regression for tabular data.

For two classes the network is FLamby's Fed-Heart-Disease baseline, one
``Linear(num_features, 1)`` whose output ``z`` is the log-odds of class 1. It
returns the logits ``[0, z]``, so the training loop's cross-entropy over ``(N, 2)``
logits *is* the binary cross-entropy of ``sigmoid(z)`` and the softmax probability
of class 1 *is* ``sigmoid(z)``: same parameters, loss and predictions as FLamby's
``Linear`` + ``sigmoid`` + ``BCELoss``. For ``C > 2`` classes it is multinomial
logistic regression, ``Linear(num_features, C)``.

It takes tabular data (``spatial_dims=0``), where ``in_channels`` is the number
of features. Only a ``Linear`` layer holds parameters, so Opacus DP-SGD supports it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from federation.config.schema import ModelConfig


class LogisticRegression(nn.Module):
    """Logistic regression returning ``(N, num_classes)`` logits.

    Args:
        num_features: Inputs per sample.
        num_classes: Classes; 2 gives the single-logit (FLamby) form.
        dropout: Dropout on the inputs.
    """

    def __init__(self, *, num_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(p=dropout)
        self.binary = num_classes == 2
        self.linear = nn.Linear(num_features, 1 if self.binary else num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``; for two classes ``[0, z]`` with ``z`` the log-odds of class 1."""
        out = self.linear(self.dropout(self.flatten(x)))
        if self.binary:
            out = torch.cat([torch.zeros_like(out), out], dim=1)
        return out


def build_logreg(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """Registry builder for ``logreg`` (tabular data only: ``spatial_dims=0``).

    Args:
        config: Model section; uses ``dropout``.
        in_channels: Number of features.
        num_classes: Number of classes.
        spatial_dims: Must be 0 (the registry refuses other values for ``logreg``).

    Returns:
        A :class:`LogisticRegression`.
    """
    del spatial_dims
    return LogisticRegression(num_features=in_channels, num_classes=num_classes, dropout=config.dropout)
