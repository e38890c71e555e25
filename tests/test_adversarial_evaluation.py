"""Issue 26.4: a hostile coordinator's evaluations cannot single out patients at a real site.

The coordinator chooses the run config (``clinical.*``) and the weights, and evaluation
spends no privacy budget. These tests drive the real ClientApp of a real site (the
``real_site`` fixture: site-name, data-dir, state-dir, policy) and pin what it answers:
its own subgroups and floor, no small count, a cache for repeated requests, a fixed
clinical setting per run and an evaluation budget; and the outbound guard's own check.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

import client.site
from client.evaluation import evaluation_rules
from client.guard import EVALUATE_METRICS, OutboundViolation, check_reply
from client.policy import PolicyError, parse_policy
from federation.config import load_config
from federation.metrics import ClinicalSettings, clinical_metrics
from federation.metrics.disclosure import release_metrics


def _metrics(reply) -> dict[str, float]:
    assert not reply.has_error(), reply.error
    assert "status" not in reply.content, reply.content["status"]["refused"]
    return dict(reply.content["metrics"].items())


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal numbers (NaN equal to NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _refusal(reply) -> str:
    assert not reply.has_error() and "metrics" not in reply.content
    return str(reply.content["status"]["refused"])


def _record(real_site, run_name: str = "r") -> dict:
    return json.loads((real_site.state_dir / real_site.name / "runs" / run_name / "evaluation.json").read_text())


def _shifted(weights: dict, step: float) -> dict:
    """Other weights of the same model (the coordinator's next round)."""
    return {k: v + step if v.is_floating_point() else v for k, v in weights.items()}


@pytest.fixture
def aged_site(real_site, monkeypatch: pytest.MonkeyPatch):
    """The real site, its 32 test patients aged 30..61 (one per year), as DICOM headers would give."""
    load = client.site.load_data

    def with_ages(config, settings):
        data = load(config, settings)
        return dataclasses.replace(data, test_groups={"age": np.arange(len(data.test)) + 30})

    monkeypatch.setattr(client.site, "load_data", with_ages)
    return real_site


# -- differencing through the coordinator's subgroup definitions ------------------------
def test_age_band_differencing_reveals_nothing_at_a_real_site(aged_site) -> None:
    # Before: bands "48" and "49" gave age-0 = 18 and 19 patients: their difference is the 48-year-old.
    first = _metrics(aged_site.evaluate("clinical.age_bands=48", "clinical.min_group_size=5"))
    second = _metrics(aged_site.evaluate("clinical.age_bands=49", "clinical.min_group_size=5"))
    assert _same(first, second)
    # the site's own bands (policy default 18,40,65) at its own floor (10): 18-39 and 40-64
    assert {k: v for k, v in first.items() if k.startswith("grp-")} == {"grp-age-1-n": 10.0, "grp-age-2-n": 22.0}
    assert _record(aged_site)["count"] == 1  # the second request was the same request: answered from the cache
    assert _record(aged_site)["settings"]["age_edges"] == [18, 40, 65]


def test_the_site_policy_defines_subgroups_and_the_run_config_may_only_raise_the_floor(tmp_path: Path) -> None:
    policy = parse_policy("lifetime_epsilon: 10\nlifetime_delta: 1.0e-4\nmin_group_size: 20\n"
                          "age_bands: [50]\nsubgroups: [age]\n", path=tmp_path / "policy.yaml")
    lower = load_config(None, ["clinical.min_group_size=5", "clinical.age_bands=48"])
    rules = evaluation_rules(config=lower, simulated=False, policy=policy)
    assert (rules.clinical.min_group_size, rules.clinical.age_edges, rules.subgroups) == (20, (50,), ("age",))
    assert evaluation_rules(config=load_config(None, ["clinical.min_group_size=30"]), simulated=False,
                            policy=policy).clinical.min_group_size == 30
    assert (rules.per_run, rules.lifetime, rules.limited) == (55, None, True)
    research = evaluation_rules(config=lower, simulated=True, policy=policy)  # simulated sites: the run config
    assert (research.clinical.min_group_size, research.clinical.age_edges, research.limited) == (5, (48,), False)
    with pytest.raises(PolicyError, match="min_group_size: Input should be greater than or equal to 5"):
        parse_policy("lifetime_epsilon: 10\nlifetime_delta: 1.0e-4\nmin_group_size: 3\n", path="p.yaml")


# -- small counts ------------------------------------------------------------------------
def _table(tp: int, fp: int, fn: int, tn: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.array([1] * tp + [0] * fp + [1] * fn + [0] * tn)
    p = np.array([0.8] * (tp + fp) + [0.3] * (fn + tn))
    return y, np.stack([1 - p, p], axis=1)


def _released(tp: int, fp: int, fn: int, tn: int, k: int = 10) -> dict[str, float]:
    y, probs = _table(tp, fp, fn, tn)
    raw = clinical_metrics(labels=y, probs=probs, settings=ClinicalSettings(min_group_size=k))
    return release_metrics(raw, num_examples=y.size, min_count=k)


def test_a_confusion_table_with_a_small_cell_is_not_sent() -> None:
    ok = _released(10, 10, 10, 10)
    assert {k: ok[k] for k in ("tp", "fp", "fn", "tn", "n-pos")} == {"tp": 10, "fp": 10, "fn": 10, "tn": 10,
                                                                     "n-pos": 20}
    assert ok["sensitivity"] == 0.5 and ok["ppv"] == 0.5
    # one patient moved: 9 false positives describe fewer than 10 patients -> no table, no rate from it
    small = _released(11, 9, 9, 11)
    assert not {"tp", "fp", "fn", "tn", "sensitivity", "sensitivity-lo", "specificity", "ppv", "npv-hi",
                "op-accuracy"} & set(small)
    assert small["n-pos"] == 20 and small["roc-auc"] == pytest.approx(0.55)
    # the complement: 10 predicted positive of whom 0 are negative says as much as a group of one
    assert "tp" not in _released(10, 0, 10, 20)
    # an empty prediction column says nothing about anyone
    assert {k: v for k, v in _released(0, 0, 20, 20).items() if k in ("tp", "fp", "fn", "tn")} == {
        "tp": 0, "fp": 0, "fn": 20, "tn": 20}


def test_one_crafted_positive_prediction_reveals_no_count() -> None:
    # crafted weights + threshold: only patient 0 (a positive) is predicted positive
    y = np.array([1] * 20 + [0] * 20)
    p = np.where(np.arange(40) == 0, 0.95, 0.15)
    raw = clinical_metrics(labels=y, probs=np.stack([1 - p, p], axis=1), settings=ClinicalSettings())
    assert (raw["tp"], raw["fp"], raw["rel-bin-09-n"], raw["roc-tpr-00"]) == (1, 0, 1, 0.05)  # before
    sent = release_metrics(raw, num_examples=40, min_count=10)
    assert not {"tp", "fp", "sensitivity", "ppv", "roc-tpr-00", "rel-bin-09-n", "rel-bin-01-n"} & set(sent)
    assert sorted(k for k in sent if k.startswith(("rel-bin", "roc-tpr"))) == [
        *(f"rel-bin-{b:02d}-n" for b in (0, 2, 3, 4, 5, 6, 7, 8)), "roc-tpr-20"]  # empty bins only
    check_reply(RecordDict({"metrics": MetricRecord({"num-examples": 40.0, **sent})}),
                allowed_metrics=EVALUATE_METRICS)


def _reply(metrics: dict[str, float]) -> RecordDict:
    return RecordDict({"site": ConfigRecord({"name": "site-1"}), "metrics": MetricRecord(metrics)})


@pytest.mark.parametrize(("metrics", "problem"), [
    ({"tp": 1.0, "fp": 0.0, "fn": 19.0, "tn": 20.0}, "confusion-table cell describes fewer than 5"),
    ({"sensitivity": 0.05}, "a confusion table rate without its counts"),
    ({"roc-tpr-00": 0.05}, "roc-tpr-00 is a count of fewer than 5 positives"),
    ({"rel-bin-09-n": 1.0}, "rel-bin-09-n = 1.0"),
    ({"rel-bin-09-n": 20.0, "rel-bin-09-obs": 0.9}, "rel-bin-09-obs counts 18.0 of 20.0"),
    ({"n-pos": 38.0}, "n-pos 38.0 of 40.0"),
    ({"grp-sex-f-n": 35.0, "grp-sex-f-n-pos": 17.0}, "the sex groups leave a small count of positives"),
])
def test_the_guard_rejects_a_reply_with_a_small_count(metrics: dict[str, float], problem: str) -> None:
    base = {"num-examples": 40.0, "n-pos": 20.0}
    check_reply(_reply(base), allowed_metrics=EVALUATE_METRICS)
    with pytest.raises(OutboundViolation, match=problem):
        check_reply(_reply({**base, **metrics}), allowed_metrics=EVALUATE_METRICS)
    if "grp-" not in next(iter(metrics)) and "rel-bin-09-n" not in metrics:  # a simulated site: research numbers
        check_reply(_reply({**base, **metrics}), allowed_metrics=EVALUATE_METRICS, count_floors=False)


# -- repeated evaluations ------------------------------------------------------------------
def test_an_identical_request_is_answered_from_the_cache(real_site) -> None:
    first = _metrics(real_site.evaluate())
    again = _metrics(real_site.evaluate())
    assert _same(first, again) and first["num-examples"] == 32 and first["n-pos"] == 16
    assert _record(real_site)["count"] == 1
    audit = [json.loads(line) for line in (real_site.state_dir / real_site.name / "audit.jsonl").open()]
    assert [(e["event"], e["cached"], e["evaluations"]) for e in audit] == [("evaluate", False, 1),
                                                                            ("evaluate", True, 1)]


def test_evaluations_beyond_the_budget_are_refused(real_site) -> None:
    real_site.write_policy(lifetime_epsilon=10.0, lifetime_delta=1e-4, max_evaluations_per_run=2,
                           max_evaluations_lifetime=3)
    weights = real_site.weights(real_site.run_config())
    assert math.isfinite(_metrics(real_site.evaluate(weights=weights))["roc-auc"])
    _metrics(real_site.evaluate(weights=_shifted(weights, 1e-3)))
    assert _refusal(real_site.evaluate(weights=_shifted(weights, 2e-3))) == (
        "evaluation-budget: 2 evaluations answered in this run, the site's max_evaluations_per_run is 2")
    _metrics(real_site.evaluate(weights=weights))  # a request already answered costs nothing
    _metrics(real_site.evaluate(weights=weights, run_name="s"))
    assert _refusal(real_site.evaluate(weights=_shifted(weights, 1e-3), run_name="s")) == (
        "evaluation-budget: 3 evaluations answered over all runs, the site's max_evaluations_lifetime is 3")
    assert (_record(real_site)["count"], _record(real_site, "s")["count"]) == (2, 1)


def test_the_clinical_settings_are_fixed_for_the_run(real_site) -> None:
    weights = real_site.weights(real_site.run_config())
    _metrics(real_site.evaluate("clinical.threshold=0.5", weights=weights))
    assert _refusal(real_site.evaluate("clinical.threshold=0.45", weights=_shifted(weights, 1e-3))) == (
        "evaluation-settings: this run was first evaluated with other threshold; "
        "a site fixes its clinical settings for the whole run")
    assert _metrics(real_site.evaluate("clinical.threshold=0.45", weights=weights, run_name="s"))["threshold"] == 0.45


def test_the_coordinator_pools_only_what_sites_sent() -> None:
    from server.fairness import fairness_summary

    full = {"num-examples": 40.0, **_released(10, 10, 10, 10)}
    suppressed = {"num-examples": 40.0, **_released(11, 9, 9, 11)}  # no table, no rates
    summary = fairness_summary({"a": full, "b": suppressed}, confidence=0.95, bins=10)
    pooled = summary["pooled"]
    assert (pooled["n"], pooled["n-pos"], pooled["sensitivity"]["value"]) == (80, 40, 0.5)  # site a's 10 of 20
    assert pooled["sensitivity"]["note"] == "1 of 2 sites did not report it"
    assert pooled["roc-auc"]["value"] == pytest.approx((0.5 + 0.55) / 2)
    assert all(math.isnan(v) for v in summary["sites"]["b"]["counts"].values())


def test_the_test_patients_are_fixed_for_the_run(real_site) -> None:
    # a test split a few patients larger would make the difference of two replies describe those few
    weights = real_site.weights(real_site.run_config())
    _metrics(real_site.evaluate(weights=weights))
    assert _refusal(real_site.evaluate("data.num_samples=170", weights=weights)) == (
        "evaluation-settings: this run was first evaluated with other data; "
        "a site fixes its clinical settings for the whole run")
