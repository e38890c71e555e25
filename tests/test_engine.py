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
    from flwr.server.superlink.fleet.vce import vce_api

    from simulations.engine import stop_ray
    from simulations.harness import simulate, start_simulation

    config = start_simulation(overrides=[
        "data.num_sites=2", "data.num_samples=96", "model.width=4", "train.batch_size=16",
        "strategy.min_sites=2", "server.rounds=1", "privacy.noise_multiplier=1.0",
        "privacy.target_epsilon=1000", f"server.out_dir={tmp_path}", "server.run_name=early-ray",
    ])
    flower_dispatch, calls = vce_api.add_messages_to_queue, []
    try:
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == (os.cpu_count() or 1)
        monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k))  # Flower's backend must not start another
        run_dir = simulate(config)
        shut_down_by_the_run = not ray.is_initialized()
    finally:
        stop_ray()  # a no-op after a run: the run shuts Ray down itself
    assert calls == [] and shut_down_by_the_run
    assert vce_api.add_messages_to_queue is flower_dispatch  # medfed's dispatch loop only for the run
    rounds = [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [0, 1]  # the initial model, then round 1


class _FakeLinkState:
    """What :func:`enqueue_on_push` uses of Flower's in-memory link state."""

    def __init__(self) -> None:
        self.stored: list[tuple[int, str]] = []

    def store_message_ins(self, message: tuple[int, str]) -> str:
        self.stored.append(message)
        return message[1]

    def get_message_ins(self, *, node_id: int, limit: int) -> list[tuple[int, str]]:
        mine = [m for m in self.stored if m[0] == node_id][:limit]
        for message in mine:
            self.stored.remove(message)
        return mine


def _start_dispatch(state, monkeypatch, wait_s: float):
    import queue
    import threading

    from federation import flower_internals as engine  # the engine's internals live in the adapter

    monkeypatch.setattr(engine, "PUSH_WAIT_S", wait_s)
    instructions: queue.Queue = queue.Queue()
    stop = threading.Event()
    loop = threading.Thread(target=engine.enqueue_on_push, args=(state, instructions, {1: 0, 2: 1}, stop), daemon=True)
    loop.start()
    return instructions, stop, loop


def test_a_pushed_instruction_is_dispatched_without_waiting_for_the_tick(monkeypatch) -> None:
    import time

    state = _FakeLinkState()
    instructions, stop, loop = _start_dispatch(state, monkeypatch, wait_s=60.0)
    try:
        time.sleep(0.2)  # the loop has looked once and now waits (60 s unless woken)
        state.store_message_ins((2, "train-2"))  # as Flower's InMemoryGrid.push_messages does
        state.store_message_ins((1, "train-1"))
        got = {instructions.get(timeout=10), instructions.get(timeout=10)}
    finally:
        stop.set()
        state.store_message_ins((1, "wake"))  # ends the 60 s wait
        loop.join(timeout=10)
    assert got == {(1, "train-1"), (2, "train-2")}
    assert not loop.is_alive() and "store_message_ins" not in vars(state)  # the state is as it was


def test_dispatch_still_ends_on_stop_without_a_push(monkeypatch) -> None:
    state = _FakeLinkState()
    _, stop, loop = _start_dispatch(state, monkeypatch, wait_s=0.05)
    stop.set()
    loop.join(timeout=5)
    assert not loop.is_alive() and "store_message_ins" not in vars(state)


def test_flower_engine_still_has_the_loop_medfed_replaces() -> None:
    import inspect

    from flwr.server.superlink.fleet.vce import vce_api

    from federation.flower_internals import enqueue_on_push

    assert list(inspect.signature(vce_api.add_messages_to_queue).parameters) == list(
        inspect.signature(enqueue_on_push).parameters
    )
    assert "add_messages_to_queue" in vce_api.run_api.__code__.co_names  # looked up when the run starts


_WORKER = '''
import logging, sys
if sys.argv[2] == "hook":
    from simulations.worker_exit import exit_without_teardown
    exit_without_teardown()
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
logging.getLogger("site").info("written before the exit")
class Loud:
    def __del__(self):
        sys.__stderr__.write("torn down")
keep = Loud()
sys.stdout.write("buffered")  # no newline, no flush
sys.exit(0)
'''


@pytest.mark.parametrize("hook", [True, False])
def test_a_worker_with_the_exit_hook_skips_the_teardown_but_not_its_output(tmp_path, hook: bool) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script, log = tmp_path / "worker.py", tmp_path / "site.log"
    script.write_text(_WORKER)
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, str(script), str(log), "hook" if hook else "none"], cwd=root,
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": root, "PATH": ""})
    assert done.returncode == 0 and done.stdout == "buffered"
    assert "written before the exit" in log.read_text()
    assert ("torn down" in done.stderr) is not hook  # module teardown runs only without the hook


def test_start_ray_gives_the_workers_flower_settings_and_the_exit_hook(monkeypatch) -> None:
    import importlib
    import sys

    import ray

    from simulations import engine

    started = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.update(kwargs))
    monkeypatch.setenv("PYTHONPATH", "/opt/site-extra")
    engine.start_ray(verbose=False)
    env = started["runtime_env"]
    module, _, name = env["worker_process_setup_hook"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is importlib.import_module(
        "simulations.worker_exit").exit_without_teardown
    assert env["env_vars"]["PYTHONPATH"].split(":") == [*sys.path, "/opt/site-extra"]  # as Flower's backend
    assert {k: started[k] for k in ("include_dashboard", "log_to_driver", "logging_level")} == {
        "include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
