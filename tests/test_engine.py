"""The simulation engine's Ray settings."""

from __future__ import annotations

import pickle

import pytest

from federation.config import load_config
from federation.models import build_model
from simulations.engine import INLINE_OBJECT_BYTES, ray_environment
from simulations.harness import preset_path

pytestmark = pytest.mark.usefixtures("flower_task_identity")

RAY_DEFAULT_INLINE_BYTES = 100 * 1024  # Ray's own max_direct_call_object_size


def _train_message_bytes(preset: str, overrides: list[str]) -> int:
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    config = load_config(preset_path(preset), overrides)
    model = build_model(config.model, in_channels=1, num_classes=2, dp=config.privacy.enabled)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return len(pickle.dumps(Message(content=content, dst_node_id=1, message_type="train")))


def test_messages_of_the_default_model_travel_inline() -> None:
    size = _train_message_bytes("synthetic", [])
    assert RAY_DEFAULT_INLINE_BYTES < size < INLINE_OBJECT_BYTES  # Ray's default would send it via its object store
    assert ray_environment()["RAY_max_direct_call_object_size"] == str(INLINE_OBJECT_BYTES)
    assert INLINE_OBJECT_BYTES <= 10 * 1024 * 1024  # within Ray's per-task inline limit (task_rpc_inlined_bytes_limit)


def test_models_over_the_limit_use_the_object_store() -> None:
    # ResNet-18 (~11 M parameters, ~45 MB of fp32 weights) goes through Ray's object store, as before
    assert _train_message_bytes("synthetic", ["model.name=resnet18"]) > INLINE_OBJECT_BYTES
