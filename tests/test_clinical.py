"""Clinical metrics at the site: intervals, calibration, ROC grid, subgroup suppression, the guard, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from client.guard import EVALUATE_METRICS, OutboundViolation, check_reply
from federation.config import load_config, to_yaml
from federation.data import load_site_data
from federation.data.dicom import SEX_CODES, load_site_sample_set, make_demo_site
from federation.data.dicom.index import patient_age_years
from federation.metrics import (
    ClinicalSettings,
    brier_score,
    clinical_metrics,
    delong_auc_interval,
    expected_calibration_error,
    reliability_bins,
    site_metric_names,
    wilson_interval,
)
from federation.metrics.clinical import age_band_labels, released_subgroups, roc_grid
from federation.metrics.disclosure import release_metrics
from federation.metrics.intervals import delong_placements
from server.clinical_report import write_clinical_report
from server.fairness import fairness_summary


def _probs(p_positive: np.ndarray) -> np.ndarray:
    p = np.asarray(p_positive, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1)


# -- intervals ----------------------------------------------------------------------
def test_wilson_interval_matches_the_closed_form() -> None:
    # (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964
    assert wilson_interval(8, 10) == pytest.approx((0.490162, 0.943318), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert wilson_interval(8, 10, confidence=0.9)[0] > 0.490162  # narrower at 90 %
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes <= total"):
        wilson_interval(11, 10)


def test_delong_interval_on_a_hand_computed_example() -> None:
    # positives 0.9, 0.8, 0.4; negatives 0.7, 0.3 -> V10 = [1, 1, .5], V01 = [2/3, 1]
    labels, scores = np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.8, 0.4, 0.7, 0.3])
    v10, v01 = delong_placements(labels, scores)
    np.testing.assert_allclose(v10, [1.0, 1.0, 0.5])
    np.testing.assert_allclose(v01, [2 / 3, 1.0])
    ci = delong_auc_interval(labels, scores)
    # Var = S10/m + S01/n = (1/12)/3 + (1/18)/2 = 1/18
    assert ci.auc == pytest.approx(5 / 6)
    assert ci.se == pytest.approx(math.sqrt(1 / 18))
    assert ci.low == pytest.approx(5 / 6 - 1.959964 * math.sqrt(1 / 18), abs=1e-6)
    assert ci.high == 1.0  # clipped


def test_delong_matches_brute_force_and_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 80)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pair = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = pair.mean(axis=1), pair.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    ci = delong_auc_interval(labels, scores)
    assert ci.auc == pytest.approx(roc_auc_score(labels, scores))
    assert ci.se == pytest.approx(se)


def test_delong_undefined_cases() -> None:
    one_class = delong_auc_interval(np.ones(5), np.linspace(0, 1, 5))
    assert math.isnan(one_class.auc) and math.isnan(one_class.low)
    single_positive = delong_auc_interval(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2]))
    assert single_positive.auc == 1.0 and math.isnan(single_positive.low)


# -- calibration --------------------------------------------------------------------
def test_reliability_bins_match_sklearn_and_ece_is_exact() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=300)
    y = (rng.uniform(size=300) < p**1.5).astype(int)
    bins = reliability_bins(y, p, num_bins=10)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    full = bins.counts > 0
    np.testing.assert_allclose(bins.observed_rate[full], prob_true)
    np.testing.assert_allclose(bins.mean_predicted[full], prob_pred)
    assert bins.counts.sum() == 300

    # an edge value falls in the lower bin (as in sklearn): 0.1 -> bin 0, 0.9 -> bin 8
    # bin 0: conf .1, obs .5 (2 samples); bin 8: conf .9, obs 1 (2 samples) -> ECE = .5*.4 + .5*.1
    small = reliability_bins(np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9]), num_bins=10)
    assert small.counts.tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 2, 0]
    assert small.observed_rate[0] == 0.5 and small.mean_predicted[8] == pytest.approx(0.9)
    assert expected_calibration_error(small) == pytest.approx(0.25)
    assert brier_score(np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9])) == pytest.approx(0.21)


def test_roc_grid_keeps_the_best_tpr_at_each_fpr() -> None:
    grid = roc_grid(np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.8, 0.4, 0.7, 0.3]))
    assert grid.shape == (21,)
    assert grid[0] == pytest.approx(2 / 3) and grid[9] == pytest.approx(2 / 3)  # FPR 0 and 0.45
    assert grid[10] == 1.0 and grid[20] == 1.0  # FPR 0.5 and 1
    assert np.isnan(roc_grid(np.zeros(4), np.linspace(0, 1, 4))).all()


# -- the site's clinical metrics ------------------------------------------------------
def test_operating_point_metrics_on_constructed_predictions() -> None:
    # 6 positives (4 at/above the threshold 0.6), 4 negatives (1 above)
    y = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.95, 0.8, 0.6, 0.7, 0.3, 0.2, 0.65, 0.1, 0.2, 0.3])
    m = clinical_metrics(labels=y, probs=_probs(p), settings=ClinicalSettings(threshold=0.6))
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n-pos"]) == (4, 2, 1, 3, 6)
    assert m["sensitivity"] == pytest.approx(4 / 6) and m["specificity"] == pytest.approx(3 / 4)
    assert (m["sensitivity-lo"], m["sensitivity-hi"]) == pytest.approx(wilson_interval(4, 6))
    assert m["op-accuracy"] == pytest.approx(0.7) and m["ppv"] == pytest.approx(0.8)
    assert m["roc-auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["threshold"] == 0.6
    assert set(m) <= site_metric_names()
    # bins below min_group_size send only their count
    assert m["rel-bin-02-n"] == 2 and "rel-bin-02-conf" not in m  # the two 0.3s


def test_multiclass_uses_the_configured_positive_class() -> None:
    probs = np.array([[0.2, 0.1, 0.7], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    m = clinical_metrics(labels=np.array([2, 0, 2, 1]), probs=probs, settings=ClinicalSettings(positive_class=2))
    assert m["roc-auc"] == 1.0 and m["sensitivity"] == 1.0 and m["n-pos"] == 2
    with pytest.raises(ValueError, match="clinical.positive_class=3 but the model has 3 classes"):
        clinical_metrics(labels=np.zeros(4), probs=probs, settings=ClinicalSettings(positive_class=3))


def _grouped(sex: list[int], age: list[int] | None = None, min_size: int = 10) -> dict[str, float]:
    n = len(sex)
    rng = np.random.default_rng(1)
    groups = {"sex": np.array(sex)}
    if age is not None:
        groups["age"] = np.array(age)
    return clinical_metrics(labels=rng.integers(0, 2, n), probs=_probs(rng.uniform(size=n)),
                            settings=ClinicalSettings(min_group_size=min_size), groups=groups)


def test_small_subgroups_are_not_sent_at_all() -> None:
    f, m, unknown = SEX_CODES["F"], SEX_CODES["M"], -1
    # 25 F, 8 M (< 10: suppressed), 7 unknown; the 15 hidden samples are enough to hide the 8 M
    metrics = _grouped([f] * 25 + [m] * 8 + [unknown] * 7)
    assert metrics["grp-sex-f-n"] == 25
    assert not [k for k in metrics if k.startswith(("grp-sex-m", "grp-sex-o"))]
    # 25 F, 12 M, 3 unknown: the 3 unknowns could be derived from the totals -> the smallest group goes too
    metrics = _grouped([f] * 25 + [m] * 12 + [unknown] * 3)
    assert [k for k in metrics if k.endswith("-n") and k.startswith("grp-")] == ["grp-sex-f-n"]
    # 30 F, 10 M, nothing unknown: both released, with every per-group metric
    metrics = _grouped([f] * 30 + [m] * 10)
    assert metrics["grp-sex-m-n"] == 10 and "grp-sex-m-sensitivity-lo" in metrics and "grp-sex-m-ece" in metrics
    assert set(metrics) <= site_metric_names()


def test_age_bands_and_secondary_suppression() -> None:
    assert age_band_labels((18, 40, 65)) == ["0-17", "18-39", "40-64", "65+"]
    ages = [5] * 12 + [30] * 15 + [50] * 20 + [70] * 3
    metrics = _grouped([0] * 50, age=ages)
    # 70-year-olds (3) suppressed; hidden 3 < 10 -> the smallest released band (0-17, 12) suppressed too
    assert sorted(k for k in metrics if k.startswith("grp-age") and k.endswith("-n")) == ["grp-age-1-n", "grp-age-2-n"]
    assert released_subgroups({"a": 12, "b": 15, "c": 20, "d": 3}, total=50, min_size=10) == ["b", "c"]
    assert released_subgroups({"a": 9}, total=9, min_size=10) == []


# -- the outbound guard -------------------------------------------------------------
def _reply(metrics: dict[str, float]) -> RecordDict:
    return RecordDict({"site": ConfigRecord({"name": "site-1"}), "metrics": MetricRecord(metrics)})


def test_guard_lets_clinical_metrics_out_but_not_small_or_unknown_groups() -> None:
    released = release_metrics(_grouped([0] * 30 + [1] * 10), num_examples=40, min_count=10)
    metrics = {"num-examples": 40.0, **released}
    check_reply(_reply(metrics), allowed_metrics=EVALUATE_METRICS)  # what the site sends after disclosure control
    with pytest.raises(OutboundViolation, match="small groups"):
        check_reply(_reply({**metrics, "grp-sex-m-n": 3.0}), allowed_metrics=EVALUATE_METRICS)
    with pytest.raises(OutboundViolation, match="small groups"):
        check_reply(_reply({"rel-bin-03-n": 2.0, "rel-bin-03-obs": 1.0}), allowed_metrics=EVALUATE_METRICS)
    with pytest.raises(OutboundViolation, match="non-whitelisted \\['grp-race-x-n'\\]"):
        check_reply(_reply({"grp-race-x-n": 50.0}), allowed_metrics=EVALUATE_METRICS)


# -- subgroups from DICOM headers ---------------------------------------------------
def test_patient_age_from_headers() -> None:
    ds = pydicom.Dataset()
    for text, years in (("065Y", 65), ("018M", 1), ("003W", 0), ("400D", 1)):
        ds.PatientAge = text
        assert patient_age_years(ds) == years
    del ds.PatientAge
    ds.PatientBirthDate, ds.StudyDate = "19800615", "20240614"
    assert patient_age_years(ds) == 43
    ds.StudyDate = ""
    assert patient_age_years(ds) == -1


def test_dicom_site_exposes_sex_and_age_per_test_sample(shared_data_dir: Path, tmp_path: Path) -> None:
    site = make_demo_site(source="breastmnist", data_dir_of_npz=shared_data_dir, out_dir=tmp_path / "site",
                          count=40, seed=2)
    samples = load_site_sample_set(site, image_size=28)
    for path, sex, age in zip(samples.paths, samples.sex, samples.age):
        header = pydicom.dcmread(site / path, stop_before_pixels=True)
        assert sex == SEX_CODES[header.PatientSex] and age == int(header.PatientAge[:3])
    config = load_config(None, ["data.dataset=dicom", f"data.data_dir={site}", "data.num_sites=1",
                                "strategy.min_sites=1", "data.dicom_test_fraction=0.5"])
    data = load_site_data(config.data, seed=0, site_index=0, num_sites=1)
    n = len(data.test)
    assert set(data.test_groups) == {"sex", "age"} and data.test_groups["sex"].shape == (n,)
    assert (data.test_groups["sex"] == SEX_CODES["F"]).all()  # breast ultrasound demo: all female
    metrics = clinical_metrics(labels=data.test.tensors[1].numpy(), probs=_probs(np.full(n, 0.5)),
                               settings=ClinicalSettings(min_group_size=5, age_edges=(40, 60)),
                               groups=data.test_groups)
    assert metrics["grp-sex-f-n"] == n and "grp-sex-m-n" not in metrics
    ages = data.test_groups["age"]
    sizes = {f"age-{k}": int(((ages >= lo) & (ages < hi)).sum()) for k, (lo, hi) in enumerate([(0, 40), (40, 60), (60, 200)])}
    released = released_subgroups(sizes, total=n, min_size=5)
    assert released  # 20 test images over three bands
    assert {k: v for k, v in metrics.items() if k.startswith("grp-age") and k.endswith("-n")} == {
        f"grp-{g}-n": float(sizes[g]) for g in released
    }


# -- across sites and the report ---------------------------------------------------
def _site(auc: float, sens: float, spec: float, n: int, pos: int) -> dict[str, float]:
    return {"num-examples": n, "n-pos": pos, "roc-auc": auc, "roc-auc-lo": auc - 0.1, "roc-auc-hi": auc + 0.05,
            "sensitivity": sens, "specificity": spec, "op-accuracy": (sens * pos + spec * (n - pos)) / n,
            "ece": 0.1, **{f"roc-tpr-{k:02d}": min(1.0, k / 10) for k in range(21)}}


def test_fairness_summary_worst_site_spread_and_exact_pooling() -> None:
    sites = {"a": _site(0.9, 0.8, 0.9, 50, 20), "b": _site(0.7, 0.5, 0.75, 30, 10)}
    summary = fairness_summary(sites, confidence=0.95, bins=10)
    auc = summary["across_sites"]["roc-auc"]
    assert auc["worst"] == {"name": "b", "value": 0.7} and auc["spread"] == pytest.approx(0.2)
    pooled = summary["pooled"]
    assert pooled["n"] == 80 and pooled["n-pos"] == 30
    assert pooled["sensitivity"]["value"] == pytest.approx((16 + 5) / 30)  # 0.8*20 + 0.5*10
    assert pooled["specificity"]["value"] == pytest.approx((27 + 15) / 50)
    assert (pooled["sensitivity"]["lo"], pooled["sensitivity"]["hi"]) == pytest.approx(wilson_interval(21, 30))


def test_clinical_report_is_written_from_the_run_directory(tmp_path: Path) -> None:
    config = load_config(None, [f"server.out_dir={tmp_path}"])
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(config))
    rows = [{"round": 1, "site": "site-1", "phase": "evaluate", "metrics": _site(0.6, 0.5, 0.5, 20, 10)},
            {"round": 2, "site": "site-1", "phase": "evaluate", "metrics": _site(0.9, 0.8, 0.9, 50, 20)},
            {"round": 2, "site": "site-2", "phase": "evaluate", "metrics": _site(0.7, 0.5, 0.75, 30, 10)}]
    (run / "sites.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_clinical_report(run)
    text = report.read_text()
    assert "| site-1 | 2 | 50 | 20 | 0.900 [0.800, 0.950]" in text  # the latest round of each site
    assert "| roc-auc | site-2 0.700 | site-1 0.900 | 0.200 |" in text
    assert "not for clinical use" in text and "No subgroup was reported" in text
    for name in ("roc.png", "reliability.png", "site_metrics.png", "fairness.json"):
        assert (run / "clinical" / name).stat().st_size > 0
    assert json.loads((run / "clinical" / "fairness.json").read_text())["across_sites"]["roc-auc"]["spread"] == pytest.approx(0.2)


def test_a_rewritten_report_can_keep_the_plots_it_has(tmp_path: Path) -> None:
    config = load_config(None, [f"server.out_dir={tmp_path}"])
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(config))
    rows = [{"round": 1, "site": "site-1", "phase": "evaluate", "metrics": _site(0.9, 0.8, 0.9, 50, 20)}]
    (run / "sites.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_clinical_report(run)
    clinical = run / "clinical"
    roc = (clinical / "roc.png").stat().st_mtime_ns
    (clinical / "reliability.png").unlink()
    (clinical / "gallery").mkdir()
    (clinical / "gallery" / "index.json").write_text(json.dumps([{"site": "site-1", "file": "site-1.png", "caption": "c"}]))
    text = write_clinical_report(run, redraw_plots=False).read_text()
    assert (clinical / "roc.png").stat().st_mtime_ns == roc  # kept as drawn
    assert (clinical / "reliability.png").stat().st_size > 0  # missing: drawn again
    assert "![roc](roc.png)" in text and "![reliability](reliability.png)" in text and "gallery/site-1.png" in text
    write_clinical_report(run)
    assert (clinical / "roc.png").stat().st_mtime_ns != roc  # by default every plot is drawn again
