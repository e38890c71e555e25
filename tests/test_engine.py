"""The simulation engine's Ray settings."""

from __future__ import annotations

import json
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


@pytest.mark.integration
def test_a_config_typo_fails_before_ray_starts(tmp_path) -> None:
    import ray

    from federation.config import ConfigError
    from simulations.harness import start_simulation

    with pytest.raises(ConfigError, match="train.lrr"):
        start_simulation(overrides=["train.lrr=0.1", f"server.out_dir={tmp_path}"])
    assert not ray.is_initialized()


@pytest.mark.integration
def test_a_scenario_error_stops_the_ray_it_started(tmp_path) -> None:
    import ray

    from federation.config import ConfigError
    from simulations.harness import start_simulation

    with pytest.raises(ConfigError, match="model.name"):
        start_simulation(overrides=["model.name=no-such-net", f"server.out_dir={tmp_path}"])
    assert not ray.is_initialized()


@pytest.mark.integration
def test_the_run_uses_the_ray_started_while_the_core_loaded(tmp_path, monkeypatch) -> None:
    import os

    import ray

    from simulations.harness import simulate, start_simulation

    config = start_simulation(overrides=[
        "data.num_sites=2", "data.num_samples=96", "model.width=4", "train.batch_size=16",
        "strategy.min_sites=2", "server.rounds=1", "privacy.noise_multiplier=1.0",
        "privacy.target_epsilon=1000", f"server.out_dir={tmp_path}", "server.run_name=early-ray",
    ])
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == (os.cpu_count() or 1)
    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k))  # Flower's backend must not start another
    run_dir = simulate(config)
    assert calls == []
    assert not ray.is_initialized()  # the run shut it down
    assert [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()] == [0, 1]  # initial model, round 1
