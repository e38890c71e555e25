"""Privacy accounting: pinned epsilon values, run-long state across rounds, budget refusal.

Expected numbers were computed once with Opacus 1.6's accountants and are hard-coded,
so that a regression in medfed *or* in Opacus' accounting fails these tests.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from federation.config.schema import PrivacyConfig
from federation.privacy import (
    STATE_FORMAT,
    PrivacyBudgetExhausted,
    PrivacyStateError,
    SitePrivacy,
    epsilon_for,
    is_empty_batch,
    local_steps,
    noise_only_step,
    sample_rate_for,
    strip_module_prefix,
    unwrap_model,
)

REL = 1e-6

# epsilon_for(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=1e-5)
EPS_RDP_1000 = 1.7117700912203435
EPS_PRV_1000 = 1.52547264980387
EPS_GDP_1000 = 1.377429100810624

# sigma=1.0, q=0.01, 100 steps per round, delta=1e-5 (RDP): epsilon after rounds 1..7
EPS_ROUNDS = [
    1.2141452107864754,
    1.3401111658286198,
    1.4513680855427142,
    1.5545488373513578,
    1.6528760939928668,
    1.7476905710434574,
    1.839659903169753,
]

# Target mode: epsilon 2.0 at delta 1e-5 over 3 rounds of 100 steps at q=0.01 (RDP)
TARGET_SIGMA = 0.885009765625
TARGET_EPS_3_ROUNDS = 1.9957202194816797
TARGET_EPS_4_ROUNDS = 2.131850980834771


def _site(**privacy: float | str) -> SitePrivacy:
    """A site with 1000 examples, batch 10 (q = 0.01), 1 epoch = 100 steps per round."""
    config = PrivacyConfig(**privacy)
    return SitePrivacy(config=config, num_examples=1000, batch_size=10, local_epochs=1.0, planned_rounds=3)


def _ship(state: dict) -> dict:
    """What survives a trip through a Flower ConfigRecord / JSON between processes."""
    return json.loads(json.dumps(state))


# ------------------------------------------------------------------ pure maths
def test_epsilon_for_rdp_is_pinned_and_matches_opacus() -> None:
    eps = epsilon_for(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=1e-5)
    assert eps == pytest.approx(EPS_RDP_1000, rel=REL)
    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.01, 1000)]
    assert eps == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)


@pytest.mark.parametrize(("mechanism", "expected"), [("prv", EPS_PRV_1000), ("gdp", EPS_GDP_1000)])
def test_epsilon_for_other_accountants_is_pinned(mechanism: str, expected: float) -> None:
    eps = epsilon_for(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=1e-5, accountant=mechanism)
    assert eps == pytest.approx(expected, rel=REL)


def test_epsilon_for_zero_and_negative_steps() -> None:
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0
    with pytest.raises(ValueError, match="steps"):
        epsilon_for(noise_multiplier=1.0, sample_rate=0.1, steps=-1, delta=1e-5)


def test_sample_rate_and_steps_per_round() -> None:
    assert sample_rate_for(num_examples=100, batch_size=32) == 0.32
    assert sample_rate_for(num_examples=10, batch_size=64) == 1.0
    assert local_steps(num_examples=100, batch_size=32, local_epochs=1.0) == 4  # ceil(3.125)
    assert local_steps(num_examples=64, batch_size=16, local_epochs=0.5) == 2
    assert local_steps(num_examples=10, batch_size=1, local_epochs=0.3) == 3  # 3.0000000000000004 -> 3
    assert local_steps(num_examples=10, batch_size=64, local_epochs=2.5) == 3  # q capped at 1
    assert local_steps(num_examples=1000, batch_size=10, local_epochs=0.0001) == 1
    with pytest.raises(ValueError):
        local_steps(num_examples=0, batch_size=1, local_epochs=1.0)


# ------------------------------------------------------------------ SitePrivacy basics
def test_site_privacy_properties_before_any_step() -> None:
    site = _site(noise_multiplier=1.0)
    assert site.sample_rate == 0.01
    assert site.steps_per_round == 100
    assert site.noise_multiplier == 1.0
    assert site.delta == 1e-5
    assert site.epsilon_spent() == 0.0
    assert site.total_steps == 0
    assert site.epsilon_after(100) == pytest.approx(EPS_ROUNDS[0], rel=REL)
    assert site.epsilon_spent() == 0.0  # epsilon_after changes nothing


def test_site_privacy_refuses_disabled_config() -> None:
    with pytest.raises(ValueError, match="privacy=None"):
        _site(enabled=False)


def test_record_steps_merges_like_opacus() -> None:
    site = _site(noise_multiplier=1.0)
    site.record_steps(60)
    site.record_steps(0)
    site.record_steps(40)
    assert site.history == [(1.0, 0.01, 100)]
    assert site.epsilon_spent() == pytest.approx(EPS_ROUNDS[0], rel=REL)
    with pytest.raises(ValueError):
        site.record_steps(-1)


# ------------------------------------------------------------------ state across rounds
def test_state_carried_through_fresh_objects_equals_one_accountant() -> None:
    state = None
    per_round = []
    for _ in range(3):
        site = _site(noise_multiplier=1.0)  # a fresh process every round
        if state is not None:
            site.load_state_dict(state)
        site.check_round()
        site.record_steps(site.steps_per_round)
        per_round.append(site.epsilon_spent())
        state = _ship(site.state_dict())

    assert per_round == pytest.approx(EPS_ROUNDS[:3], rel=REL)

    single = RDPAccountant()  # one accountant that saw every step
    for _ in range(300):
        single.step(noise_multiplier=1.0, sample_rate=0.01)
    assert per_round[-1] == pytest.approx(single.get_epsilon(delta=1e-5), rel=1e-12)

    # The bug this design avoids: a fresh accountant each round reports one round's epsilon.
    fresh = _site(noise_multiplier=1.0)
    fresh.record_steps(100)
    assert fresh.epsilon_spent() == pytest.approx(EPS_ROUNDS[0], rel=REL)
    assert fresh.epsilon_spent() < per_round[-1] - 0.2


def test_state_dict_is_flat_and_config_record_friendly() -> None:
    site = _site(noise_multiplier=1.0)
    site.record_steps(100)
    state = site.state_dict()
    for key, value in state.items():
        assert isinstance(value, (int, float, str, list)), key
        if isinstance(value, list):
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value), key
    assert state["format"] == STATE_FORMAT
    assert state["history_noise"] == [1.0]
    assert state["history_rate"] == [0.01]
    assert state["history_steps"] == [100]
    assert state["total_steps"] == 100
    assert state["epsilon"] == pytest.approx(EPS_ROUNDS[0], rel=REL)
    assert _ship(state) == state


def test_load_state_rejects_mismatches() -> None:
    site = _site(noise_multiplier=1.0)
    site.record_steps(100)
    state = site.state_dict()

    with pytest.raises(PrivacyStateError, match="noise_multiplier"):
        _site(noise_multiplier=1.2).load_state_dict(state)
    with pytest.raises(PrivacyStateError, match="accountant"):
        _site(noise_multiplier=1.0, accountant="prv").load_state_dict(state)
    with pytest.raises(PrivacyStateError, match="delta"):
        _site(noise_multiplier=1.0, target_delta=1e-6).load_state_dict(state)
    other_size = SitePrivacy(
        config=PrivacyConfig(noise_multiplier=1.0), num_examples=500, batch_size=10,
        local_epochs=1.0, planned_rounds=3,
    )
    with pytest.raises(PrivacyStateError, match="sample rate"):
        other_size.load_state_dict(state)
    with pytest.raises(PrivacyStateError, match="differ in length"):
        _site(noise_multiplier=1.0).load_state_dict({**state, "history_steps": [100, 5]})
    with pytest.raises(PrivacyStateError, match="format"):
        _site(noise_multiplier=1.0).load_state_dict({**state, "format": "other"})
    with pytest.raises(PrivacyStateError, match="lacks keys"):
        _site(noise_multiplier=1.0).load_state_dict({"format": STATE_FORMAT})


# ------------------------------------------------------------------ budget modes
def test_target_mode_noise_is_pinned_and_fits_the_budget() -> None:
    site = _site(target_epsilon=2.0)
    assert site.noise_multiplier == pytest.approx(TARGET_SIGMA, rel=REL)
    after_planned = site.epsilon_after(3 * site.steps_per_round)
    assert after_planned == pytest.approx(TARGET_EPS_3_ROUNDS, rel=REL)
    assert 2.0 - 0.01 <= after_planned <= 2.0
    assert site.epsilon_after(4 * site.steps_per_round) == pytest.approx(TARGET_EPS_4_ROUNDS, rel=REL)


def test_target_mode_refuses_the_round_after_the_planned_ones() -> None:
    state = None
    for round_number in range(1, 5):
        site = _site(target_epsilon=2.0)
        if state is not None:
            site.load_state_dict(_ship(state))
        if round_number <= 3:
            site.check_round()
            site.record_steps(site.steps_per_round)
            state = site.state_dict()
            continue
        with pytest.raises(PrivacyBudgetExhausted) as refused:
            site.check_round()
        reason = refused.value.reason
        assert "target_epsilon=2" in reason and "delta=1e-05" in reason
        assert "1.9957" in reason and "2.1319" in reason  # spent, and after the refused round
        assert site.epsilon_spent() == pytest.approx(TARGET_EPS_3_ROUNDS, rel=REL)  # nothing spent


def test_target_mode_keeps_the_stored_noise_multiplier() -> None:
    site = _site(target_epsilon=2.0)
    site.record_steps(100)
    state = _ship(site.state_dict())
    replanned = SitePrivacy(
        config=PrivacyConfig(target_epsilon=2.0), num_examples=1000, batch_size=10,
        local_epochs=1.0, planned_rounds=10,
    )
    replanned.load_state_dict(state)
    assert replanned.noise_multiplier == pytest.approx(TARGET_SIGMA, rel=REL)


def test_noise_mode_stops_at_the_budget() -> None:
    refused_at = None
    state = None
    for round_number in range(1, 9):
        site = _site(noise_multiplier=1.0, target_epsilon=1.8)
        if state is not None:
            site.load_state_dict(_ship(state))
        try:
            site.check_round()
        except PrivacyBudgetExhausted as stop:
            refused_at = round_number
            assert "1.7477" in stop.reason and "1.8397" in stop.reason and "target_epsilon=1.8" in stop.reason
            break
        site.record_steps(site.steps_per_round)
        assert site.epsilon_spent() == pytest.approx(EPS_ROUNDS[round_number - 1], rel=REL)
        state = site.state_dict()
    assert refused_at == 7
    assert site.epsilon_spent() <= 1.8


def test_budget_exhausted_is_an_exception_with_reason() -> None:
    error = PrivacyBudgetExhausted("budget gone")
    assert isinstance(error, Exception)
    assert error.reason == "budget gone"
    assert str(error) == "budget gone"


# ------------------------------------------------------------------ engine
def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_make_private_samples_and_accounts_at_exactly_b_over_n() -> None:
    """Opacus alone would use q = 1/ceil(100/32) = 0.25; the site's q is 32/100."""
    dataset = TensorDataset(torch.randn(100, 4), torch.randint(0, 2, (100,)))
    site = SitePrivacy(
        config=PrivacyConfig(noise_multiplier=1.0), num_examples=100, batch_size=32,
        local_epochs=1.0, planned_rounds=1,
    )
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, dp_optimizer, dp_loader = site.make_private(
        model=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=32), seed=0
    )
    assert dp_loader.batch_sampler.sample_rate == 0.32
    assert dp_optimizer.expected_batch_size == 32
    batches = itertools.chain(dp_loader, dp_loader)  # one pass yields int(1 / q) = 3 batches
    for _ in range(site.steps_per_round):
        batch = next(batches)
        dp_optimizer.zero_grad()
        if is_empty_batch(batch):
            noise_only_step(dp_optimizer)
            continue
        nn.functional.cross_entropy(dp_model(batch[0]), batch[1]).backward()
        dp_optimizer.step()
    assert site.history == [(1.0, 0.32, 4)]
    assert any(k.startswith("_module.") for k in dp_model.state_dict())

    plain = unwrap_model(dp_model)
    assert plain is model
    assert not any(k.startswith("_module.") for k in model.state_dict())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_noise_only_step_is_accounted_and_moves_weights() -> None:
    dataset = TensorDataset(torch.randn(10, 4), torch.randint(0, 2, (10,)))
    site = SitePrivacy(
        config=PrivacyConfig(noise_multiplier=1.0), num_examples=10, batch_size=2,
        local_epochs=1.0, planned_rounds=1,
    )
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    _, dp_optimizer, _ = site.make_private(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=2), seed=0,
    )
    noise_only_step(dp_optimizer)
    assert site.history == [(1.0, 0.2, 1)]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_make_private_rejects_batchnorm_and_wrong_dataset_size() -> None:
    dataset = TensorDataset(torch.randn(10, 4), torch.randint(0, 2, (10,)))
    site = SitePrivacy(
        config=PrivacyConfig(noise_multiplier=1.0), num_examples=10, batch_size=2,
        local_epochs=1.0, planned_rounds=1,
    )
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="BatchNorm"):
        site.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          data_loader=DataLoader(dataset, batch_size=2))
    small = TensorDataset(torch.randn(9, 4), torch.randint(0, 2, (9,)))
    model = _tiny_model()
    with pytest.raises(ValueError, match="9 examples"):
        site.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          data_loader=DataLoader(small, batch_size=2))


def test_strip_module_prefix() -> None:
    state = {"_module.a.weight": 1, "_module._module.b": 2, "c": 3}
    assert strip_module_prefix(state) == {"a.weight": 1, "b": 2, "c": 3}

