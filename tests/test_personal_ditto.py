"""Ditto (issue 21): a personal model per site, regularised towards the global one, kept and accounted at the site.

The real-site tests drive the real ClientApp handlers of ``real_site`` (conftest.py:
128 training images, DP with noise 1.0, batch 16: 8 steps a round).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.guard import OutboundViolation
from client.ledger import PrivacyLedger
from client.personal import PERSONAL_MODEL_FILE, check_local_kept, planned_rounds, save_personal_model
from client.site import SiteSettings, train_round
from federation.config import ConfigError, from_flat, load_config
from federation.privacy import epsilon_for

DITTO = "train.ditto_lambda=0.5"
EPS_ONE_UPDATE = epsilon_for(noise_multiplier=1.0, sample_rate=16 / 128, steps=8, delta=1e-5)
EPS_DITTO_ROUND = epsilon_for(noise_multiplier=1.0, sample_rate=16 / 128, steps=16, delta=1e-5)


def _arrays(reply) -> dict[str, torch.Tensor]:
    assert not reply.has_error(), reply.error
    assert "status" not in reply.content, reply.content["status"]
    return reply.content["arrays"].to_torch_state_dict()


def _settings(root: Path, *, data_dir: Path, simulated: bool = True) -> SiteSettings:
    return SiteSettings(name="hospital-a", site_index=0, num_sites=1, data_dir=str(data_dir), state_dir=root,
                        run_name="r", simulated=simulated)


def test_the_guard_refuses_a_reply_carrying_the_personal_model(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "s", data_dir=tmp_path)
    global_weights = {"a": torch.zeros(3), "b": torch.ones(2)}
    personal = {"a": torch.tensor([0.5, 0.0, 0.0]), "b": torch.ones(2)}  # b: as received (e.g. frozen)
    save_personal_model(personal, settings)
    check_local_kept({"a": torch.tensor([0.1, 0.0, 0.0]), "b": torch.ones(2)}, global_weights=global_weights,
                     settings=settings)  # the global update: leaves
    with pytest.raises(OutboundViolation, match=r"personal-model tensors would leave the site: \['a'\]"):
        check_local_kept(personal, global_weights=global_weights, settings=settings)


def test_a_real_ditto_site_keeps_its_personal_model_and_accounts_both_updates(real_site) -> None:
    sent = real_site.weights(real_site.run_config(DITTO))
    reply = real_site.train(DITTO, weights=sent)
    update = _arrays(reply)
    run_dir = real_site.state_dir / real_site.name / "runs" / "r"
    personal = torch.load(run_dir / PERSONAL_MODEL_FILE, weights_only=True)
    assert personal.keys() == update.keys()
    assert all(not torch.equal(personal[n], update[n]) for n in personal if not torch.equal(personal[n], sent[n]))
    assert any(not torch.equal(personal[n], sent[n]) for n in personal)  # the personal model did train
    # One accountant for the run: 8 global + 8 personal steps, in the ledger and in what the site reports.
    state = json.loads((run_dir / "privacy.json").read_text())
    assert sum(state["history_steps"]) == 16
    ledger = PrivacyLedger.open(real_site.state_dir / real_site.name).runs["r"]
    assert (ledger.epsilon, ledger.rounds, ledger.reserved) == (pytest.approx(EPS_DITTO_ROUND, rel=1e-12), 1, 0.0)
    assert EPS_DITTO_ROUND == pytest.approx(4.696514, abs=1e-6) and EPS_DITTO_ROUND > EPS_ONE_UPDATE
    assert reply.content["metrics"]["epsilon"] == pytest.approx(EPS_DITTO_ROUND, rel=1e-12)  # what it reports
    evaluation = real_site.evaluate(DITTO, weights=update).content["metrics"]
    assert "personal-loss" in evaluation and evaluation["personal-loss"] != evaluation["loss"]


def test_a_personal_update_beyond_the_budget_is_skipped_and_the_global_one_still_sent(real_site) -> None:
    budget = f"privacy.target_epsilon={EPS_ONE_UPDATE * 1.001}"  # room for the global update only
    update = _arrays(real_site.train(DITTO, budget))
    run_dir = real_site.state_dir / real_site.name / "runs" / "r"
    assert not (run_dir / PERSONAL_MODEL_FILE).exists() and update
    ledger = PrivacyLedger.open(real_site.state_dir / real_site.name).runs["r"]
    assert ledger.epsilon == pytest.approx(EPS_ONE_UPDATE, rel=1e-12)


def test_a_simulated_ditto_site_is_deterministic(real_site, tmp_path: Path) -> None:
    run_config = real_site.run_config(DITTO)
    config, sent = from_flat(run_config, source="test"), real_site.weights(run_config)

    def one_round(root: Path, lam: float = 0.5) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        cfg = config.model_copy(update={"train": config.train.model_copy(update={"ditto_lambda": lam})})
        settings = _settings(root, data_dir=real_site.data_dir)
        update = train_round(config=cfg, settings=settings, global_weights=sent, server_round=1).weights
        path = settings.run_state_dir / PERSONAL_MODEL_FILE
        return (torch.load(path, weights_only=True) if path.is_file() else None), update

    (personal, update), (personal_again, update_again) = one_round(tmp_path / "a"), one_round(tmp_path / "b")
    assert all(torch.equal(personal[n], personal_again[n]) and torch.equal(update[n], update_again[n])
               for n in personal)
    assert any(not torch.equal(personal[n], update[n]) for n in personal)  # two models, two noise streams
    no_personal, plain = one_round(tmp_path / "plain", lam=0.0)  # the same run without Ditto
    assert no_personal is None and all(torch.equal(plain[n], update[n]) for n in plain)  # the update is untouched


def test_the_proximal_step_pulls_onto_the_given_anchor_not_the_start() -> None:
    from torch.utils.data import TensorDataset

    from federation.config.schema import TrainConfig
    from federation.training import train_local

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    anchor = {"weight": torch.full((2, 4), 0.25), "bias": torch.tensor([1.0, -1.0])}
    config = TrainConfig(lr=0.1, batch_size=4, device="cpu")
    # lr * mu >= 1: every step lands on the anchor (Ditto: the round's global model)
    train_local(model=model, dataset=data, config=config, privacy=None, seed=1, proximal_mu=1e6,
                proximal_anchor=anchor)
    assert all(torch.allclose(p, anchor[n], atol=1e-7) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"proximal_anchor lacks the trainable parameters \['bias'\]"):
        train_local(model=model, dataset=data, config=config, privacy=None, seed=1, proximal_mu=0.1,
                    proximal_anchor={"weight": anchor["weight"]})


def test_ditto_settings() -> None:
    config = load_config(None, ["train.ditto_lambda=0.1", "server.rounds=5", "privacy.enabled=true"])
    assert planned_rounds(config) == 10
    assert planned_rounds(config.model_copy(update={"train": config.train.model_copy(
        update={"ditto_lambda": 0.0, "finetune_rounds": 2})})) == 7
    with pytest.raises(ConfigError, match="does not combine with train.local_norm or train.finetune_rounds"):
        load_config(None, ["train.ditto_lambda=0.1", "train.local_norm=true"])


def test_the_baselines_table_gains_a_ditto_row(tmp_path: Path) -> None:
    from simulations.baselines import PERSONALIZED_METHODS, personalized_result
    from simulations.harness import resolve_config

    config = resolve_config(overrides=["data.num_sites=2", "strategy.min_sites=2", "train.ditto_lambda=0.1"])
    site = {"accuracy": 0.7, "auc": 0.8, "loss": 0.5, "personal-accuracy": 0.75, "personal-auc": 0.85,
            "personal-loss": 0.45}
    (tmp_path / "summary.json").write_text(json.dumps({"final_site_evaluate": {"site-1": site, "site-2": site}}))
    result = personalized_result(tmp_path, config)
    assert result.method == "Ditto" and "Ditto" in PERSONALIZED_METHODS
    assert result.per_site["site-2"] == {"accuracy": 0.75, "auc": 0.85, "loss": 0.45}
