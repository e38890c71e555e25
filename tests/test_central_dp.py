"""Central DP: Flower's server-side clipping wrapper, uniform averaging, Opacus-accounted ε."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from federation.config import ExperimentConfig
from strategies.central_dp import CENTRAL_DP_FILE, AccountedServerSideClipping, central_epsilon, with_central_dp


def test_epsilon_is_pinned_and_matches_the_gaussian_rdp_closed_form() -> None:
    # 5 releases of a Gaussian mechanism, noise multiplier 1, no amplification, delta 1e-5
    assert central_epsilon(noise_multipliers=[1.0] * 5, delta=1e-5) == pytest.approx(12.301691480042896, rel=1e-9)
    assert central_epsilon(noise_multipliers=[2.0] * 10, delta=1e-5) == pytest.approx(8.079406222420491, rel=1e-9)
    # independent: RDP of the Gaussian mechanism is alpha / (2 z^2) per release, converted as in Balle et al. 2020
    alphas = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = alphas / 2 * (1 / 1.0**2 + 1 / 1.0**2 + 1 / (2 / 3) ** 2)
    closed = np.min(rdp - (np.log(1e-5) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas))
    assert central_epsilon(noise_multipliers=[1.0, 1.0, 2 / 3], delta=1e-5) == pytest.approx(closed, rel=1e-12)
    assert central_epsilon(noise_multipliers=[], delta=1e-5) == 0.0


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # see conftest.py


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _reply(node: int, delta: np.ndarray, num_examples: int) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(delta.astype(np.float64))}),
         "metrics": MetricRecord({"num-examples": num_examples})}
    )
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))


def _round(dp: AccountedServerSideClipping, rnd: int, deltas: list[np.ndarray], weights: list[int]) -> np.ndarray:
    zeros = ArrayRecord({"w": Array(np.zeros_like(deltas[0], dtype=np.float64))})
    list(dp.configure_train(rnd, zeros, ConfigRecord(), _Grid()))  # type: ignore[arg-type]
    replies = [_reply(i + 1, d, w) for i, (d, w) in enumerate(zip(deltas, weights))]
    arrays, _ = dp.aggregate_train(rnd, replies)
    assert arrays is not None
    return arrays["w"].numpy()


def test_updates_are_clipped_and_averaged_uniformly(tmp_path: Path) -> None:
    dp = AccountedServerSideClipping(FedAvg(), noise_multiplier=1e-9, clipping_norm=1.0, num_sampled_clients=2,
                                     delta=1e-5)
    # site 1's update has norm 5 -> clipped to norm 1; site 2's (norm 0.5) is kept; weights 10 vs 30 are ignored
    new = _round(dp, 1, [np.array([3.0, 4.0]), np.array([0.3, 0.4])], [10, 30])
    np.testing.assert_allclose(new, [0.45, 0.6], atol=1e-6)


def test_noise_is_calibrated_and_every_release_is_accounted(tmp_path: Path) -> None:
    log = tmp_path / CENTRAL_DP_FILE
    dp = AccountedServerSideClipping(FedAvg(), noise_multiplier=0.5, clipping_norm=1.0, num_sampled_clients=2,
                                     delta=1e-5, log_path=log)
    np.random.seed(0)
    noisy = _round(dp, 1, [np.full(200_000, 1e-6)] * 2, [1, 1])  # (Flower's clipping divides by the norm: not 0)
    assert (noisy - 1e-6).std() == pytest.approx(0.5 * 1.0 / 2, rel=0.01)  # z C / n
    assert dp.epsilon == pytest.approx(central_epsilon(noise_multipliers=[0.5], delta=1e-5), rel=1e-12)
    # round 2: only one of the two sampled sites replies -> sensitivity C/1, noise z C/2: z_eff = z/2
    _round(dp, 2, [np.full(10, 1e-6)], [1])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["round"], r["sites"], r["effective_noise_multiplier"]) for r in records] == [(1, 2, 0.5), (2, 1, 0.25)]
    expected = central_epsilon(noise_multipliers=[0.5, 0.25], delta=1e-5)
    assert records[-1]["epsilon"] == pytest.approx(expected, rel=1e-12) and records[-1]["delta"] == 1e-5
    # a resumed coordinator replays the file: the budget already spent is not forgotten
    again = AccountedServerSideClipping(FedAvg(), noise_multiplier=0.5, clipping_norm=1.0, num_sampled_clients=2,
                                        delta=1e-5, log_path=log)
    assert again.epsilon == pytest.approx(expected, rel=1e-12)


def test_switched_by_config_and_limited_to_averaging_strategies() -> None:
    base = FedAvg()
    off = ExperimentConfig()
    assert with_central_dp(base, config=off) is base
    on = ExperimentConfig.model_validate(
        {"central_dp": {"enabled": True, "noise_multiplier": 0.8, "clipping_norm": 2.0},
         "data": {"num_sites": 4}, "strategy": {"fraction_train": 0.5}}
    )
    wrapped = with_central_dp(base, config=on)
    assert isinstance(wrapped, AccountedServerSideClipping) and wrapped.strategy is base
    assert (wrapped.noise_multiplier, wrapped.clipping_norm, wrapped.num_sampled_clients) == (0.8, 2.0, 2)
    krum = on.model_copy(update={"strategy": on.strategy.model_copy(update={"name": "krum"})})
    with pytest.raises(ValueError, match=r"central_dp.enabled=true needs strategy.name in \['fedavg', 'fedprox'\]"):
        with_central_dp(base, config=krum)


@pytest.mark.integration
def test_central_dp_in_a_simulated_federation(tmp_path: Path) -> None:
    from simulations.harness import resolve_config, simulate

    config = resolve_config(overrides=[
        "data.num_sites=2", "data.num_samples=120", "model.width=4", "strategy.min_sites=2", "server.rounds=1",
        "privacy.enabled=false", "central_dp.enabled=true", "central_dp.noise_multiplier=1.5",
        "central_dp.clipping_norm=0.5", f"server.out_dir={tmp_path}", "server.run_name=cdp",
    ])
    run_dir = simulate(config)
    records = [json.loads(line) for line in (run_dir / CENTRAL_DP_FILE).read_text().splitlines()]
    assert [(r["round"], r["sites"], r["clipping_norm"]) for r in records] == [(1, 2, 0.5)]
    assert records[0]["epsilon"] == pytest.approx(central_epsilon(noise_multipliers=[1.5], delta=1e-5), rel=1e-12)
