"""Extending a finished DP run (issue 19, item 3): a raised budget, calibrated noise, one accountant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.config import ConfigError, PrivacyConfig, load_config, to_yaml
from federation.privacy import PrivacyBudgetExhausted, SitePrivacy
from federation.privacy.calibration import calibrate_noise_after, calibrate_noise_rdp
from server.run_dir import read_jsonl
from simulations.harness import resolve_config, simulate


def _site(target: float, rounds: int) -> SitePrivacy:
    return SitePrivacy(config=PrivacyConfig(target_epsilon=target), num_examples=400, batch_size=32,
                       local_epochs=1.0, planned_rounds=rounds)


def _train(privacy: SitePrivacy, rounds: int) -> None:
    for _ in range(rounds):
        privacy.check_round()
        privacy.record_steps(privacy.steps_per_round)


@pytest.fixture(scope="module")
def finished() -> dict:
    """A site that trained all 8 rounds of a run planned at epsilon 8."""
    privacy = _site(8.0, 8)
    _train(privacy, 8)
    return privacy.state_dict()


def test_a_raised_budget_calibrates_the_added_rounds_from_the_same_accountant(finished: dict) -> None:
    assert finished["noise_multiplier"] == 0.8990478515625 and finished["planned_rounds"] == 8
    assert finished["epsilon"] == pytest.approx(7.992169239484637, abs=1e-12)
    extended = _site(12.0, 12)
    extended.load_state_dict(finished)
    assert extended.epsilon_spent() == pytest.approx(7.992169239484637, abs=1e-12)  # the same history
    assert extended.noise_multiplier == pytest.approx(0.72509765625, abs=1e-9)
    _train(extended, 4)
    assert extended.epsilon_spent() == pytest.approx(11.994259207964395, abs=1e-9)  # within 12, 0.01 below
    assert [(round(s, 6), n) for s, _, n in extended.history] == [(0.899048, 104), (0.725098, 52)]
    with pytest.raises(PrivacyBudgetExhausted, match="would reach 12.7258, budget is target_epsilon=12"):
        extended.check_round()  # a 13th round
    again = _site(12.0, 12)  # the next round's process restores the extended state: same noise
    again.load_state_dict(extended.state_dict())
    assert again.noise_multiplier == extended.noise_multiplier


def test_without_a_raised_budget_the_site_keeps_its_noise_and_refuses(finished: dict) -> None:
    more_rounds = _site(8.0, 12)
    more_rounds.load_state_dict(finished)
    assert more_rounds.noise_multiplier == 0.8990478515625
    with pytest.raises(PrivacyBudgetExhausted, match="epsilon spent 7.9922, another round of 13 steps would reach 8.4111"):
        more_rounds.check_round()
    spent = _site(7.9, 12)  # a budget the history already exceeds: no noise fits, the run's noise stays
    spent.load_state_dict(finished)
    assert spent.noise_multiplier == 0.8990478515625
    with pytest.raises(PrivacyBudgetExhausted):
        spent.check_round()


def test_calibration_after_a_history() -> None:
    assert calibrate_noise_after(history=[], target_epsilon=8.0, delta=1e-5, sample_rate=0.08, steps=104) == \
        calibrate_noise_rdp(target_epsilon=8.0, delta=1e-5, sample_rate=0.08, steps=104)
    with pytest.raises(ValueError, match="spent epsilon 30.1606 of its budget 8: no noise leaves room for more steps; raise privacy.target_epsilon"):
        calibrate_noise_after(history=[(0.5, 0.08, 104)], target_epsilon=8.0, delta=1e-5, sample_rate=0.08, steps=13)
    with pytest.raises(ValueError, match="gdp"):
        calibrate_noise_after(history=[(1.0, 0.08, 10)], target_epsilon=8.0, delta=1e-5, sample_rate=0.08, steps=13,
                              accountant="gdp")


def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "finished"
    run.mkdir()
    config = load_config(None, ["server.rounds=8"])
    (run / "config.yaml").write_text(to_yaml(config))
    (run / "privacy.jsonl").write_text("".join(json.dumps({"round": r, "site": s, "epsilon": 7.99 * r / 8,
                                                           "delta": 1e-5}) + "\n"
                                               for r in range(1, 9) for s in ("site-1", "site-2")))
    return run


def test_resume_says_before_starting_that_the_budget_is_spent_and_which_key_to_set(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_config(resume=str(run), overrides=["server.rounds=12"])
    assert err.value.problems == [
        "privacy.target_epsilon: the budget is spent: the run's noise was calibrated to spend "
        "privacy.target_epsilon=8 over its 8 planned rounds (its sites have spent up to epsilon 7.99, privacy.jsonl), "
        "so every site would refuse rounds beyond them. Raise it explicitly to extend the run to server.rounds=12, "
        "e.g. --set privacy.target_epsilon=12: each site then calibrates the added rounds' noise from its own "
        "accountant so that its whole-run epsilon stays within it (its policy and lifetime ledger still decide)"]
    extended = resolve_config(resume=str(run), overrides=["server.rounds=12", "privacy.target_epsilon=12"])
    assert (extended.server.rounds, extended.privacy.target_epsilon) == (12, 12.0)
    assert resolve_config(resume=str(run)).server.rounds == 8  # continuing without extending needs nothing
    fixed = resolve_config(resume=str(run), overrides=["server.rounds=12", "privacy.noise_multiplier=1.0"])
    assert fixed.privacy.noise_multiplier == 1.0  # (a changed noise is refused when the run directory opens)


@pytest.mark.integration
def test_a_finished_dp_run_extends_with_a_raised_budget(tmp_path: Path) -> None:
    """One round at epsilon <= 8, then extended by one round at epsilon <= 12 (simulated sites: pinned)."""
    tiny = ["data.num_sites=2", "data.num_samples=160", "model.width=4", "train.batch_size=16", "strategy.min_sites=2",
            "server.rounds=1", "server.central_eval=false", f"server.out_dir={tmp_path}", "server.run_name=dp"]
    run = simulate(resolve_config(overrides=tiny))
    with pytest.raises(ConfigError, match="privacy.target_epsilon: the budget is spent"):
        resolve_config(resume=str(run), overrides=["server.rounds=2"])
    simulate(resolve_config(resume=str(run), overrides=["server.rounds=2", "privacy.target_epsilon=12"]))
    rounds = read_jsonl(run / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2] and not rounds[2]["refused"] and rounds[2]["aggregated"]
    epsilon = {(row["round"], row["site"]): row["epsilon"] for row in read_jsonl(run / "privacy.jsonl")}
    assert epsilon == pytest.approx({(1, "site-1"): 7.997487520097958, (1, "site-2"): 7.997487520097958,
                                     (2, "site-1"): 11.993552625765528, (2, "site-2"): 11.993552625765528}, abs=1e-9)
    noise = {(row["round"], row["site"]): row["metrics"]["noise-multiplier"]
             for row in read_jsonl(run / "sites.jsonl") if row["phase"] == "train"}
    assert noise[(2, "site-1")] < noise[(1, "site-1")]  # the added round's noise, calibrated at the site
    ledger = json.loads((run / "site-state" / "site-1" / "ledger.json").read_text())
    (entry,) = ledger["runs"].values()
    assert entry["rounds"] == 2 and entry["epsilon"] == pytest.approx(epsilon[(2, "site-1")], abs=1e-9)
