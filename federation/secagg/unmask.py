"""The coordinator's side of the maths: remove the masks from the sum of the masked updates.

The pairwise masks of two sites that both sent their update cancel in the sum. What
is left is each surviving site's self mask (rebuilt from the shares of its seed)
and, for every site that dropped out after sharing its keys, the pairwise masks
its surviving neighbours added against it (rebuilt from the shares of its masking
key). Nothing here reveals an individual update: the coordinator only ever holds
the self-mask seeds of sites whose update is in the sum, and the masking keys of
sites whose update is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from federation.flower_internals import combine_shares
from federation.secagg import keys
from federation.secagg.site import mask_sign
from federation.secagg.vectors import prg_mask


def _combine(shares: Sequence[bytes], *, threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise ValueError(f"{what}: {len(shares)} shares, {threshold} needed")
    return combine_shares(list(shares[:threshold]))


def reconstruct_sum(
    *,
    masked: Mapping[int, np.ndarray],
    partners: Mapping[int, Sequence[int]],
    seed_shares: Mapping[int, Sequence[bytes]],
    key_shares: Mapping[int, Sequence[bytes]],
    mask_public_keys: Mapping[int, bytes],
    threshold: int,
) -> np.ndarray:
    """The sum of the surviving sites' unmasked vectors (uint64, mod 2**64).

    Args:
        masked: Each surviving site's masked vector.
        partners: Each surviving site's masking partners (the neighbours that sent it shares).
        seed_shares: For each surviving site, shares of its self-mask seed.
        key_shares: For each dropped site, shares of its masking private key.
        mask_public_keys: Every site's masking public key.
        threshold: Shares needed per secret.

    Raises:
        ValueError: When a secret has too few shares.
    """
    total = np.zeros(next(iter(masked.values())).size, dtype=np.uint64)
    for vector in masked.values():
        total += vector
    for node in masked:
        seed = _combine(seed_shares.get(node, ()), threshold=threshold, what=f"site {node}")
        total -= prg_mask(keys.self_mask_key(seed), total.size)
    for dropped, shares in key_shares.items():
        private = _combine(shares, threshold=threshold, what=f"dropped site {dropped}")  # raw X25519 key
        for node in masked:
            if dropped not in partners.get(node, ()):
                continue
            mask = prg_mask(keys.mask_seed(private, mask_public_keys[node]), total.size)
            if mask_sign(node, dropped) > 0:  # the survivor added it
                total -= mask
            else:
                total += mask
    return total
