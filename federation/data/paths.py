"""Where dataset files live on disk."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "MEDFED_DATA_DIR"
"""Environment variable naming the data folder when ``data.data_dir`` is empty."""

DEFAULT_DATA_DIR = "~/.medfed/data"
"""Data folder used when neither ``data.data_dir`` nor ``$MEDFED_DATA_DIR`` is set."""


def resolve_data_dir(data_dir: str = "") -> Path:
    """Return the absolute folder that holds dataset files.

    Args:
        data_dir: The ``data.data_dir`` config value. Empty means: use the
            ``MEDFED_DATA_DIR`` environment variable if it is set and non-empty,
            otherwise ``~/.medfed/data``.

    Returns:
        The folder, with ``~`` expanded and made absolute. It is not created and
        need not exist.
    """
    chosen = data_dir or os.environ.get(DATA_DIR_ENV, "") or DEFAULT_DATA_DIR
    return Path(chosen).expanduser().resolve()
