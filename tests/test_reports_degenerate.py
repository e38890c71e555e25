"""Degenerate metrics never lose a report, and a failed end-of-run output is named, never announced (issue 19).

Early rounds and small sites give metrics that cannot exist: no predicted
positives (PPV), one class in a test split (AUC, sensitivity), zero-width
intervals, empty subgroups, NaN/None AUC, values a site suppressed. Every writer
must still write its report and plots, showing ``n/a (<reason>)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from federation.config import load_config, to_yaml
from server.clinical_plots import error_bars
from server.clinical_report import write_clinical_report
from server.model_card import write_model_card
from server.run_outputs import OUTPUTS_FILE, RunOutputs

ROC = {f"roc-tpr-{k:02d}": min(1.0, k / 10) for k in range(21)}


def _rates(name: str, value: float | None, lo: float | None, hi: float | None) -> dict[str, float | None]:
    return {name: value, f"{name}-lo": lo, f"{name}-hi": hi}


#: Round 1 of the default preset: the model predicts no positive (the Wilson bound of 0/49 is 7e-18 > 0).
NO_PREDICTED_POSITIVES = {
    "num-examples": 100, "n-pos": 49, "tp": 0, "fp": 0, "tn": 51, "fn": 49, "ece": 0.137, "brier": 0.264,
    **_rates("roc-auc", 0.718, 0.616, 0.821), **_rates("sensitivity", 0.0, 6.938893903907228e-18, 0.0727),
    **_rates("specificity", 1.0, 0.930, 1.0), **_rates("op-accuracy", 0.51, 0.413, 0.606),
    **_rates("ppv", None, None, None), **_rates("npv", 0.51, 0.413, 0.606), **ROC,
}
#: A site whose test split holds negatives only: no AUC, no sensitivity, an empty subgroup of positives.
ONE_CLASS = {
    "num-examples": 20, "n-pos": 0, "tp": 0, "fp": 2, "tn": 18, "fn": 0, "ece": 0.2, "brier": 0.1,
    **_rates("roc-auc", None, None, None), **_rates("sensitivity", None, None, None),
    **_rates("specificity", 0.9, 0.699, 0.972), **_rates("op-accuracy", 0.9, 0.699, 0.972),
    **_rates("ppv", 0.0, 0.0, 0.658), **_rates("npv", 1.0, 0.824, 1.0),
    **{f"roc-tpr-{k:02d}": None for k in range(21)},
    "grp-sex-f-n": 12, "grp-sex-f-n-pos": 0, **_rates("grp-sex-f-roc-auc", None, None, None),
    **_rates("grp-sex-f-sensitivity", None, None, None), **_rates("grp-sex-f-specificity", 1.0, 0.757, 1.0),
    **_rates("grp-sex-f-op-accuracy", 1.0, 0.757, 1.0), "grp-sex-f-ece": 0.1,
}
#: Perfect separation: zero-width DeLong interval; a NaN AUC elsewhere.
ZERO_WIDTH = {**NO_PREDICTED_POSITIVES, **_rates("roc-auc", 1.0, 1.0, 1.0), **_rates("op-accuracy", 1.0, 1.0, 1.0)}
NAN_AUC = {**NO_PREDICTED_POSITIVES, "roc-auc": math.nan}
#: A site that suppressed everything but its size and accuracy.
SUPPRESSED = {"num-examples": 8, "accuracy": 0.5}

SITES = {"site-1": NO_PREDICTED_POSITIVES, "site-2": ONE_CLASS, "site-3": ZERO_WIDTH, "site-4": NAN_AUC,
         "site-5": SUPPRESSED}


def _run_dir(tmp_path: Path, sites: dict[str, dict], *, num_sites: int = 5) -> Path:
    config = load_config(None, [f"server.out_dir={tmp_path}", f"data.num_sites={num_sites}", "data.num_samples=100",
                                "strategy.min_sites=1"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(config))
    rows = [{"round": 1, "site": site, "phase": "evaluate", "metrics": m} for site, m in sites.items()]
    (run / "sites.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN written as JSON NaN
    (run / "rounds.jsonl").write_text(json.dumps({"round": 0, "global": {}}) + "\n"
                                      + json.dumps({"round": 1, "global": {"auc": None}, "sites": {}}) + "\n")
    return run


def _words(text: str) -> str:
    """Console output without its line wrapping (rich wraps at the terminal's width)."""
    return "".join(text.split())


def _row(text: str, site: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {site} |"))


def test_error_bars_are_never_negative_and_zero_without_an_interval() -> None:
    bars = error_bars([{"value": 0.0, "lo": 6.938893903907228e-18, "hi": 0.07},
                       {"value": 1.0, "lo": 1.0, "hi": 1.0}, {"value": math.nan, "lo": math.nan, "hi": math.nan},
                       {"value": 0.5, "lo": None, "hi": None}])
    assert bars.tolist() == [[0.0, 0.0, 0.0, 0.0], [0.07, 0.0, 0.0, 0.0]]


def test_clinical_report_shows_every_degenerate_metric_as_na_with_its_reason(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, SITES)
    text = write_clinical_report(run).read_text()
    assert "| n/a (no predicted positives) | 0.510 [0.413, 0.606] |" in _row(text, "site-1")
    assert "| 0.000 [0.000, 0.073] |" in _row(text, "site-1")  # the 7e-18 bound prints as 0
    two = _row(text, "site-2")
    assert "| 20 | 0 | n/a (one class in the test split) | n/a (no positives in the test split) | 0.900" in two
    assert "| 1.000 [1.000, 1.000] |" in _row(text, "site-3")
    assert "| n/a (undefined for this test split) |" in _row(text, "site-4")
    five = _row(text, "site-5")
    assert five.startswith("| site-5 | 1 | 8 | n/a (suppressed or not sent by the site) | "
                           "n/a (suppressed or not sent by the site) |")
    assert "| site-2 | female | 12 | 0 | n/a (one class in the test split) | n/a (no positives in the test split) |" \
        in text
    assert "| female | 1 | 12 | n/a (no positives in the test split) |" in text  # the pooled empty subgroup
    for plot in ("roc.png", "reliability.png", "site_metrics.png", "subgroups.png"):
        assert (run / "clinical" / plot).stat().st_size > 0, plot
        assert f"![{plot[:-4]}]({plot})" in text
    fairness = json.loads((run / "clinical" / "fairness.json").read_text())
    assert fairness["sites"]["site-2"]["rates"]["roc-auc"] == {"value": None, "lo": None, "hi": None,
                                                               "na": "one class in the test split"}


def test_clinical_report_without_any_site_evaluation(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, {})
    text = write_clinical_report(run).read_text()
    assert ("n/a (no site sent an evaluation: every site failed or refused, or no round was evaluated)") in text
    assert "| roc-auc | n/a (no site reported a value) | n/a | n/a |" in text
    assert (run / "clinical" / "site_metrics.png").stat().st_size > 0


def test_pooled_rates_leave_out_sites_that_suppressed_them(tmp_path: Path) -> None:
    from server.fairness import fairness_summary

    summary = fairness_summary({"a": NO_PREDICTED_POSITIVES, "b": {**NO_PREDICTED_POSITIVES, "specificity": None}},
                               confidence=0.95, bins=10)
    spec = summary["pooled"]["specificity"]
    assert spec["value"] == 1.0 and spec["note"] == "1 of 2 sites did not report it"  # 51 of 51, not 51 of 102
    only_negatives = fairness_summary({"b": ONE_CLASS}, confidence=0.95, bins=10)["pooled"]
    assert only_negatives["sensitivity"]["na"] == "no positives in the test split"


def test_model_card_shows_na_with_reasons(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, SITES)
    write_clinical_report(run)
    md, card_json = write_model_card(run, load_config(run / "config.yaml"))
    text = md.read_text()
    assert "| site-2 | 20 | n/a (one class in the test split) | n/a (no positives in the test split) |" in text
    assert ("| site-5 | 8 | n/a (suppressed or not sent by the site) |") in text
    assert "central evaluation on the pooled test split): n/a (no central evaluation)." in text
    assert json.loads(card_json.read_text())["run"] == "run"


def test_research_report_and_final_site_metrics_take_a_none_auc(tmp_path: Path) -> None:
    from simulations.baselines import final_site_metrics
    from simulations.research_report import write_run_report

    run = _run_dir(tmp_path, {}, num_sites=2)
    evaluate = {"site-1": {**ONE_CLASS, "auc": None, "accuracy": 0.9, "loss": 0.4},
                "site-2": {**NO_PREDICTED_POSITIVES, "auc": 0.7, "accuracy": 0.51, "loss": 0.69}}
    (run / "summary.json").write_text(json.dumps({
        "final_site_evaluate": evaluate, "final_global": {}, "rounds_completed": 1, "best_global_auc": None,
        "best_round": None, "privacy": {"epsilon_per_site": {"site-1": 2.5}}}))
    metrics = final_site_metrics(run)
    assert math.isnan(metrics["site-1"]["auc"]) and metrics["site-1"]["accuracy"] == 0.9
    text = write_run_report(run).read_text()
    assert "| site-1 | n/a (one class in the test split) | 0.900 | 0.400 | 2.50 |" in text
    assert "| site-2 | 0.700 | 0.510 | 0.690 | n/a (no ledger entry) |" in text
    assert "| mean over sites | 0.700 | 0.705 | | |" in text
    assert "after round 1: AUC n/a (no central evaluation)" in text


def test_sweep_comparison_shows_na_for_a_metric_no_run_reported() -> None:
    from simulations.sweep_report import comparison, comparison_markdown

    rows = [{"scenario": "s", "strategy": "fedavg", "epsilon": "8", "seed": 0, "global_auc": math.nan,
             "global_accuracy": 0.5, "site_mean_auc": math.nan, "site_mean_accuracy": 0.5, "max_epsilon": 7.9}]
    text = comparison_markdown(comparison(rows, grid_keys=[]), grid_keys=[])
    assert "| s | fedavg | 8 | 1 | n/a (no run reported it) | 0.500 ± 0.000 |" in text


def test_run_outputs_record_written_and_failed_outputs(tmp_path: Path) -> None:
    outputs = RunOutputs(tmp_path)
    (tmp_path / "a.md").write_text("x")

    def broken() -> Path:
        raise ValueError("'yerr' must not contain negative values\nmore")

    assert outputs.produce("report", lambda: tmp_path / "a.md") == [tmp_path / "a.md"]
    assert outputs.produce("card", broken) == []
    assert outputs.produce("ghost", lambda: tmp_path / "missing.md") == []
    again = RunOutputs.load(tmp_path)
    assert again.written() == {"report": [tmp_path / "a.md"]}
    assert again.failures() == {"card": "ValueError: 'yerr' must not contain negative values",
                                "ghost": f"its writer returned {tmp_path / 'missing.md'}, which does not exist"}
    assert json.loads((tmp_path / OUTPUTS_FILE).read_text())["report"] == {"ok": True, "paths": ["a.md"]}


def test_clinical_report_command_names_a_failed_output_exits_1_and_keeps_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.model_card
    from simulations.cli import app

    run = _run_dir(tmp_path, SITES)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "round-0001.pt").write_bytes(b"kept")
    before = (run / "rounds.jsonl").read_text()

    def broken(*args: object, **kwargs: object) -> Path:
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(server.model_card, "write_clinical_report", broken)
    monkeypatch.setattr(server.model_card, "export_global_model", lambda run_dir, config: None)
    result = CliRunner().invoke(app, ["clinical-report", str(run)], terminal_width=400)
    assert result.exit_code == 1, result.output
    output = _words(result.output)
    assert _words("could not write clinical report: ValueError: 'yerr' must not contain negative values") in output
    assert _words(f"model card: {run / 'model_card.md'}") in output
    assert "clinicalreport:" not in output.replace("couldnotwriteclinicalreport:", "")
    assert not (run / "clinical" / "report.md").exists()
    assert (run / "rounds.jsonl").read_text() == before
    assert (run / "checkpoints" / "round-0001.pt").read_bytes() == b"kept"
    assert RunOutputs.load(run).failures() == {"clinical report": "ValueError: 'yerr' must not contain negative values"}


@pytest.mark.parametrize("dp", [True, False])
def test_simulate_names_only_outputs_that_exist_and_exits_1_on_a_failed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dp: bool
) -> None:
    import simulations.cli as cli
    from simulations.harness import resolve_config, run_dir_of

    config = resolve_config(overrides=[f"server.out_dir={tmp_path}", "server.run_name=r", "server.rounds=1",
                                       f"privacy.enabled={str(dp).lower()}"])
    run = run_dir_of(config)

    def fake_simulate(resolved: object, **kwargs: object) -> Path:  # what the ServerApp leaves behind
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(to_yaml(config))
        (run / "rounds.jsonl").write_text(json.dumps({"round": 1, "global": {"auc": 0.7}, "sites": {"site-1": {}},
                                                      "aggregated": True}) + "\n")
        spent = {"site-1": 2.5 if dp else 0.0}  # a site without DP-SGD records 0 spent
        (run / "summary.json").write_text(json.dumps({"privacy": {"epsilon_per_site": spent}, "rounds_completed": 1}))
        outputs = RunOutputs(run)
        outputs.produce("model card", lambda: (run / "model_card.md").write_text("card") and run / "model_card.md")
        outputs.fail("clinical report", "ValueError: 'yerr' must not contain negative values")
        return run

    monkeypatch.setattr(cli, "start_simulation", lambda **kwargs: config)
    monkeypatch.setattr(cli, "simulate", fake_simulate)
    monkeypatch.setattr(cli, "simulation_gallery", lambda run_dir, outputs: [])
    monkeypatch.setattr(cli, "after_simulate", lambda run_dir, **kwargs: (run_dir / "report.md").write_text("r")
                        and run_dir / "report.md")
    result = CliRunner().invoke(cli.app, ["simulate"], terminal_width=400)
    assert result.exit_code == 1, result.output
    output = _words(result.output)
    assert _words(f"model card: {run / 'model_card.md'}") in output
    assert _words(f"research report: {run / 'report.md'}") in output
    assert _words(f"plots: {run / 'plots' / 'global_auc.png'}") in output
    assert _words("could not write clinical report: ValueError: 'yerr' must not contain negative values") in output
    assert "exportedmodel:" not in output
    assert (run / "rounds.jsonl").is_file()
    if dp:
        assert _words("ε per site: site-1 2.50") in output
    else:  # not "ε 0.00", which would read as perfect privacy
        assert _words("no differential privacy (privacy.enabled=false)") in output and "εpersite" not in output


@pytest.mark.integration
def test_one_round_of_the_default_preset_writes_every_output(tmp_path: Path) -> None:
    from simulations.cli import app

    result = CliRunner().invoke(app, ["simulate", "--set", "server.rounds=1", "--set", "data.num_samples=120",
                                      "--set", f"server.out_dir={tmp_path}", "--set", "server.run_name=one"],
                                terminal_width=400)
    run = tmp_path / "one"
    assert result.exit_code == 0, result.output
    outputs = RunOutputs.load(run)
    assert outputs.failures() == {}
    assert set(outputs.written()) == {"exported model", "clinical report", "model card", "plots",
                                      "Grad-CAM gallery", "research report"}
    for path in ("clinical/report.md", "model_card.md", "model_card.json", "export/model.pt2", "report.md",
                 "clinical/site_metrics.png", "checkpoints/round-0001.pt"):
        assert (run / path).stat().st_size > 0, path
    assert _words(f"clinical report: {run / 'clinical' / 'report.md'}") in _words(result.output)
