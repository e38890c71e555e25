"""Segmentation as a task: registry, data, UNet under DP, site metrics and the guard, one federated round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.clinical_guard import case_count_problems
from client.guard import EVALUATE_METRICS, OutboundViolation, check_reply, evaluate_metrics
from federation.config import ConfigError, load_config
from federation.data import load_central_test, load_dataset, load_site_data
from federation.metrics.segmentation import case_metrics, segmentation_metric_names, site_segmentation_metrics
from federation.models import build_model
from federation.tasks import available_tasks, get_task, headline_metric

F64 = torch.float64


def _seg_config(*overrides: str):
    return load_config(None, ["data.dataset=synthetic_seg", "data.task=segmentation", "data.num_samples=60",
                              "data.image_size=16", "model.name=unet", "model.width=4", *overrides])


def test_task_registry_lists_valid_names_on_a_bad_one() -> None:
    assert available_tasks() == ["classification", "segmentation"]
    assert (headline_metric("classification"), headline_metric("segmentation")) == ("auc", "dice")
    with pytest.raises(ValueError, match="unknown task 'detect'.*available: classification, segmentation"):
        get_task("detect")
    with pytest.raises(ConfigError, match="data.task.*available: classification, segmentation"):
        load_config(None, ["data.task=detect"])


def test_validate_names_dataset_and_model_that_do_not_serve_the_task() -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(app, ["validate", "-c", "synthetic", "--set", "data.task=segmentation"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "2 problem(s)" in output
    assert ("data.dataset='synthetic' serves data.task classification; got data.task='segmentation' "
            "(datasets for segmentation: dicom_seg, msd_hippocampus, nifti, synthetic_seg)") in output
    assert ("model.name='cnn' serves data.task classification; got data.task='segmentation' "
            "(models for segmentation: basic_unet, segresnet, unet)") in output
    result = CliRunner().invoke(app, ["validate", "-c", "synthetic_seg", "--set", "data.task=classification"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "data.dataset='synthetic_seg' serves data.task segmentation; " in output
    assert "model.name='unet' serves data.task segmentation; got data.task='classification'" in output


def test_dataset_and_model_refuse_a_task_they_do_not_serve() -> None:
    with pytest.raises(ValueError, match="data.dataset='synthetic_seg' serves data.task segmentation; "
                       "got data.task='classification'"):
        load_dataset(_seg_config("data.task=classification").data, seed=0)
    config = _seg_config()
    with pytest.raises(ConfigError, match="'cnn' does not serve data.task='segmentation'; "
                       "models that do: basic_unet, segresnet, unet"):
        build_model(config.model.model_copy(update={"name": "cnn"}), in_channels=1, num_classes=2, dp=False,
                    task="segmentation")


def test_synthetic_seg_sites_hold_masks_of_the_synthetic_images() -> None:
    config = _seg_config()
    splits = load_dataset(config.data, seed=0)
    plain = load_dataset(config.data.model_copy(update={"dataset": "synthetic", "task": "classification"}), seed=0)
    np.testing.assert_array_equal(splits.train_images, plain.train_images)  # one generator, both tasks
    assert splits.train_masks.shape == (48, 1, 16, 16) and splits.train_masks.dtype == np.uint8
    assert set(np.unique(splits.train_masks)) == {0, 1}
    lesion = splits.train_masks.reshape(48, -1).any(axis=1)
    np.testing.assert_array_equal(lesion, splits.train_labels == 1)  # the stratum: a lesion is present
    site = load_site_data(config.data, seed=0, site_index=1)
    image, target = site.train[0]
    assert image.shape == (1, 16, 16) and target.shape == (16, 16) and target.dtype == torch.uint8
    assert load_central_test(config.data, seed=0).tensors[1].shape == (12, 16, 16)


def test_per_sample_loss_averages_to_monai_dice_ce_and_classification_is_unchanged() -> None:
    torch.manual_seed(0)
    seg = get_task("segmentation")
    logits, masks = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 8, 8))
    torch.testing.assert_close(seg.per_sample_loss(logits, masks).mean(), seg.loss(logits, masks))
    cls = get_task("classification")
    scores, labels = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    assert torch.equal(cls.loss(scores, labels), F.cross_entropy(scores, labels))
    assert torch.equal(cls.per_sample_loss(scores, labels), F.cross_entropy(scores, labels, reduction="none"))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_ghost_clipping_equals_opacus_per_sample_gradients(spatial_dims: int) -> None:
    """The UNet uses only layers medfed's fast clipping covers (no transposed convolution); norms and clipped sum equal Opacus' hooks."""
    from seg_clipping import assert_clipping_matches_opacus

    torch.manual_seed(0)
    model = build_model(_seg_config().model, in_channels=1, num_classes=3, spatial_dims=spatial_dims, dp=True,
                        task="segmentation").to(F64)
    shape = (4, 1, *((8,) * spatial_dims))
    x, y = torch.randn(shape, dtype=F64), torch.randint(0, 3, (4, *shape[2:]))
    assert_clipping_matches_opacus(model, x, y)


def test_site_metrics_are_exact_on_a_hand_made_case_and_suppress_small_counts() -> None:
    truth = np.zeros((6, 10, 10), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[:, 2:6, 2:6] = 1  # 16 px of class 1 in every case
    pred[:, 2:6, 2:4] = 1   # 8 of them found: Dice 2*8/(16+8) = 2/3, volume -50 %
    truth[0, 8, 8] = pred[0, 8, 8] = 2  # class 2 in one case only
    cases = case_metrics(pred=pred, truth=truth, num_classes=3)
    np.testing.assert_allclose(cases.dice[:, 0], 2 / 3)
    np.testing.assert_allclose(cases.voldiff[:, 0], -0.5)
    np.testing.assert_allclose(cases.hd95[:, 0], 2.0)  # the missed columns lie 2 px from the prediction
    metrics = site_segmentation_metrics(cases)
    assert metrics["dice-1"] == pytest.approx(2 / 3) and metrics["dice-1-n"] == 6
    assert metrics["dice-1-lo"] == pytest.approx(2 / 3) and metrics["dice-1-hi"] == pytest.approx(2 / 3)
    assert (metrics["voldiff-1"], metrics["voldiff-1-abs"], metrics["hd95-1"]) == pytest.approx((-0.5, 0.5, 2.0))
    assert metrics["dice-2-n"] == 1 and "dice-2" not in metrics and "hd95-2" not in metrics  # 1 case: counts only
    assert metrics["dice-n"] == 6  # mean over the classes each case holds: case 0 (2/3 + 1) / 2
    assert metrics["dice"] == pytest.approx((5 * 2 / 3 + (2 / 3 + 1) / 2) / 6)
    assert set(metrics) <= segmentation_metric_names() == evaluate_metrics("segmentation")
    assert case_count_problems(metrics) == []


def test_guard_refuses_segmentation_statistics_of_fewer_than_five_cases() -> None:
    from flwr.app import MetricRecord, RecordDict

    assert evaluate_metrics("classification") == EVALUATE_METRICS
    allowed = evaluate_metrics("segmentation")
    check_reply(RecordDict({"metrics": MetricRecord({"dice-1": 0.8, "dice-1-n": 5.0})}), allowed_metrics=allowed)
    for bad in ({"dice-1": 0.8, "dice-1-n": 4.0}, {"hd95-2": 3.0, "hd95-2-n": 2.0, "dice-2-n": 9.0},
                {"dice": 0.7, "dice-n": 3.0}, {"voldiff-1": 0.1}):
        with pytest.raises(OutboundViolation, match="cases"):
            check_reply(RecordDict({"metrics": MetricRecord(bad)}), allowed_metrics=allowed)
    with pytest.raises(OutboundViolation, match="non-whitelisted"):
        check_reply(RecordDict({"metrics": MetricRecord({"dice-1-case-3": 0.8})}), allowed_metrics=allowed)


@pytest.mark.integration
def test_one_round_synthetic_seg_federation_writes_dice(tmp_path: Path) -> None:
    from simulations.harness import PRESETS_DIR, resolve_config, simulate

    config = resolve_config(config_path=str(PRESETS_DIR / "synthetic_seg.yaml"), overrides=[
        "data.num_sites=2", "data.num_samples=80", "data.image_size=16", "model.width=4", "server.rounds=1",
        f"server.out_dir={tmp_path}", "server.run_name=seg"])
    run_dir = simulate(config)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["rounds_completed"] == 1
    final = summary["final_global"]
    assert 0.0 <= final["dice"] <= 1.0 and final["dice"] == final["dice-1"] and math.isfinite(final["loss"])
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]  # the initial model is evaluated too
    assert summary["best_global_dice"] == max(r["global"]["dice"] for r in rounds)
    outputs = json.loads((run_dir / "outputs.json").read_text())
    for name in ("clinical report", "model card", "exported model"):  # segmentation versions, medfed predict's model
        assert outputs[name]["ok"] and "skipped" not in outputs[name], name
    assert json.loads((run_dir / "export" / "model.json").read_text())["task"] == "segmentation"
    report = (run_dir / "clinical" / "report.md").read_text()
    assert "| site | round | cases | mean Dice [95% CI] | lesion Dice |" in report
    from server.run_outputs import RunOutputs
    from simulations.clinical_cli import simulation_gallery  # simulation only: contours of each site's test cases

    assert [p.name for p in simulation_gallery(run_dir, RunOutputs.load(run_dir))] == ["site-1.png", "site-2.png"]
    recorded = RunOutputs.load(run_dir).written()  # outputs.json names it as what it is
    assert [p.name for p in recorded["contour gallery"]] == ["site-1.png", "site-2.png"]
    assert "Grad-CAM gallery" not in recorded
    from simulations.research_report import write_run_report  # ranked by Dice, as the baselines are

    research = write_run_report(run_dir).read_text()
    sent = {row["site"]: row["metrics"] for row in map(json.loads, (run_dir / "sites.jsonl").read_text().splitlines())
            if row["phase"] == "evaluate" and row["round"] == 1}
    assert "| site | test Dice | test loss | epsilon spent |" in research
    shown = [site for site in ("site-1", "site-2") if "dice" in sent[site]]  # under 5 cases a site withholds Dice
    assert shown and all(f"| {site} | {sent[site]['dice']:.3f} |" in research for site in shown)
    assert f"after round 1: Dice {final['dice']:.3f}, loss {final['loss']:.3f}; best Dice" in research
    assert "## Contour gallery (simulation only)" in (run_dir / "clinical" / "report.md").read_text()
    evaluated = [row for row in map(json.loads, (run_dir / "sites.jsonl").read_text().splitlines())
                 if row["phase"] == "evaluate"]
    assert {row["site"] for row in evaluated} == {"site-1", "site-2"}
    assert all(set(row["metrics"]) <= segmentation_metric_names() for row in evaluated)


def test_msd_hippocampus_loader_on_three_cases(tmp_path: Path) -> None:
    from federation.data.nifti import DEFAULT_VOLUME_SHAPE
    from federation.data.paths import resolve_data_dir

    source = resolve_data_dir("") / "msd_hippocampus"
    if not (source / "dataset.json").is_file():
        pytest.skip("MSD hippocampus is not in the data dir")
    index = json.loads((source / "dataset.json").read_text())
    folder = tmp_path / "msd_hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for case in index["training"][:3]:
        for key in ("image", "label"):
            (folder / case[key]).symlink_to(source / case[key])
    (folder / "dataset.json").write_text(json.dumps({**index, "training": index["training"][:3]}))
    config = load_config(None, ["data.dataset=msd_hippocampus", "data.task=segmentation", f"data.data_dir={tmp_path}",
                                "data.nifti_test_fraction=0.3"])
    splits = load_dataset(config.data, seed=0)
    assert splits.train_images.shape == (2, 1, *DEFAULT_VOLUME_SHAPE) and splits.test_images.shape[0] == 1
    assert splits.train_masks.shape == splits.train_images.shape and splits.spatial_dims == 3
    assert splits.label_names == ("background", "anterior", "posterior")
    assert set(np.unique(splits.train_masks)) == {0, 1, 2} and list(splits.train_labels) == [2, 2]
    for volume in splits.train_images:  # scaled per volume to [0, 1]
        assert volume.min() == 0.0 and volume.max() == 1.0


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _nifti_folder(tmp_path: Path) -> None:
    """Three good cases and one of each kind of bad one."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    label = np.zeros((10, 12, 8), np.uint8)
    label[3:6, 4:8, 2:5] = 1
    label[6:8, 4:8, 2:5] = 2
    for case in ("good1", "good2", "good3", "shape", "affine", "outside", "empty", "nolabel"):
        _nifti(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", rng.normal(size=(10, 12, 8)).astype(np.float32))
    for case in ("good1", "good2", "good3"):
        _nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", label)
    _nifti(tmp_path / "labelsTr" / "shape.nii.gz", label[:9])
    _nifti(tmp_path / "labelsTr" / "affine.nii.gz", label, affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    _nifti(tmp_path / "labelsTr" / "outside.nii.gz", np.where(label == 2, 5, label).astype(np.uint8))
    _nifti(tmp_path / "labelsTr" / "empty.nii.gz", np.zeros_like(label))
    (tmp_path / "imagesTr" / "broken_0000.nii.gz").write_bytes(b"not a nifti file")
    (tmp_path / "labelsTr" / "broken.nii.gz").write_bytes(b"not a nifti file")


def test_nifti_folder_checks_set_bad_cases_aside_and_keep_the_rest(tmp_path: Path) -> None:
    from federation.data.nifti import check_nifti_cases, folder_cases, load_nifti_folder

    _nifti_folder(tmp_path)
    cases = check_nifti_cases(folder_cases(tmp_path), num_classes=3, shape=(8, 8, 8))
    assert cases.names == ["good1", "good2", "good3"]
    assert cases.set_aside.pop("broken").startswith("unreadable (")  # the reader's exception type
    assert cases.set_aside == {
        "affine": "image and label affines differ (not on the same voxel grid)",
        "empty": "empty label (no foreground voxel)",
        "nolabel": "no label file nolabel.nii.gz in labelsTr",
        "outside": "label values [5.0] are outside the declared classes 0..2",
        "shape": "image shape (10, 12, 8) differs from label shape (9, 12, 8)",
    }
    assert cases.images[0].shape == (1, 8, 8, 8) and cases.masks[0].dtype == np.uint8
    config = load_config(None, ["data.dataset=nifti", "data.task=segmentation", "data.nifti_label_names=bg,a,b",
                                "data.volume_shape=8,8,8"])
    splits = load_nifti_folder(config=config.data, data_dir=tmp_path, seed=0)
    assert (len(splits.train_labels), len(splits.test_labels)) == (2, 1)
    assert splits.label_names == ("bg", "a", "b") and splits.num_classes == 3


def test_dp_sgd_trains_a_unet_with_per_image_clipping_and_accounts_every_step() -> None:
    from federation.privacy import SitePrivacy
    from federation.training import train_local

    config = _seg_config("privacy.enabled=true", "data.num_samples=40", "train.batch_size=8", "train.optimizer=sgd",
                         "train.lr=0.1", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000")
    site = load_site_data(config.data, seed=0, site_index=0)
    torch.manual_seed(0)
    model = build_model(config.model, in_channels=1, num_classes=2, spatial_dims=2, dp=True, task="segmentation")
    before = [p.detach().clone() for p in model.parameters()]
    privacy = SitePrivacy(config=config.privacy, num_examples=len(site.train), batch_size=8, local_epochs=1,
                          planned_rounds=1)
    result = train_local(model=model, dataset=site.train, config=config.train, privacy=privacy, seed=0,
                         task="segmentation", noise_source="seeded")
    assert result.steps == privacy.steps_per_round == privacy.total_steps and result.epsilon > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_norm_sample") for p in model.parameters())


def test_site_check_reports_a_nifti_folder_case_by_case(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    _nifti_folder(tmp_path)
    result = CliRunner().invoke(app, ["site", "check", str(tmp_path), "--label-names", "bg,a,b",
                                      "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert "NIfTI cases usable: 3; set aside: 6; classes: 0 bg, 1 a, 2 b" in result.output
    assert "set aside empty: empty label (no foreground voxel)" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["usable"] == ["good1", "good2", "good3"] and len(report["set_aside"]) == 6
    result = CliRunner().invoke(app, ["site", "check", str(tmp_path)])  # no classes declared, no dataset.json
    assert result.exit_code == 2 and "nifti_label_names" in result.output


def test_a_cases_csv_is_a_nifti_site_checked_like_the_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from federation.data.nifti import load_nifti_folder
    from simulations.cli import app

    (tmp_path / "site").mkdir()
    _nifti_folder(tmp_path / "site")
    rows = ["image,label,case", "imagesTr/good1_0000.nii.gz,labelsTr/good1.nii.gz,p1",
            f"{tmp_path / 'site' / 'imagesTr' / 'good2_0000.nii.gz'},labelsTr/good2.nii.gz,p2",  # absolute
            "imagesTr/good3_0000.nii.gz,labelsTr/good3.nii.gz,", "imagesTr/empty_0000.nii.gz,labelsTr/empty.nii.gz,e",
            "imagesTr/shape_0000.nii.gz,,unlabelled", "imagesTr/gone.nii.gz,labelsTr/good1.nii.gz,gone"]
    (tmp_path / "site" / "cases.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "csv_site").mkdir()
    (tmp_path / "csv_site" / "cases.csv").write_text((tmp_path / "site" / "cases.csv").read_text().replace(
        "imagesTr/", "../site/imagesTr/").replace("labelsTr/", "../site/labelsTr/"))
    expected_aside = {"e": "empty label (no foreground voxel)", "unlabelled": "no label listed",
                      "gone": f"no image file {tmp_path / 'site' / 'imagesTr' / 'gone.nii.gz'}"}
    for target in (tmp_path / "csv_site", tmp_path / "site" / "cases.csv"):  # a folder with cases.csv, the CSV
        result = CliRunner().invoke(app, ["site", "check", str(target), "--label-names", "bg,a,b",
                                          "--json", str(tmp_path / "report.json")])
        assert result.exit_code == 0, result.output
        assert "NIfTI cases usable: 3; set aside: 3; classes: 0 bg, 1 a, 2 b" in result.output
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["usable"] == ["p1", "p2", "good3_0000"]
        assert report["set_aside"] == {k: v.replace("/site/", "/csv_site/../site/") if target.is_dir() else v
                                       for k, v in expected_aside.items()}
    config = load_config(None, ["data.dataset=nifti", "data.task=segmentation", "data.nifti_label_names=bg,a,b",
                                "data.volume_shape=8,8,8"])
    splits = load_nifti_folder(config=config.data, data_dir=tmp_path / "csv_site", seed=0)
    assert (len(splits.train_labels), len(splits.test_labels)) == (2, 1)
    (tmp_path / "bad.csv").write_text("img,label\nx.nii.gz,y.nii.gz\n")
    result = CliRunner().invoke(app, ["site", "check", str(tmp_path / "bad.csv"), "--label-names", "bg,a"])
    output = " ".join(result.output.split())  # rich wraps long paths
    assert result.exit_code == 2
    assert "bad.csv: no column image (expected columns image,label[,case]; found img, label)" in output
