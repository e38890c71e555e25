"""Sweeps, reports and baselines end to end (3 tiny simulations), and the shipped sweep presets."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from federation.config import ConfigError
from federation.config.schema import FaultsConfig
from federation.faults import round_faults
from server.run_dir import read_jsonl
from simulations.baselines import evaluate_everywhere, load_all_sites, read_baselines, run_baselines
from simulations.harness import resolve_config, simulate
from simulations.research_report import write_run_report
from simulations.sweep import (
    SWEEPS_DIR,
    collect,
    expand,
    failed_runs,
    failure_reason,
    load_sweep,
    run_sweep,
    validate_sweep,
)

SWEEP_PRESETS = sorted(SWEEPS_DIR.glob("*.yaml"))

#: 3 sites of 40 synthetic images, 1 round; one site drops out (quorum 2), site-3 sends a x10 update.
TINY = ["data.num_sites=3", "data.num_samples=120", "model.width=4", "train.batch_size=16", "train.num_threads=1",
        "server.rounds=1", "strategy.min_sites=2", "faults.dropout_rate=0.34", "attack.kind=scale",
        "attack.sites=3", "attack.scale=10"]


@pytest.mark.parametrize("preset", SWEEP_PRESETS, ids=[p.stem for p in SWEEP_PRESETS])
def test_shipped_sweep_presets_validate_and_start_with_their_command(preset: Path) -> None:
    assert preset.read_text().splitlines()[0] == f"# medfed sweep simulations/configs/sweeps/{preset.name}"
    spec = load_sweep(preset)
    runs = expand(spec)
    assert len(runs) == len(spec.scenarios) * len(spec.strategies) * len(spec.privacy) * len(spec.seeds)
    assert len({r.run_id for r in runs}) == len(runs)
    assert len(validate_sweep(spec)) == len(runs)


def test_sweep_preset_problems_are_reported_together(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase: synthetic\nprivacy: [zero]\nmetric: f1\nstrategy: [fedavg]\n")
    with pytest.raises(ConfigError) as caught:
        load_sweep(bad)
    text = str(caught.value)
    assert "strategy: unknown sweep key" in text and "privacy: 'zero'" in text and "metric: 'f1'" in text
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: y\nbase: synthetic\nstrategies: [fedavg, nosuch]\nset: [data.num_sites=2]\n")
    with pytest.raises(ValueError, match="nosuch"):
        validate_sweep(load_sweep(wrong))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("sweep")
    preset = tmp / "tiny.yaml"
    preset.write_text(
        "# medfed sweep tiny.yaml\nname: tiny\nbase: synthetic\n"
        f"set: [{', '.join(TINY)}, privacy.noise_multiplier=1.0]\n"
        "strategies: [fedavg, fedmedian]\nprivacy: [50]\nseeds: [0]\nmetric: auc\n"
    )
    return preset, run_sweep(load_sweep(preset), out_dir=str(tmp / "out"))



@pytest.mark.integration
def test_tiny_sweep_writes_its_comparison_and_is_resumable(sweep: tuple[Path, Path]) -> None:
    preset, root = sweep
    runs = sorted(p.name for p in (root / "runs").iterdir())
    assert runs == ["default__fedavg__eps-50__seed-0", "default__fedmedian__eps-50__seed-0"]
    table = (root / "comparison.md").read_text()
    assert "| default | fedavg | 50 | 1 |" in table and "| default | fedmedian | 50 | 1 |" in table
    with (root / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["strategy"], r["seeds"]) for r in rows] == [("fedavg", "1"), ("fedmedian", "1")]
    summary = json.loads((root / "runs" / runs[0] / "summary.json").read_text())
    assert float(rows[0]["global_auc_mean"]) == pytest.approx(summary["final_global"]["auc"])
    assert float(rows[0]["global_auc_std"]) == 0.0
    assert (root / "plots" / "rounds_default.png").is_file() and (root / "plots" / "privacy_utility.png").is_file()
    assert "![privacy_utility](plots/privacy_utility.png)" in (root / "report.md").read_text()

    # the faulty site is named per round, the round still aggregated with the quorum of 2
    for run in runs:
        rounds = read_jsonl(root / "runs" / run / "rounds.jsonl")
        trained = sorted(name for name, site in rounds[1]["sites"].items() if "train" in site)
        assert len(rounds[1]["failed"]) == 1 and len(trained) == 2 and rounds[1]["aggregated"] is True
        assert trained == sorted({"site-1", "site-2", "site-3"} - {
            f"site-{k + 1}" for k in round_faults(FaultsConfig(dropout_rate=0.34), num_sites=3, server_round=1,
                                                  seed=0)})

    # resumable: a finished run is not redone
    before = {r: (root / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs}
    statuses = []
    run_sweep(load_sweep(preset), out_dir=str(root.parent), on_run=lambda run, status: statuses.append(status))
    assert statuses == ["skipped", "done", "skipped", "done"]
    assert before == {r: (root / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs}


@pytest.mark.integration
def test_a_run_where_no_round_aggregated_is_reported_failed_and_run_again(
    sweep: tuple[Path, Path], tmp_path: Path
) -> None:
    preset, root = sweep
    copy = tmp_path / root.name
    shutil.copytree(root, copy)
    broken = copy / "runs" / "default__fedavg__eps-50__seed-0"
    summary = json.loads((broken / "summary.json").read_text())
    (broken / "summary.json").write_text(json.dumps({**summary, "rounds_aggregated": 0}))
    rounds = read_jsonl(broken / "rounds.jsonl")
    rounds[1] = {**rounds[1], "aggregated": False, "failed": {"site-2": "site error ConfigError"}}
    (broken / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    spec = load_sweep(preset)
    assert failure_reason(broken) == "no round aggregated; first failure: site-2: site error ConfigError"
    assert failed_runs(spec, copy) == [(broken.name, failure_reason(broken))]
    assert [row["strategy"] for row in collect(spec, copy)] == ["fedmedian"]  # left out of the comparison

    statuses: list[str] = []
    run_sweep(spec, out_dir=str(tmp_path), on_run=lambda run, status: statuses.append(status))
    assert statuses == ["running", "done", "skipped", "done"]
    aside = copy / "runs" / f"{broken.name}.failed-1"
    assert json.loads((aside / "summary.json").read_text())["rounds_aggregated"] == 0  # kept, not deleted
    assert failure_reason(broken) is None and failed_runs(spec, copy) == []
    assert "Failed runs" not in (copy / "report.md").read_text()


@pytest.mark.integration
def test_same_seed_gives_identical_metrics_run_to_run(sweep: tuple[Path, Path], tmp_path: Path) -> None:
    _, root = sweep
    first = root / "runs" / "default__fedavg__eps-50__seed-0"
    config = resolve_config(overrides=[*TINY, "privacy.noise_multiplier=1.0", "privacy.target_epsilon=50",
                                       "strategy.name=fedavg", f"server.out_dir={tmp_path}", "server.run_name=again"])
    second = simulate(config)

    def metrics(run: Path) -> list[dict]:
        return [{k: r.get(k) for k in ("round", "global", "sites", "failed", "evaluate", "aggregated")}
                for r in read_jsonl(run / "rounds.jsonl")]

    def strip(rows: list[dict]) -> list[dict]:
        for row in rows:
            for site in (row.get("sites") or {}).values():
                site.get("train", {}).pop("seconds", None)
            row["failed"] = sorted((row.get("failed") or {}).values())  # keyed by random node ids
        return rows

    assert strip(metrics(first)) == strip(metrics(second))
    a = torch.load(first / "checkpoints" / "round-0001.pt", weights_only=False)["weights"]
    b = torch.load(second / "checkpoints" / "round-0001.pt", weights_only=False)["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_baselines_and_report_on_a_tiny_run(sweep: tuple[Path, Path]) -> None:
    _, root = sweep
    run = root / "runs" / "default__fedavg__eps-50__seed-0"
    config = resolve_config(resume=str(run))
    results = run_baselines(config, run_dir=run)
    assert [r.method for r in results] == ["pooled", "local:site-1", "local:site-2", "local:site-3", "federated"]
    sites = load_all_sites(config)
    sizes = [len(s.train) for s in sites]
    assert results[0].epochs == pytest.approx(1.0) and results[1].epochs == pytest.approx(1.0)
    for result in results:
        assert set(result.per_site) == {"site-1", "site-2", "site-3"}
        assert result.overall["n"] == sum(len(s.test) for s in sites)
        assert 0.0 <= result.mean_over_sites("accuracy") <= 1.0
    assert all(r.extra["epsilon"] > 0 for r in results[:4]), "baselines train with DP like the run"
    # the federated row is the final checkpoint evaluated on every site's test split
    state = torch.load(run / "checkpoints" / "round-0001.pt", weights_only=False)
    from simulations.baselines import _fresh_model

    model = _fresh_model(config, sites[0])
    model.load_state_dict(state["weights"])
    assert evaluate_everywhere(model, sites, method="x").per_site == results[-1].per_site
    assert [r.method for r in read_baselines(run)] == [r.method for r in results]
    assert sum(sizes) == 96

    report = write_run_report(run).read_text()
    for text in ("## Scenario", "scale x10 at site-3", "## Sites", "## Participation", "| 1 |",
                 "## Pooled vs local-only vs federated", "| pooled |", "local-only (own site)", "| federated |",
                 "epsilon spent", "![global_auc](plots/global_auc.png)"):
        assert text in report, text


@pytest.mark.integration
def test_cli_report_and_sweep_dry_run(sweep: tuple[Path, Path]) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    preset, root = sweep
    run = root / "runs" / "default__fedmedian__eps-50__seed-0"
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "| mean over sites |" in (run / "report.md").read_text()
    dry = CliRunner().invoke(app, ["sweep", str(preset), "--dry-run"])
    assert dry.exit_code == 0 and "default__fedmedian__eps-50__seed-0" in dry.output
