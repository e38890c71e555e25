"""A hostile coordinator against a real site's DP (issue 26, items 1, 2 and 5).

Each test drives the real ClientApp handlers (or :func:`client.site.train_round`) of a
real site: one whose node config sets site-name, data-dir, state-dir and policy
(``real_site`` in conftest.py: 128 training images, DP with noise 1.0, batch 16).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.guard import TRAIN_METRICS, OutboundViolation, check_reply, train_metrics_allowed
from client.ledger import LedgerError, PrivacyLedger
from client.site import SiteSettings, train_round
from federation.config import ConfigError, from_flat, load_config
from federation.privacy import epsilon_for

EPS_ROUND = epsilon_for(noise_multiplier=1.0, sample_rate=16 / 128, steps=8, delta=1e-5)  # one round at the site


def _update(reply) -> dict[str, torch.Tensor]:
    assert not reply.has_error(), reply.error
    assert "status" not in reply.content, reply.content["status"]
    return reply.content["arrays"].to_torch_state_dict()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _replay(real_site, run_config: dict, *, state_dir: Path, run_name: str = "probe-1"):
    """What the coordinator can compute itself: the site's round with the deterministic (simulated) noise."""
    config = from_flat(run_config, source="test")
    settings = SiteSettings(name=real_site.name, site_index=0, num_sites=1, data_dir=str(real_site.data_dir),
                            state_dir=state_dir, run_name=run_name, simulated=True)
    return train_round(config=config, settings=settings, global_weights=real_site.weights(run_config),
                       server_round=1)


# ---------------------------------------------------------------- 1. the noise is the site's secret
def test_a_real_site_answers_the_same_train_message_with_fresh_noise(real_site) -> None:
    # Same run config, same global model, same round; only the run name differs, so the site's
    # accountant is fresh both times (the old site then sent bit-identical updates).
    first = _update(real_site.train(run_name="probe-1"))
    second = _update(real_site.train(run_name="probe-2"))
    assert not _equal(first, second)
    ledger = PrivacyLedger.open(real_site.state_dir / real_site.name)
    assert ledger.runs["probe-1"].epsilon == ledger.runs["probe-2"].epsilon == pytest.approx(EPS_ROUND, rel=1e-12)


def test_the_noise_cannot_be_reproduced_from_the_run_config(real_site, tmp_path: Path) -> None:
    run_config = real_site.run_config()
    real = _update(real_site.train(run_name="probe-1"))
    replayed = _replay(real_site, run_config, state_dir=tmp_path / "replay")
    assert replayed.refusal is None
    assert not _equal(real, replayed.weights)  # the old site's update equalled this replay bit for bit


def test_a_simulated_site_stays_bit_reproducible(real_site, tmp_path: Path) -> None:
    run_config = real_site.run_config()
    first = _replay(real_site, run_config, state_dir=tmp_path / "a")
    second = _replay(real_site, run_config, state_dir=tmp_path / "b")
    assert _equal(first.weights, second.weights)
    assert first.metrics == {**second.metrics, "seconds": first.metrics["seconds"]}
    assert first.metrics["epsilon"] == pytest.approx(EPS_ROUND, rel=1e-12)


# ---------------------------------------------------------------- 2. no un-noised statistic leaves a DP site
def test_a_real_dp_site_sends_no_training_loss(real_site, tmp_path: Path) -> None:
    metrics = dict(real_site.train().content["metrics"])
    assert set(metrics) == TRAIN_METRICS - {"train-loss"}
    assert (metrics["num-examples"], metrics["steps"]) == (128, 8)
    assert metrics["epsilon"] == pytest.approx(EPS_ROUND, rel=1e-12)
    # a simulated site keeps its (research) training loss; a real site without DP has no DP claim to protect
    assert "train-loss" in _replay(real_site, real_site.run_config(), state_dir=tmp_path / "sim").metrics
    real_site.write_policy(lifetime_epsilon=10.0, lifetime_delta=1e-4, allow_non_dp=True)
    assert "train-loss" in dict(real_site.train("privacy.enabled=false", run_name="plain").content["metrics"])


def test_the_guard_rejects_a_training_loss_from_a_real_dp_site() -> None:
    content = RecordDict({"site": ConfigRecord({"name": "north"}),
                          "metrics": MetricRecord({"num-examples": 96.0, "train-loss": 0.5623, "epsilon": 4.73})})
    with pytest.raises(OutboundViolation, match=r"non-whitelisted \['train-loss'\]"):
        check_reply(content, allowed_metrics=train_metrics_allowed(dp=True, simulated=False))
    for dp, simulated in ((True, True), (False, False)):
        check_reply(content, allowed_metrics=train_metrics_allowed(dp=dp, simulated=simulated))


def test_the_round_table_shows_na_for_a_withheld_training_loss(tmp_path: Path) -> None:
    from simulations.report import _fmt, round_table

    rows = [{"round": 0, "global": {"auc": 0.5}},
            {"round": 1, "global": {"auc": 0.6}, "train": {"epsilon": 1.5}, "sites": {"north": {}}},
            {"round": 2, "global": {"auc": 0.7}, "train": {"epsilon": 2.0, "train-loss": 0.25}, "sites": {"a": {}}}]
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = round_table(tmp_path)
    assert [column.header for column in table.columns][5] == "train loss"
    assert list(table.columns[5].cells) == [_fmt(None), _fmt(None), "0.2500"]  # shown as missing (n/a)


# ---------------------------------------------------------------- 5. delta
def test_delta_is_bounded_by_the_schema_the_data_and_the_policy(real_site) -> None:
    with pytest.raises(ConfigError, match="privacy.target_delta"):
        load_config(None, ["privacy.target_delta=0.5"])
    refused = real_site.train("privacy.target_delta=0.05")  # above 1/128
    assert refused.content["status"]["refused"] == (
        "delta-too-high: privacy.target_delta=0.05 is above 1 over this site's 128 training examples (0.00781)")
    real_site.write_policy(lifetime_epsilon=10.0, lifetime_delta=1e-4, max_delta=1e-6)
    refused = real_site.train()
    assert refused.content["status"]["refused"] == (
        "delta-too-high: privacy.target_delta=1e-05 is above the site's max_delta 1e-06")
    assert not refused.content.array_records
    assert not (real_site.state_dir / real_site.name / "ledger.json").exists()  # nothing reserved
    real_site.write_policy(lifetime_epsilon=10.0, lifetime_delta=1e-4, max_delta=1e-5)
    _update(real_site.train())


def test_delta_counts_for_every_dp_run_whatever_its_epsilon(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    ledger.commit("a", epsilon=-0.53, delta=1e-3, server_round=1)  # what the accountant says at a large delta
    ledger.reserve("b", epsilon=0.0, delta=1e-3)
    ledger.commit("plain", epsilon=0.0, delta=0.0, server_round=1, dp=False)
    again = PrivacyLedger.open(tmp_path)
    assert again.runs["a"].epsilon == 0.0
    assert again.spent_delta() == pytest.approx(2e-3, rel=1e-12)
    assert again.lifetime_after("c", run_epsilon=0.0, delta=1e-3) == (0.0, pytest.approx(3e-3, rel=1e-12))


def test_a_ledger_entry_that_would_not_load_back_is_never_written(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    ledger.commit("a", epsilon=1.25, delta=1e-5, server_round=1)
    before = (tmp_path / "ledger.json").read_bytes()
    for bad in ({"epsilon": float("nan"), "delta": 1e-5}, {"epsilon": float("inf"), "delta": 1e-5},
                {"epsilon": 1.0, "delta": 1.5}):
        with pytest.raises(LedgerError, match="would not load back"):
            PrivacyLedger.open(tmp_path).commit("b", server_round=1, **bad)
        assert (tmp_path / "ledger.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_a_damaged_ledger_is_kept_and_the_site_refuses_clearly(real_site, caplog: pytest.LogCaptureFixture) -> None:
    disk = real_site.state_dir / real_site.name
    disk.mkdir(parents=True)
    damaged = b'{"format": "medfed-ledger-v1", "runs": {"old": {"epsilon": -0.53, "delta": 0.5}}}'
    (disk / "ledger.json").write_bytes(damaged)
    with caplog.at_level(logging.ERROR):
        replies = [real_site.train(), real_site.train(server_round=2)]
    for reply in replies:
        assert not reply.has_error() and not reply.content.array_records
        assert reply.content["status"]["refused"] == (
            "ledger-damaged: the site's privacy ledger does not load; the site trains no more until its "
            "operator restores it (details in the site's own log)")
    assert (disk / "ledger.json").read_bytes() == damaged
    assert f"privacy ledger {disk / 'ledger.json'} is unreadable" in caplog.text
    assert "restored from backup or repaired by hand" in caplog.text
    (disk / "ledger.json").write_text("{not json")
    with pytest.raises(LedgerError, match="never resets or overwrites it"):
        PrivacyLedger.open(disk)
