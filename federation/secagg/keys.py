"""Key agreement for secure aggregation: ECDH, HKDF-SHA256 for the derived keys.

Each site holds two key pairs per round:

* the **channel** pair (ECDH on P-384, Flower's ``generate_shared_key``) encrypts the
  secret shares a site sends its neighbours through the coordinator;
* the **mask** pair (X25519, RFC 7748) seeds the pairwise masks that cancel in the
  sum. Its private key is Shamir-shared, so it travels as its raw 32 bytes: three
  16-byte blocks to share where a DER-encoded P-384 key needs twelve, and an
  agreement costs a tenth of P-384's (measured in docs/BENCHMARKS.md).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.flower_internals import generate_shared_key

_CURVE = ec.SECP384R1()
_MASK_INFO = b"medfed secagg pairwise mask"


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh key pair from the operating system's randomness."""
    return ec.generate_private_key(_CURVE)


def private_key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """DER (PKCS#8) bytes of a private key, as kept in the site's state and shared in pieces."""
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """The private key from :func:`private_key_bytes`."""
    key = serialization.load_der_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an elliptic-curve private key")
    return key


def public_key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The public half as X9.62 compressed point bytes (what travels)."""
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """A public key sent by another site (raises ValueError for anything that is not a P-384 point)."""
    return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, data)


def channel_key(private: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
    """The symmetric key two sites share for the shares they send each other (Flower's derivation)."""
    return generate_shared_key(private, load_public_key(peer_public))


def new_mask_key() -> bytes:
    """A fresh X25519 masking key pair's private half, as its raw 32 bytes (what is kept and shared)."""
    return x25519.X25519PrivateKey.generate().private_bytes_raw()


def mask_public_key(private: bytes) -> bytes:
    """The raw 32-byte public half of a masking key (what travels)."""
    return x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def mask_seed(private: bytes, peer_public: bytes) -> bytes:
    """The 32-byte seed of the pairwise mask two sites share (raises ValueError for a malformed peer key)."""
    shared = x25519.X25519PrivateKey.from_private_bytes(private).exchange(
        x25519.X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MASK_INFO).derive(shared)
