"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Folder holding the real MedMNIST ``.npz`` files.

    ``$MEDFED_DATA_DIR`` if set, else ``<repo>/../shared/data``; skips the test when
    the folder does not exist.
    """
    env = os.environ.get("MEDFED_DATA_DIR", "")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real-data folder {path} not found (set MEDFED_DATA_DIR to the folder with the .npz files)")
    return path
