"""A site process reuses its data and model between rounds without changing any result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client import cache
from client.site import evaluate_round, site_settings, train_round
from federation.config import load_config
from federation.data import load_site_data
from federation.models import build_model


def _config(tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            f"server.out_dir={tmp_path}", "data.num_samples=120", "data.num_sites=2", "model.width=4",
            "train.batch_size=16", "server.rounds=3", "privacy.noise_multiplier=1.0",
            "privacy.target_epsilon=1000", *extra,
        ],
    )


@pytest.fixture(autouse=True)
def _empty_cache():
    cache.clear()
    yield
    cache.clear()


def test_site_data_is_loaded_once_per_process_within_the_budget(tmp_path: Path) -> None:
    config = _config(tmp_path).data
    first = cache.site_data(config, seed=0, site_index=1, num_sites=2, budget_mb=64)
    assert cache.site_data(config, seed=0, site_index=1, num_sites=2, budget_mb=64) is first
    fresh = load_site_data(config, seed=0, site_index=1, num_sites=2)
    assert torch.equal(first.train.tensors[0], fresh.train.tensors[0])
    assert torch.equal(first.test.tensors[1], fresh.test.tensors[1])
    assert cache.cached_bytes() == sum(t.numel() * t.element_size() for t in (*first.train.tensors, *first.test.tensors))
    other_seed = cache.site_data(config, seed=1, site_index=1, num_sites=2, budget_mb=64)
    assert other_seed is not first


def test_budget_zero_loads_every_time_and_a_small_budget_evicts_the_oldest(tmp_path: Path) -> None:
    config = _config(tmp_path).data
    a = cache.site_data(config, seed=0, site_index=0, num_sites=2, budget_mb=0)
    assert cache.site_data(config, seed=0, site_index=0, num_sites=2, budget_mb=0) is not a
    assert cache.cached_bytes() == 0
    budget_mb = 1  # ~60 synthetic 28x28 images per site: ~190 kB, so about five sites fit
    kept = [cache.site_data(config, seed=s, site_index=0, num_sites=2, budget_mb=budget_mb) for s in range(8)]
    sizes = [cache._nbytes(d) for d in kept]
    newest = next(n for n in range(len(sizes), 0, -1) if sum(sizes[-n:]) <= 1 << 20)  # the LRU suffix that fits
    assert 3 <= newest < 8
    assert cache.cached_bytes() == sum(sizes[-newest:])
    assert cache.site_data(config, seed=7, site_index=0, num_sites=2, budget_mb=budget_mb) is kept[7]
    assert cache.site_data(config, seed=0, site_index=0, num_sites=2, budget_mb=budget_mb) is not kept[0]


def test_a_model_is_lent_once_and_reused_only_after_release(tmp_path: Path) -> None:
    config = _config(tmp_path)
    def build():
        return build_model(config.model, in_channels=1, num_classes=2, dp=True)
    first = cache.checkout_model(config.model, in_channels=1, num_classes=2, dp=True, build=build)
    second = cache.checkout_model(config.model, in_channels=1, num_classes=2, dp=True, build=build)
    assert second is not first
    cache.release_model(first)
    assert cache.checkout_model(config.model, in_channels=1, num_classes=2, dp=True, build=build) is first
    assert cache.checkout_model(config.model, in_channels=1, num_classes=2, dp=False, build=build) is not first


def test_evaluation_and_dp_training_share_a_model_checked_for_dp_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    checks: list[str] = []
    original = cache.check_dp_compatible
    monkeypatch.setattr(cache, "check_dp_compatible",
                        lambda model, cfg: (checks.append(cfg.name), original(model, cfg)))
    def build():
        return build_model(config.model, in_channels=1, num_classes=2, dp=False)
    evaluating = cache.checkout_model(config.model, in_channels=1, num_classes=2, dp=False, build=build)
    assert checks == []  # evaluation never checks (nor loads Opacus)
    cache.release_model(evaluating)
    for _ in range(2):
        training = cache.checkout_model(config.model, in_channels=1, num_classes=2, dp=True, build=build)
        assert training is evaluating
        cache.release_model(training)
    assert checks == ["cnn"]  # once per model
    batch = _config(tmp_path, "model.norm=batch", "privacy.enabled=false").model  # a DP config refuses it
    def build_batch():
        return build_model(batch, in_channels=1, num_classes=2, dp=False)
    cache.release_model(cache.checkout_model(batch, in_channels=1, num_classes=2, dp=False, build=build_batch))
    with pytest.raises(ValueError, match="'batch' cannot be used with differential privacy"):
        cache.checkout_model(batch, in_channels=1, num_classes=2, dp=True, build=build_batch)


def _rounds(config, run_name: str, *, fresh_each_time: bool) -> list[tuple[dict, dict, dict]]:
    """Train site 1, site 2, site 1 again (DP), evaluating after each; optionally emptying the cache each time."""
    torch.manual_seed(0)
    weights = build_model(config.model, in_channels=1, num_classes=2, dp=config.privacy.enabled).state_dict()
    results = []
    for site_index, server_round in ((0, 1), (1, 1), (0, 2)):
        settings = site_settings(
            node_config={"partition-id": site_index, "num-partitions": 2}, config=config, run_name=run_name
        )
        if fresh_each_time:
            cache.clear()
        outcome = train_round(config=config, settings=settings, global_weights=weights, server_round=server_round)
        assert outcome.refusal is None
        if fresh_each_time:
            cache.clear()
        metrics = evaluate_round(config=config, settings=settings, global_weights=outcome.weights)
        results.append((outcome.weights, {k: v for k, v in outcome.metrics.items() if k != "seconds"}, metrics))
        weights = outcome.weights
    return results


@pytest.mark.parametrize("dp", [True, False])
def test_reused_data_and_model_give_bit_identical_rounds(tmp_path: Path, dp: bool, simulated_site_process: None) -> None:
    config = _config(tmp_path, f"privacy.enabled={str(dp).lower()}")
    reference = _rounds(config, "fresh", fresh_each_time=True)
    reused = _rounds(config, "reused", fresh_each_time=False)
    for (w_ref, m_ref, e_ref), (w_new, m_new, e_new) in zip(reference, reused):
        assert w_ref.keys() == w_new.keys()
        assert all(torch.equal(w_ref[k], w_new[k]) for k in w_ref)
        assert m_ref == m_new
        assert e_ref == e_new
    assert len(cache._models) == 1  # one architecture, one idle model after the rounds


def test_refused_and_failed_rounds_hand_the_model_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, simulated_site_process: None
) -> None:
    import federation.training as training

    torch.manual_seed(0)
    tight = _config(tmp_path, "privacy.target_epsilon=0.01")  # one round at noise 1.0 spends far more
    settings = site_settings(node_config={"partition-id": 0, "num-partitions": 2}, config=tight, run_name="refused")
    weights = build_model(tight.model, in_channels=1, num_classes=2, dp=True).state_dict()
    outcome = train_round(config=tight, settings=settings, global_weights=weights, server_round=1)
    assert outcome.refusal is not None and outcome.refusal.startswith("run-budget")
    assert len(cache._models) == 1  # the refused round's model is idle again, not leaked
    idle = next(iter(cache._models.values()))

    config = _config(tmp_path)
    settings = site_settings(node_config={"partition-id": 0, "num-partitions": 2}, config=config, run_name="failing")
    def broken(**kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(training, "train_local", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        train_round(config=config, settings=settings, global_weights=weights, server_round=1)
    assert list(cache._models.values()) == [idle]  # the same model was lent to the failed round and came back
