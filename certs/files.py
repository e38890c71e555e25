"""Writing key material safely: private files 0600, nothing overwritten by accident."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path


class CertificateError(Exception):
    """A certificate, key or TLS set-up problem, with what to do about it."""


PRIVATE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def refuse_overwrite(paths: Iterable[Path], *, force: bool) -> None:
    """Fail before writing anything when one of ``paths`` exists and ``force`` is off.

    Raises:
        CertificateError: Naming the first existing file.
    """
    if force:
        return
    for path in paths:
        if path.exists():
            raise CertificateError(
                f"{path} already exists; refusing to overwrite it. Pass --force to replace it "
                "(everything that trusted or registered the old file must then be updated)"
            )


def make_dir(path: Path, *, private: bool) -> None:
    """Create ``path`` (and parents); a folder holding private keys is made 0700."""
    path.mkdir(parents=True, exist_ok=True)
    if private:
        os.chmod(path, PRIVATE_DIR_MODE)


def write_file(path: Path, data: bytes, *, private: bool, force: bool) -> Path:
    """Write ``data`` to ``path`` atomically, as 0600 when ``private``.

    The file is created under a temporary name with its final permissions already
    set, then renamed, so a private key is never readable by others, even briefly.

    Args:
        path: Destination file.
        data: Bytes to write.
        private: True for private keys (mode 0600), else 0644.
        force: Replace an existing file.

    Returns:
        ``path``.
    """
    refuse_overwrite([path], force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = PRIVATE_MODE if private else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never clobber
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_private_file(path: Path) -> None:
    """Refuse a private key that others can read (it must be 0600 or stricter).

    Raises:
        CertificateError: When the file is missing or group/other-accessible.
    """
    if not path.is_file():
        raise CertificateError(f"private key {path} does not exist")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CertificateError(
            f"private key {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`"
        )
