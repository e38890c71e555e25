"""Key agreement for secure aggregation: ECDH on P-384, HKDF-SHA256 for the derived keys.

Each site holds two key pairs per round: one to encrypt the secret shares it sends
to its neighbours (through the coordinator), one whose pairwise agreements seed
the masks that cancel in the sum.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
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


def mask_seed(private: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte seed of the pairwise mask two sites share."""
    shared = private.exchange(ec.ECDH(), load_public_key(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MASK_INFO).derive(shared)
