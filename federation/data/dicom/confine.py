"""A real site's paths and secrets: files stay inside the site's own folders.

At a hospital's SuperNode every path in the run config comes from the coordinator.
The site confines each one to its own folders (:func:`confine`), and salts the
PatientID hash of its header index with a secret of its own (:func:`site_salt`),
so the index's patient keys cannot be matched against a list of candidate IDs by
anyone without the site's state folder. The site passes the roots and the salt
file in; nothing here knows which folders those are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

SALT_BYTES = 32


class PathOutsideSite(ValueError):
    """A configured path resolves outside the site's own folders."""


def confine(value: str | os.PathLike[str], *, roots: Sequence[str | os.PathLike[str]], what: str) -> Path:
    """Resolve ``value`` (relative paths against ``roots[0]``) and require it inside one of ``roots``.

    Symbolic links are followed first, so a link inside a root that points outside
    it counts as outside.

    Args:
        value: The configured path.
        roots: The folders the path may be in; the first anchors relative paths.
        what: The config key, for the error.

    Returns:
        The resolved absolute path.

    Raises:
        PathOutsideSite: Naming the key, the value and the allowed folders.
    """
    folders = [Path(root).expanduser().resolve() for root in roots]
    raw = Path(value).expanduser()
    path = (raw if raw.is_absolute() else folders[0] / raw).resolve()
    if not any(path == folder or path.is_relative_to(folder) for folder in folders):
        allowed = " or ".join(str(folder) for folder in folders)
        raise PathOutsideSite(
            f"{what}={str(value)!r} resolves to {path}, outside this site's own folders ({allowed}); "
            f"a real site only reads and writes inside its node config's data-dir and state-dir"
        )
    return path


def site_salt(path: str | os.PathLike[str]) -> bytes:
    """The site's secret salt, read from ``path``; created there (mode 0600) on first use.

    Raises:
        OSError: The file cannot be created or read.
        ValueError: The file exists but does not hold a salt (never silently replaced:
            the patient-level split depends on it).
    """
    file = Path(path)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(SALT_BYTES))
        logger.info("created the site's patient-key salt %s", file)
    text = file.read_text().strip()
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) < 16:
        raise ValueError(f"{file} does not hold a salt (expected {SALT_BYTES} random bytes in hex); "
                         "restore it from backup, or delete it together with the DICOM header index")
    return salt


def patient_key(patient_id: str, *, salt: bytes = b"") -> str:
    """Short key of a PatientID for patient-level splits: HMAC-SHA-256 with the site's salt.

    Without a salt (simulations, ``medfed site check``) it is the plain SHA-256, as before.
    """
    if not patient_id:
        return ""
    if not salt:
        return hashlib.sha256(patient_id.encode()).hexdigest()[:16]
    return hmac.new(salt, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


def salt_fingerprint(salt: bytes) -> str:
    """What the header index stores to notice a changed salt (reveals nothing about it)."""
    return hmac.new(salt, b"medfed-dicom-index", hashlib.sha256).hexdigest()[:16] if salt else ""
