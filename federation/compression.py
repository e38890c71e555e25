"""Quantized transfer of a site's model update (``train.transfer_dtype``), framework-free.

What a site sends back after local training is, by default (``fp32``), its full
float32 weights. With ``fp16`` or ``int8`` it sends the *difference* to the global
weights it received, quantized; the coordinator adds it back to the global weights
before aggregating, so every strategy sees ordinary weights:

* ``fp16``: ``delta = w_local - w_global`` rounded to IEEE half precision (2 bytes
  per parameter). The rounding error is relative to the update, not to the weight.
* ``int8``: symmetric 8-bit quantization of the delta with one float32 scale per
  output channel (first axis) for tensors of two or more dimensions, per tensor
  otherwise: ``q = rint(delta / s)`` with ``s = max|delta| / 127``, sent as int8
  plus the scales under ``<name>:int8-scale`` (~1 byte per parameter).

Non-floating arrays (e.g. BatchNorm's step counter) are passed through unchanged
(the outbound guard lets only floating-point parameters leave). Quantizing a
DP-SGD update is post-processing of a differentially private output, so the
privacy guarantee is unchanged. :func:`transfer_layout` says exactly which arrays,
shapes and dtypes an encoded update holds; the site's outbound guard checks replies
against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

TransferDtype = Literal["fp32", "fp16", "int8"]
TRANSFER_DTYPES: tuple[str, ...] = ("fp32", "fp16", "int8")
#: Suffix of the array holding the int8 scales of parameter ``<name>``.
SCALE_SUFFIX = ":int8-scale"
_INT8_MAX = 127.0


def _check(dtype: str) -> None:
    if dtype not in TRANSFER_DTYPES:
        raise ValueError(f"train.transfer_dtype must be one of {', '.join(TRANSFER_DTYPES)}, got {dtype!r}")


def _numpy(value: Any) -> np.ndarray:
    """A NumPy array of a tensor (CPU, detached) or array-like."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0],) if len(shape) >= 2 else (1,)


def transfer_layout(shapes: Mapping[str, tuple[int, ...]], *, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of a model update encoded with ``dtype``.

    Args:
        shapes: The model's (floating-point) state dict shapes by name.
        dtype: ``fp32``, ``fp16`` or ``int8``.

    Returns:
        ``{name: (shape, dtype name)}``; for ``fp32`` the dtype is ``"float"`` (any
        floating type, as the model has it), for the others the exact NumPy name.
    """
    _check(dtype)
    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if dtype == "fp32":
            layout[name] = (shape, "float")
        elif dtype == "fp16":
            layout[name] = (shape, "float16")
        else:
            layout[name] = (shape, "int8")
            layout[name + SCALE_SUFFIX] = (_scale_shape(shape), "float32")
    return layout


def _quantize_int8(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)
    peak = np.abs(rows).max(axis=1, initial=0.0).astype(np.float32)
    scale = np.where(peak > 0, peak / np.float32(_INT8_MAX), np.float32(1.0)).astype(np.float32)
    quantized = np.clip(np.rint(rows / scale[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return quantized.reshape(delta.shape), scale


def encode_update(
    weights: Mapping[str, Any], reference: Mapping[str, Any], *, dtype: str
) -> dict[str, np.ndarray]:
    """Encode a site's trained weights for transfer.

    Args:
        weights: The trained state dict (tensors or arrays).
        reference: The global state dict the site received (same names and shapes).
        dtype: ``fp32`` (send ``weights`` as they are), ``fp16`` or ``int8``.

    Returns:
        Arrays to put in the reply's ArrayRecord, laid out as :func:`transfer_layout` says.

    Raises:
        ValueError: For an unknown ``dtype`` or names/shapes that differ from ``reference``.
    """
    _check(dtype)
    out: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        array = _numpy(value)
        if dtype == "fp32" or not np.issubdtype(array.dtype, np.floating):
            out[name] = array
            continue
        if name not in reference:
            raise ValueError(f"cannot encode {name!r}: the global model has no such entry")
        base = _numpy(reference[name])
        if base.shape != array.shape:
            raise ValueError(f"cannot encode {name!r}: shape {array.shape} differs from the global {base.shape}")
        delta = array.astype(np.float32) - base.astype(np.float32)
        if dtype == "fp16":
            out[name] = delta.astype(np.float16)
        else:
            out[name], out[name + SCALE_SUFFIX] = _quantize_int8(delta)
    return out


def decode_update(encoded: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rebuild full weights from an encoded update (any of the three encodings).

    The encoding is read off each array: the reference's own dtype means full
    weights, float16 a half-precision delta, int8 (with its scales) an 8-bit delta.

    Args:
        encoded: The reply's arrays.
        reference: The global weights sent to the site in this round.

    Returns:
        Weights with the reference's names, dtypes and shapes.

    Raises:
        ValueError: If an array is missing, of another shape, or int8 without scales.
    """
    out: dict[str, np.ndarray] = {}
    for name, base in reference.items():
        if name not in encoded:
            raise ValueError(f"update lacks {name!r}")
        value = np.asarray(encoded[name])
        if value.shape != base.shape:
            raise ValueError(f"update entry {name!r} has shape {value.shape}, the global model's is {base.shape}")
        if value.dtype == base.dtype or not np.issubdtype(base.dtype, np.floating):
            out[name] = value
        elif value.dtype == np.float16:
            out[name] = (base.astype(np.float32) + value.astype(np.float32)).astype(base.dtype)
        elif value.dtype == np.int8:
            scale_name = name + SCALE_SUFFIX
            if scale_name not in encoded:
                raise ValueError(f"int8 update entry {name!r} comes without {scale_name!r}")
            scale = np.asarray(encoded[scale_name], dtype=np.float32)
            rows = value.reshape(scale.shape[0], -1).astype(np.float32) * scale[:, None]
            out[name] = (base.astype(np.float32) + rows.reshape(base.shape)).astype(base.dtype)
        else:
            raise ValueError(f"update entry {name!r} has dtype {value.dtype}, which no transfer encoding uses")
    return out
