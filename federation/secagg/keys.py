"""Key agreement for secure aggregation: X25519 (RFC 7748), HKDF-SHA256 for the derived keys.

Each site holds two key pairs and a self-mask seed per round:

* the **channel** pair encrypts the secret shares a site sends its neighbours through
  the coordinator: its agreement is hashed into a Fernet key (Flower's
  ``generate_shared_key`` construction, HKDF-SHA256 to 32 bytes, on X25519 instead of
  P-384: an agreement costs a tenth, measured in docs/BENCHMARKS.md);
* the **mask** pair seeds the pairwise masks that cancel in the sum. Its private key
  is Shamir-shared, so it travels as its raw 32 bytes (three 16-byte blocks to share
  where a DER-encoded P-384 key needs twelve);
* the **self-mask seed** is 15 random bytes (120 bits), so that it is one 16-byte
  block after Flower's padding where a 16-byte seed pads to two: the coordinator
  reconstructs one seed per surviving site every round, and a block costs it 2.5 ms.
  The AES-128 key of the self mask is derived from it with HKDF.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_MASK_INFO = b"medfed secagg pairwise mask"
_CHANNEL_INFO = b"medfed secagg share channel"
_SELF_MASK_INFO = b"medfed secagg self mask"
#: Bytes of a self-mask seed (see the module docstring).
SELF_SEED_BYTES = 15


def _hkdf(secret: bytes, *, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def new_private_key() -> bytes:
    """A fresh X25519 private key from the operating system's randomness, as its raw 32 bytes."""
    return x25519.X25519PrivateKey.generate().private_bytes_raw()


def public_key(private: bytes) -> bytes:
    """The raw 32-byte public half of a private key from :func:`new_private_key` (what travels)."""
    return x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _agree(private: bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret (raises ValueError for a malformed peer key)."""
    return x25519.X25519PrivateKey.from_private_bytes(private).exchange(
        x25519.X25519PublicKey.from_public_bytes(peer_public))


def channel_key(private: bytes, peer_public: bytes) -> bytes:
    """The Fernet key two sites share for the shares they send each other through the coordinator."""
    return base64.urlsafe_b64encode(_hkdf(_agree(private, peer_public), info=_CHANNEL_INFO, length=32))


def mask_seed(private: bytes, peer_public: bytes) -> bytes:
    """The 32-byte seed of the pairwise mask two sites share (raises ValueError for a malformed peer key)."""
    return _hkdf(_agree(private, peer_public), info=_MASK_INFO, length=32)


def new_self_seed() -> bytes:
    """A fresh self-mask seed (:data:`SELF_SEED_BYTES` random bytes)."""
    return os.urandom(SELF_SEED_BYTES)


def self_mask_key(seed: bytes) -> bytes:
    """The AES-128 key of a site's self mask, from its seed."""
    if len(seed) != SELF_SEED_BYTES:
        raise ValueError(f"a self-mask seed is {SELF_SEED_BYTES} bytes, got {len(seed)}")
    return _hkdf(seed, info=_SELF_MASK_INFO, length=16)
