"""A coordinator killed mid-run resumes (issue 19, item 5): no round lost or repeated, no epsilon counted twice."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from client.ledger import PrivacyLedger
from client.replay import REPLY_FILE
from client.site import site_settings, train_round
from federation.config import load_config
from federation.models import build_model

TINY = ["data.num_samples=160", "data.num_sites=2", "model.width=4", "train.batch_size=16", "server.rounds=3",
        "strategy.min_sites=1"]


def test_a_redone_round_gets_the_reply_already_sent_and_spends_nothing(tmp_path: Path) -> None:
    config = load_config(None, TINY)
    node = {"site-name": "north", "data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "disk"), "partition-id": 0,
            "num-partitions": 2}
    settings = site_settings(node_config=node, config=config, run_name="r")
    torch.manual_seed(0)
    start = build_model(config.model, in_channels=1, num_classes=2, dp=True).state_dict()

    first = train_round(config=config, settings=settings, global_weights=start, server_round=1)
    ledger = PrivacyLedger.open(settings.state_dir).runs["r"]
    accountant = json.loads((settings.run_state_dir / "privacy.json").read_text())
    assert first.refusal is None and not first.replayed and (settings.run_state_dir / REPLY_FILE).is_file()

    # the coordinator died before its checkpoint and asks for round 1 again, from the same model
    again = train_round(config=config, settings=settings, global_weights=dict(start), server_round=1)
    assert again.replayed and again.metrics == first.metrics
    assert all(torch.equal(again.weights[k], first.weights[k]) for k in first.weights)
    assert PrivacyLedger.open(settings.state_dir).runs["r"] == ledger  # nothing reserved or committed
    assert json.loads((settings.run_state_dir / "privacy.json").read_text()) == accountant

    # round 2 (or round 1 from another model) is a new release: trained and counted
    second = train_round(config=config, settings=settings, global_weights=first.weights, server_round=2)
    assert not second.replayed and second.metrics["epsilon"] > first.metrics["epsilon"]
    assert PrivacyLedger.open(settings.state_dir).runs["r"].rounds == 2
    other = {k: v + 0.01 for k, v in start.items()}
    assert not train_round(config=config, settings=settings, global_weights=other, server_round=2).replayed
