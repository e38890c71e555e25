"""A site's update as one integer vector, its quantization, and the masks that hide it.

A site sends ``w * q + self_mask + Σ ± pairwise_mask`` (mod 2**64) where ``q`` is its
model update (new weights minus the global ones) clipped to ``±clipping_range`` and
stochastically rounded to integers in ``[0, 2**bits]``, and ``w`` its weight; one
extra element carries ``w`` itself so that the coordinator learns the total weight.
Masks are AES-CTR key streams (a cryptographic PRG) keyed by 16-byte (self mask) or
32-byte (pairwise, from HKDF) seeds:
Flower's own ``pseudo_rand_gen`` folds a seed into 32 bits for NumPy's Mersenne
Twister, which a coordinator could search exhaustively.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from federation.secagg.params import SecAggParams

_ZERO_NONCE = bytes(16)  # every key is used for one stream only


@dataclass(frozen=True)
class VectorLayout:
    """Names, shapes and dtypes of the model arrays, in order, as one flat vector (+1 weight element)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> VectorLayout:
        """The layout of a model's arrays (a state dict as NumPy arrays)."""
        return cls(
            names=tuple(arrays),
            shapes=tuple(tuple(int(d) for d in np.shape(a)) for a in arrays.values()),
            dtypes=tuple(str(np.asarray(a).dtype) for a in arrays.values()),
        )

    @property
    def size(self) -> int:
        """Elements of the masked vector: every model element and the weight."""
        return sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes) + 1

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model arrays as one float64 vector (without the weight element)."""
        if tuple(arrays) != self.names:
            raise ValueError(f"arrays {list(arrays)[:3]}... do not match the global model's {list(self.names)[:3]}...")
        return np.concatenate([np.asarray(arrays[name], dtype=np.float64).ravel() for name in self.names])

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Split a float vector (without the weight element) into arrays of the model's shapes and dtypes."""
        out: dict[str, np.ndarray] = {}
        start = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = vector[start:start + count].reshape(shape).astype(dtype)
            start += count
        return out


def prg_mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uint64 values from AES-CTR keyed by ``seed`` (16 bytes: AES-128, 32 bytes: AES-256)."""
    if len(seed) not in (16, 32):
        raise ValueError(f"mask seeds are 16 or 32 bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * size)), dtype=np.uint64).copy()


def quantize_update(
    update: np.ndarray, *, params: SecAggParams, weight: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """``[weight * q..., weight]`` as uint64, and the fraction of elements that were clipped.

    ``q`` is ``update`` clipped to ``±clipping_range`` and mapped to ``[0, 2**bits]`` with
    stochastic rounding (unbiased), so the dequantized mean is the true mean in expectation.
    """
    clip = params.clipping_range
    clipped_fraction = float(np.mean(np.abs(update) > clip)) if update.size else 0.0
    scaled = (np.clip(update, -clip, clip) + clip) * (params.target_range / (2 * clip))
    floor = np.floor(scaled)
    quantized = floor + (rng.random(scaled.shape) < (scaled - floor))
    quantized = np.minimum(quantized, params.target_range).astype(np.uint64)
    return np.append(quantized * np.uint64(weight), np.uint64(weight)), clipped_fraction


def dequantize_sum(total: np.ndarray, *, params: SecAggParams) -> tuple[np.ndarray, int]:
    """The weighted mean update from the unmasked sum ``[Σ w q..., Σ w]``, and the total weight."""
    weight = int(total[-1])
    if weight <= 0:
        raise ValueError("the unmasked total weight is 0: no site contributed")
    clip = params.clipping_range
    mean_q = total[:-1].astype(np.float64) / weight
    return mean_q * (2 * clip / params.target_range) - clip, weight
