"""Attacks and faults: each changes exactly what it should, only at simulated sites, deterministically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from client.site import site_settings
from federation.attacks import attack_update, flip_labels, is_attacking, label_flipped, malicious_sites
from federation.config import ConfigError, load_config
from federation.config.schema import AttackConfig, FaultsConfig
from federation.faults import SiteDropout, fault_schedule, round_faults
from simulations.adversary_app import inject_fault, outgoing_weights, training_set
from simulations.harness import resolve_config


def _weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    old = {"conv.weight": torch.randn(4, 3), "fc.bias": torch.randn(2), "bn.num_batches_tracked": torch.tensor(5)}
    new = {"conv.weight": old["conv.weight"] + torch.randn(4, 3) * 0.1, "fc.bias": old["fc.bias"] + 0.5,
           "bn.num_batches_tracked": torch.tensor(6)}
    return old, new


def test_update_attacks_change_float_parameters_as_defined_and_nothing_else() -> None:
    old, new = _weights()
    flipped = attack_update(kind="sign_flip", global_weights=old, local_weights=new)
    scaled = attack_update(kind="scale", global_weights=old, local_weights=new, scale=10.0)
    noisy = attack_update(kind="gaussian", global_weights=old, local_weights=new, noise_std=2.0, seed=3)
    for name in ("conv.weight", "fc.bias"):
        delta = new[name] - old[name]
        torch.testing.assert_close(flipped[name], old[name] - delta)
        torch.testing.assert_close(scaled[name], old[name] + 10.0 * delta)
        assert flipped[name].dtype == new[name].dtype and flipped[name].shape == new[name].shape
    torch.testing.assert_close(scaled["fc.bias"], old["fc.bias"] + 5.0)
    for attacked in (flipped, scaled, noisy):
        assert set(attacked) == set(new)
        assert torch.equal(attacked["bn.num_batches_tracked"], new["bn.num_batches_tracked"])
    noise = torch.cat([(noisy[n] - old[n]).flatten() for n in ("conv.weight", "fc.bias")])
    assert 1.0 < float(noise.std()) < 3.5 and not torch.allclose(noisy["fc.bias"], new["fc.bias"])
    again = attack_update(kind="gaussian", global_weights=old, local_weights=new, noise_std=2.0, seed=3)
    assert all(torch.equal(again[n], noisy[n]) for n in noisy)
    assert torch.equal(new["fc.bias"], _weights()[1]["fc.bias"]), "inputs must not be modified"
    with pytest.raises(ValueError, match="unknown update attack"):
        attack_update(kind="label_flip", global_weights=old, local_weights=new)


def test_label_flip_changes_labels_only() -> None:
    images = torch.rand(6, 1, 4, 4)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    flipped = label_flipped(TensorDataset(images, labels), num_classes=2)
    assert flipped.tensors[0] is images
    assert flipped.tensors[1].tolist() == [1, 0, 0, 1, 0, 1]
    assert labels.tolist() == [0, 1, 1, 0, 1, 0]
    assert flip_labels(torch.tensor([0, 1, 2, 3, 4]), num_classes=5).tolist() == [4, 3, 2, 1, 0]


def test_malicious_sites_are_parsed_and_checked() -> None:
    assert malicious_sites(AttackConfig(), num_sites=5) == ()
    assert malicious_sites(AttackConfig(kind="scale", sites="5,2"), num_sites=5) == (1, 4)
    assert is_attacking(AttackConfig(kind="scale", sites="2", start_round=3), site_index=1, num_sites=3,
                        server_round=3)
    assert not is_attacking(AttackConfig(kind="scale", sites="2", start_round=3), site_index=1, num_sites=3,
                            server_round=2)
    assert load_config(None, ["attack.sites=5"]).attack.sites == "5"
    with pytest.raises(ConfigError, match="attack.sites are 1-based"):
        load_config(None, ["attack.sites=0"])
    with pytest.raises(ConfigError, match=r"attack.sites lists \[4\], but data.num_sites=3"):
        resolve_config(overrides=["attack.kind=sign_flip", "attack.sites=4"])
    with pytest.raises(ConfigError, match="needs attack.sites"):
        resolve_config(overrides=["attack.kind=gaussian"])


def test_faults_are_deterministic_sized_and_disjoint() -> None:
    config = FaultsConfig(dropout_rate=0.2, straggler_rate=0.4, start_round=2)
    assert round_faults(config, num_sites=5, server_round=1, seed=0) == {}
    faults = round_faults(config, num_sites=5, server_round=2, seed=0)
    assert sorted(faults.values()) == ["drop", "late", "late"]
    assert faults == round_faults(config, num_sites=5, server_round=2, seed=0)
    schedule = fault_schedule(config, num_sites=5, rounds=30, seed=0)
    assert set(schedule) == set(range(2, 31))
    assert len({tuple(sorted(f.items())) for f in schedule.values()}) > 5, "the faulty sites vary by round"
    assert round_faults(FaultsConfig(), num_sites=5, server_round=3, seed=0) == {}


@dataclass(frozen=True)
class _Site:
    name: str
    site_index: int
    num_sites: int
    simulated: bool


def test_hooks_act_only_at_simulated_sites(tmp_path: Path, simulated_site_process: None) -> None:
    config = load_config(None, ["data.num_sites=2", "attack.kind=scale", "attack.sites=2", "attack.scale=3",
                                "faults.dropout_rate=0.5", f"server.out_dir={tmp_path}"])
    real = site_settings(node_config={"site-name": "hospital-b", "partition-id": 1, "data-dir": str(tmp_path),
                                      "state-dir": str(tmp_path)}, config=config, run_name="r")
    simulated = site_settings(node_config={"partition-id": 1, "num-partitions": 2}, config=config, run_name="r")
    assert simulated.simulated and not real.simulated  # a state-dir makes a real site, even inside an engine
    old, new = _weights()
    assert outgoing_weights(config, real, global_weights=old, local_weights=new, server_round=1) is new
    attacked = outgoing_weights(config, simulated, global_weights=old, local_weights=new, server_round=1)
    torch.testing.assert_close(attacked["fc.bias"], old["fc.bias"] + 1.5)
    honest = _Site("site-1", 0, 2, True)
    assert outgoing_weights(config, honest, global_weights=old, local_weights=new, server_round=1) is new

    dropped = {k for k, f in round_faults(config.faults, num_sites=2, server_round=1, seed=0).items() if f == "drop"}
    for index in range(2):
        site = _Site(f"site-{index + 1}", index, 2, True)
        if index in dropped:
            with pytest.raises(SiteDropout, match="dropped out of round 1"):
                inject_fault(config, site, server_round=1)
        else:
            inject_fault(config, site, server_round=1)
        inject_fault(config, _Site(site.name, index, 2, False), server_round=1)  # a real site never fails on purpose

    flip = config.model_copy(update={"attack": AttackConfig(kind="label_flip", sites="1")})
    data = TensorDataset(torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 1, 0]))
    assert training_set(flip, _Site("site-1", 0, 2, True), dataset=data, num_classes=2,
                        server_round=1).tensors[1].tolist() == [1, 0, 0, 1]
    assert training_set(flip, _Site("site-1", 0, 2, False), dataset=data, num_classes=2, server_round=1) is data
    assert training_set(flip, _Site("site-2", 1, 2, True), dataset=data, num_classes=2, server_round=1) is data


def test_replies_are_aggregated_in_site_order() -> None:
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    from strategies.ordered import ordered

    def reply(name: str | None, node: int) -> Message:
        content = RecordDict({"site": ConfigRecord({"name": name})}) if name else RecordDict()
        metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                            group_id="", created_at=0.0, ttl=10.0, message_type="train")
        return Message(metadata=metadata, content=content)

    replies = [reply("site-3", 9), reply(None, 4), reply("site-1", 7), reply("site-2", 1)]
    assert [r.metadata.src_node_id for r in ordered(replies)] == [7, 1, 9, 4]
    assert np.array_equal([r.metadata.src_node_id for r in ordered(reversed(replies))], [7, 1, 9, 4])


def test_fedadam_reddi_takes_the_papers_step_without_bias_correction() -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

    from federation.config.schema import StrategyConfig
    from strategies import build_strategy

    def reply(weights: np.ndarray, n: float, node: int) -> Message:
        content = RecordDict({"arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
                              "metrics": MetricRecord({"num-examples": n}),
                              "site": ConfigRecord({"name": f"site-{node}"})})
        metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                            group_id="", created_at=0.0, ttl=10.0, message_type="train")
        return Message(metadata=metadata, content=content)

    config = StrategyConfig(name="fedadam-reddi", eta=0.01, beta_1=0.9, beta_2=0.999, tau=1e-8)
    strategy = build_strategy(config, num_sites=2)
    start = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    strategy.current_arrays = {"w": start.astype(np.float32)}
    replies = [reply(start + np.array([0.2, 0.1, -0.3]), 30, 1), reply(start + np.array([0.4, -0.5, 0.3]), 10, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    delta = (30 * np.array([0.2, 0.1, -0.3]) + 10 * np.array([0.4, -0.5, 0.3])) / 40
    m, v = 0.1 * delta, 0.001 * delta**2
    expected = start + 0.01 * m / (np.sqrt(v) + 1e-8)  # FLamby's FedAdam.perform_round, round 1
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-4)
    assert strategy.eta == 0.01
