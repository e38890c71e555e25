"""Run directory bookkeeping and the site's outbound guard (no simulation needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.guard import EVALUATE_METRICS, TRAIN_METRICS, OutboundViolation, check_reply
from federation.config import load_config
from server.run_dir import Checkpoint, RunDirectory, read_jsonl


def _config(tmp_path: Path, *extra: str):
    return load_config(None, [f"server.out_dir={tmp_path}", "server.run_name=r1", *extra])


def _reply(**records) -> RecordDict:
    return RecordDict(records)


def test_guard_accepts_weights_and_whitelisted_numbers() -> None:
    content = _reply(
        arrays=ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))}),
        metrics=MetricRecord({"num-examples": 10, "train-loss": 0.5, "epsilon": 1.2}),
        site=ConfigRecord({"name": "site-1"}),
    )
    assert check_reply(content, allowed_metrics=TRAIN_METRICS, parameter_names=["w"]) is content


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"metrics": MetricRecord({"num-examples": 1, "patient-age": 54.0})}, "non-whitelisted \\['patient-age'\\]"),
        ({"notes": ConfigRecord({"path": "/data/p123.dcm"})}, "config record 'notes'"),
        ({"site": ConfigRecord({"name": "s", "path": "/data/x.dcm"})}, "config record 'site'"),
        ({"arrays": ArrayRecord({"w": Array(np.ones(1)), "pixels": Array(np.ones(4))})}, "non-parameter arrays \\['pixels'\\]"),
        ({"metrics": MetricRecord({"num-examples": 1, "auc": [0.1, 0.9]})}, "not a single number"),
    ],
)
def test_guard_rejects_anything_else(records: dict, message: str) -> None:
    allowed = TRAIN_METRICS | EVALUATE_METRICS
    with pytest.raises(OutboundViolation, match=message):
        check_reply(_reply(**records), allowed_metrics=allowed, parameter_names=["w"])


def test_run_directory_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    RunDirectory.create(_config(tmp_path))
    with pytest.raises(FileExistsError, match="server.resume="):
        RunDirectory.create(_config(tmp_path))


def test_resume_drops_lines_of_the_unfinished_round(tmp_path: Path) -> None:
    run = RunDirectory.create(_config(tmp_path))
    weights = {"w": torch.arange(3.0)}
    for rnd in (1, 2):
        run.append("rounds.jsonl", {"round": rnd, "global": {"auc": float("nan")}})
        run.append("sites.jsonl", {"round": rnd, "site": "site-1", "phase": "train", "metrics": {}})
        if rnd == 1:  # round 2 crashed before its checkpoint
            run.save_checkpoint(Checkpoint(round=1, weights=weights, strategy_state={"m": np.ones(2)}))
    assert read_jsonl(run.path / "rounds.jsonl")[0]["global"]["auc"] is None  # NaN stored as null

    resumed = RunDirectory.resume(_config(tmp_path, f"server.resume={run.path}", "server.rounds=9"))
    assert resumed.last_completed_round() == 1
    assert [r["round"] for r in resumed.rounds()] == [1]
    assert [r["round"] for r in read_jsonl(run.path / "sites.jsonl")] == [1]
    checkpoint = resumed.load_checkpoint()
    assert checkpoint.round == 1 and torch.equal(checkpoint.weights["w"], weights["w"])
    np.testing.assert_array_equal(checkpoint.strategy_state["m"], np.ones(2))


def test_resume_refuses_a_different_experiment(tmp_path: Path) -> None:
    run = RunDirectory.create(_config(tmp_path))
    with pytest.raises(ValueError, match="differs .* in model.name, train.lr"):
        RunDirectory.resume(_config(tmp_path, f"server.resume={run.path}", "model.name=resnet18", "train.lr=0.3"))
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        RunDirectory.resume(_config(tmp_path, f"server.resume={tmp_path / 'nothing'}"))


def test_keep_checkpoints_prunes_the_oldest(tmp_path: Path) -> None:
    run = RunDirectory.create(_config(tmp_path, "server.keep_checkpoints=2"))
    for rnd in (1, 2, 3):
        run.save_checkpoint(Checkpoint(round=rnd, weights={"w": torch.zeros(1)}, strategy_state={}))
    assert [p.name for p in run.checkpoints()] == ["round-0002.pt", "round-0003.pt"]
    run.write_summary({"x": float("inf")})
    assert json.loads((run.path / "summary.json").read_text()) == {"x": None}
