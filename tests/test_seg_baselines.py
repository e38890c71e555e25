"""Baselines and sweeps of segmentation runs compare and rank by Dice (issue 20)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from federation.config import load_config
from federation.tasks import get_task
from simulations.baselines import (
    _fresh_model,
    compared,
    final_site_metrics,
    load_all_sites,
    personalized_result,
    ranking,
    run_baselines,
)
from simulations.sweep_report import comparison, comparison_markdown, ranking_line
from simulations.sweep_spec import load_sweep

TINY_SEG = ["data.dataset=synthetic_seg", "data.task=segmentation", "data.num_sites=2", "data.num_samples=40",
            "data.image_size=16", "model.name=unet", "model.width=4", "model.norm=group", "train.batch_size=8",
            "train.num_threads=1", "server.rounds=1", "privacy.enabled=false"]


def test_baselines_of_a_tiny_segmentation_run_compare_and_rank_by_dice(tmp_path: Path) -> None:
    config = load_config(None, TINY_SEG)
    sites = load_all_sites(config)
    federated = _fresh_model(config, sites[0])  # the run's final global model: here its initial weights
    (tmp_path / "checkpoints").mkdir()
    torch.save({"weights": federated.state_dict(), "round": 1}, tmp_path / "checkpoints" / "round-001.pt")

    results = run_baselines(config, run_dir=tmp_path)
    assert [r.method for r in results] == ["pooled", "local:site-1", "local:site-2", "federated"]
    task = get_task("segmentation")
    for site in sites:
        expected = task.evaluate(model=federated, dataset=site.test)
        row = results[-1].per_site[site.name]
        assert row["dice"] == expected["dice"] and row["dice-1"] == expected["dice-1"]
        assert row["n"] == len(site.test)
    order = ranking(results, metric="dice")
    assert [v for _, v in order] == sorted((v for _, v in order), reverse=True)
    assert {m for m, _ in order} == {"pooled", "local-only (own site)", "federated"}
    table = (tmp_path / "baselines.md").read_text()
    assert "**Test dice** (each site's own test split" in table and "**Test dice-1**" in table
    assert "**Test accuracy**" not in table and "test dice)" in table
    assert f"Ranked by mean site Dice: 1. {order[0][0]} ({order[0][1]:.3f})" in table
    saved = json.loads((tmp_path / "baselines.json").read_text())["results"]
    assert saved[-1]["mean_over_sites"]["dice"] == pytest.approx(results[-1].mean_over_sites("dice"))

    (tmp_path / "summary.json").write_text(json.dumps({"final_site_evaluate": {  # what the sites sent
        name: {"dice": 0.5 + k / 10, "loss": 1.0, "dice-1": 0.5 + k / 10, "dice-1-lo": 0.4, "hd95-1": 3.0,
               "num-examples": 7.0} for k, name in enumerate(["site-1", "site-2"])}}))
    assert final_site_metrics(tmp_path, config) == {"site-1": {"dice": 0.5, "loss": 1.0, "dice-1": 0.5},
                                                    "site-2": {"dice": 0.6, "loss": 1.0, "dice-1": 0.6}}


def test_a_personalized_segmentation_run_gets_its_row_by_personal_dice(tmp_path: Path) -> None:
    """FedBN/Ditto sites of a segmentation run report personal-dice (no personal-accuracy): the row is theirs."""
    config = load_config(None, [*TINY_SEG, "train.local_norm=true"])
    reported = {name: {"dice": 0.5, "personal-dice": 0.6 + k / 10, "personal-loss": 0.9}
                for k, name in enumerate(["site-1", "site-2"])}
    (tmp_path / "summary.json").write_text(json.dumps({"final_site_evaluate": reported}))
    result = personalized_result(tmp_path, config)
    assert result is not None and result.method == "FedBN"
    assert result.per_site == {"site-1": {"dice": 0.6, "loss": 0.9}, "site-2": {"dice": 0.7, "loss": 0.9}}
    del reported["site-2"]["personal-dice"]  # a site that released no personal Dice: no row
    (tmp_path / "summary.json").write_text(json.dumps({"final_site_evaluate": reported}))
    assert personalized_result(tmp_path, config) is None
    with pytest.raises(ValueError, match=r"data.task='regression'; they know \['classification', 'segmentation'\]"):
        compared("regression")


def _row(strategy: str, seed: int, dice: float) -> dict:
    return {"run": f"{strategy}-{seed}", "scenario": "default", "strategy": strategy, "epsilon": "off",
            "seed": seed, "global_dice": dice, "global_loss": 1.0, "site_mean_dice": dice - 0.1,
            "site_mean_loss": 1.0, "max_epsilon": math.nan, "curve": []}


def test_a_segmentation_sweep_tables_and_ranks_by_dice(tmp_path: Path) -> None:
    preset = tmp_path / "seg.yaml"
    preset.write_text("name: seg\nbase: synthetic_seg\nstrategies: [fedavg, fedprox]\n")
    assert load_sweep(preset).metric == "dice"  # the base preset's task decides
    rows = [_row("fedavg", 0, 0.70), _row("fedavg", 1, 0.74), _row("fedprox", 0, 0.80), _row("fedprox", 1, 0.82)]
    table = comparison(rows, grid_keys=[], metric="dice")
    assert [e["strategy"] for e in table] == ["fedavg", "fedprox"]
    assert table[1]["global_dice_mean"] == pytest.approx(0.81) and "global_auc_mean" not in table[1]
    markdown = comparison_markdown(table, grid_keys=[], metric="dice")
    assert "| global Dice | mean site Dice | max ε spent |" in markdown
    assert "| default | fedprox | no DP | 2 | 0.810 ± 0.014 | 0.710 ± 0.014 |" in markdown
    assert ranking_line(table, metric="dice") == ("Ranked by global Dice: 1. default / fedprox / no DP "
                                                  "(0.810 ± 0.014), 2. default / fedavg / no DP (0.720 ± 0.028)")
