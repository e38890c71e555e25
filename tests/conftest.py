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


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give this process the identity a ServerApp gets at start-up.

    Flower 1.42 reads ``TaskIdentity.run_id/node_id/task_id`` when an instruction
    Message is created (``Message(content, dst_node_id=..., message_type=...)``),
    which the runtime sets before ``main``; in-process tests must set it themselves.
    """
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
