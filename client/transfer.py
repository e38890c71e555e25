"""Site side of quantized update transfer (``train.transfer_dtype``): what goes in the reply's ArrayRecord."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord

from federation.compression import encode_update


def update_record(
    weights: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor], *, transfer_dtype: str
) -> ArrayRecord:
    """The reply's arrays: the trained weights (``fp32``), or their change quantized to ``fp16``/``int8``.

    Args:
        weights: The trained state dict (CPU tensors).
        global_weights: The global state dict received this round.
        transfer_dtype: ``train.transfer_dtype``.

    Returns:
        An ArrayRecord laid out as :func:`federation.compression.transfer_layout` says,
        which the outbound guard checks.
    """
    if transfer_dtype == "fp32":
        return ArrayRecord(dict(weights))
    encoded = encode_update(weights, global_weights, dtype=transfer_dtype)
    return ArrayRecord({name: Array(value) for name, value in encoded.items()})
