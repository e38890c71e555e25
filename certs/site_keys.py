"""A hospital's SuperNode identity: the key pair Flower 1.42 authenticates nodes with.

Flower 1.42 wants an elliptic-curve key on a NIST curve, the private key in
OpenSSH format (``flower-supernode --auth-supernode-private-key``, read with
``load_ssh_private_key``) and the public key in OpenSSH format (registered by the
coordinator with ``flwr supernode register <site.pub> <connection>``). medfed
uses SECP384R1, the curve Flower itself generates.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.files import CertificateError, check_private_file, make_dir, refuse_overwrite, write_file

logger = logging.getLogger(__name__)

SITE_KEY = "site.key"
SITE_PUB = "site.pub"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")


@dataclass(frozen=True)
class SiteKeys:
    """A site's key files and the public key's fingerprint."""

    private_key: Path
    public_key: Path
    fingerprint: str


def check_site_name(name: str) -> str:
    """Return ``name`` when it is a valid site name (letters, digits, ``_ . -``)."""
    if not _SITE_NAME.match(name):
        raise CertificateError(
            f"site name {name!r} is not valid: use 1-63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key (``SHA256:...``)."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(blob.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def create_site_keys(*, name: str, out_dir: Path, force: bool = False) -> SiteKeys:
    """Create a site's SuperNode authentication key pair.

    Args:
        name: The site's name (written as the public key's comment).
        out_dir: Folder receiving ``site.key`` (0600, never leaves the hospital) and
            ``site.pub`` (sent to the coordinator for registration).
        force: Replace an existing pair (the coordinator must then unregister the
            old key and register the new one).

    Returns:
        The written files and the public key fingerprint.
    """
    check_site_name(name)
    key_path, pub_path = out_dir / SITE_KEY, out_dir / SITE_PUB
    refuse_overwrite([key_path, pub_path], force=force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    make_dir(out_dir, private=True)
    write_file(key_path, private, private=True, force=force)
    write_file(pub_path, public + f" medfed-site:{name}\n".encode(), private=False, force=force)
    keys = SiteKeys(private_key=key_path, public_key=pub_path, fingerprint=fingerprint(key.public_key()))
    logger.info("site %s key pair written to %s (%s)", name, out_dir, keys.fingerprint)
    return keys


def _check_curve(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey, source: Path) -> None:
    if key.curve.name not in _NIST_CURVES:
        raise CertificateError(f"{source}: curve {key.curve.name} is not a NIST curve Flower accepts {_NIST_CURVES}")


def load_site_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read and check a site private key exactly as ``flower-supernode`` will (0600 enforced)."""
    check_private_file(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError) as err:
        raise CertificateError(
            f"{path} is not an unencrypted OpenSSH private key ({err}); create one with `medfed certs site NAME`"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: Flower needs an EC (NIST curve) key, got {type(key).__name__}")
    _check_curve(key, path)
    return key


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read and check a site public key exactly as ``flwr supernode register`` will."""
    if not path.is_file():
        raise CertificateError(f"public key {path} does not exist")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CertificateError(f"{path} is not an OpenSSH public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{path}: Flower needs an EC (NIST curve) key, got {type(key).__name__}")
    _check_curve(key, path)
    return key


def verify_site_keys(*, private_key: Path, public_key: Path | None = None) -> str:
    """Check a site's key pair before a SuperNode uses it.

    Returns:
        The public key fingerprint (what the coordinator registered).
    """
    key = load_site_private_key(private_key)
    if public_key is not None:
        pub = load_site_public_key(public_key)
        if pub.public_numbers() != key.public_key().public_numbers():
            raise CertificateError(f"{public_key} is not the public half of {private_key}")
    return fingerprint(key.public_key())
