"""Warm sessions (a sweep's runs share one Ray and its site workers): each run as if it ran cold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client import cache
from federation.config import ExperimentConfig
from federation.data import load_dataset
from server.run_dir import read_jsonl
from simulations.engine import reset_site_worker
from simulations.harness import resolve_config, simulate

#: 2 DP sites of 48 synthetic images, 1 round.
TINY = ["data.num_sites=2", "data.num_samples=96", "model.width=4", "train.batch_size=16", "train.num_threads=1",
        "strategy.min_sites=2", "server.rounds=1", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000"]
#: What differs from run to run by nature (the wall clock, timings).
TIMING = {"seconds", "time", "elapsed", "duration_s", "wall_s", "started", "finished", "created"}


def _config(out: Path, name: str, *extra: str) -> ExperimentConfig:
    return resolve_config(overrides=[*TINY, *extra, f"server.out_dir={out}", f"server.run_name={name}"])


def _untimed(value: object) -> object:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING and "time" not in k and "seconds" not in k}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _records(run: Path) -> dict[str, object]:
    """A run's records less what differs between any two runs: timings, Flower's random node ids, reply order."""
    rounds = read_jsonl(run / "rounds.jsonl")
    for row in rounds:
        row["failed"] = sorted((row.get("failed") or {}).values())  # keyed by the run's random node ids
        row.pop("nodes", None)  # site name -> the run's random node id
    privacy = sorted(read_jsonl(run / "privacy.jsonl"), key=lambda row: (row["round"], row["site"]))
    return {"summary": _untimed(json.loads((run / "summary.json").read_text())), "rounds": _untimed(rounds),
            "privacy": privacy}


def _linear() -> torch.nn.Module:
    return torch.nn.Linear(2, 2)


def test_a_kept_worker_forgets_every_sites_data_and_models() -> None:
    config = _config(Path("/tmp"), "reset")
    data = cache.site_data(config.data, seed=0, site_index=0, num_sites=2, budget_mb=64)
    model = cache.checkout_model(config.model, in_channels=1, num_classes=2, dp=False, build=_linear)
    cache.release_model(model)
    splits = load_dataset(config.data, seed=0)
    assert cache.cached_bytes() > 0 and load_dataset(config.data, seed=0) is splits
    reset_site_worker()
    assert cache.cached_bytes() == 0 and load_dataset(config.data, seed=0) is not splits
    assert cache.site_data(config.data, seed=0, site_index=0, num_sites=2, budget_mb=64) is not data
    assert cache.checkout_model(config.model, in_channels=1, num_classes=2, dp=False, build=_linear) is not model


@pytest.mark.integration
def test_a_run_in_a_warm_session_is_the_same_run_as_cold(tmp_path: Path) -> None:
    import ray

    from simulations.engine import warm_session

    cold = simulate(_config(tmp_path / "cold", "same"))
    assert not ray.is_initialized()
    with warm_session() as session:
        other = simulate(_config(tmp_path / "warm", "other", "seed=3", "strategy.name=fedmedian",
                                 "data.num_samples=120"))
        assert ray.is_initialized()  # kept for the next run
        warm = simulate(_config(tmp_path / "warm", "same"))
    assert not ray.is_initialized()
    assert (session.builds, session.reuses) == (1, 1)  # the second run had the first one's workers
    assert _records(warm) == _records(cold)  # summary, rounds (metrics per site), epsilon spent: bit for bit
    assert _records(other)["summary"] != _records(cold)["summary"]
    a = torch.load(cold / "checkpoints" / "round-0001.pt", weights_only=False)["weights"]
    b = torch.load(warm / "checkpoints" / "round-0001.pt", weights_only=False)["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (cold / "export" / "model_state.pt").read_bytes() == (warm / "export" / "model_state.pt").read_bytes()


def test_a_sweep_runs_its_pending_runs_in_one_warm_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from simulations import sweep, sweep_report

    events: list[str] = []

    @contextlib.contextmanager
    def session(*, verbose: bool, address: str):  # noqa: ANN202
        events.append(f"open {address!r}")
        yield
        events.append("close")

    def fake_simulate(config: ExperimentConfig, *, verbose: bool) -> Path:
        run = Path(config.server.out_dir) / config.server.run_name
        run.mkdir(parents=True)
        (run / "summary.json").write_text('{"rounds_aggregated": 1}')
        events.append(f"run {config.seed}")
        return run

    monkeypatch.setattr(sweep, "warm_session", session)
    monkeypatch.setattr(sweep, "simulate", fake_simulate)
    monkeypatch.setattr(sweep_report, "write_sweep_report", lambda spec, root: root)
    preset = tmp_path / "two.yaml"
    preset.write_text(f"name: two\nbase: synthetic\nset: [{', '.join(TINY)}]\nstrategies: [fedavg]\nseeds: [1, 2]\n")
    spec = sweep.load_sweep(preset)
    sweep.run_sweep(spec, out_dir=str(tmp_path))
    assert events == ["open ''", "run 1", "run 2", "close"]
    sweep.run_sweep(spec, out_dir=str(tmp_path))  # nothing left to run: no Ray started
    sweep.run_sweep(spec, out_dir=str(tmp_path / "cold"), warm=False)
    assert events == ["open ''", "run 1", "run 2", "close", "run 1", "run 2"]


class _FakePool:
    """What :class:`KeptActors` reads of Flower's actor pool."""

    def __init__(self, *, cpus: int, idle: int, actors: int) -> None:
        self.client_resources = {"num_cpus": cpus, "num_gpus": 0.0}
        self.pool = [object() for _ in range(idle)]
        self.num_actors = actors
        self._future_to_actor: dict = {}


@pytest.mark.parametrize(("cpus", "idle", "why"), [(2, 2, "other resources"), (1, 1, "a worker busy or lost")])
def test_kept_workers_are_not_reused_for_other_resources_or_when_one_is_missing(cpus: int, idle: int, why: str) -> None:
    from federation.flower_internals import KeptActors

    kept = KeptActors(on_reuse=reset_site_worker)
    kept.keep(_FakePool(cpus=cpus, idle=idle, actors=2))
    assert kept.take({"num_cpus": 1, "num_gpus": 0.0}) is None, why  # the backend builds new workers
    assert kept.pool is None and kept.reuses == 0
