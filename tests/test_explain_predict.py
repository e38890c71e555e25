"""End of a real tiny run: exported model, model card, clinical report, predict, explain, Grad-CAM gallery."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from typer.testing import CliRunner

from federation.config import load_config
from federation.data import describe_sites
from federation.data.dicom import load_site_sample_set, make_demo_site
from federation.inference import GradCamExplainer, Preprocessing, load_inputs, load_run_model
from federation.models import build_model
from federation.training import evaluate
from server.run_dir import read_jsonl
from simulations.cli import app
from simulations.gallery import pick_examples, write_gallery
from simulations.harness import resolve_config, simulate

pytestmark = pytest.mark.integration
runner = CliRunner()

TINY = ["data.num_sites=2", "data.num_samples=120", "model.width=4", "train.batch_size=16", "strategy.min_sites=2",
        "server.rounds=1", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return simulate(resolve_config(overrides=[*TINY, f"server.out_dir={out}", "server.run_name=tiny"]))


def _training_model(run: Path) -> torch.nn.Module:
    """The global model as training built it: the run's config and its last checkpoint."""
    config = load_config(run / "config.yaml")
    model = build_model(config.model, in_channels=1, num_classes=2, dp=config.privacy.enabled)
    model.load_state_dict(torch.load(run / "checkpoints" / "round-0001.pt", weights_only=False)["weights"])
    return model.eval()


def test_sites_send_clinical_metrics_through_the_guard(run_dir: Path) -> None:
    rows = [r for r in read_jsonl(run_dir / "sites.jsonl") if r["phase"] == "evaluate"]
    assert sorted(r["site"] for r in rows) == ["site-1", "site-2"]
    for row in rows:
        m = row["metrics"]
        assert m["roc-auc"] == pytest.approx(m["auc"])  # binary task: the same AUC
        assert m["roc-auc-lo"] <= m["roc-auc"] <= m["roc-auc-hi"]
        assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["num-examples"] and m["roc-tpr-20"] == 1.0
        assert not [k for k in m if k.startswith("grp-")]  # synthetic data carries no subgroups


def test_model_card_is_filled_from_the_run(run_dir: Path) -> None:
    card = json.loads((run_dir / "model_card.json").read_text())
    config = load_config(run_dir / "config.yaml")
    assert "NOT FOR CLINICAL USE" in card["notice"] and card["intended_use"]
    assert card["task"] == {"dataset": "synthetic", "kind": "classification", "labels": ["no lesion", "lesion"],
                            "num_classes": 2, "positive_class": 1, "threshold": 0.5}
    shares = {s["name"]: (s["n_train"], s["n_test"]) for s in describe_sites(config.data, seed=config.seed)}
    assert {s["name"]: (s["train_examples"], s["test_examples"]) for s in card["sites"]} == shares
    assert card["rounds"] == {"planned": 1, "completed": 1, "aggregated": 1}
    assert card["strategy"]["name"] == "fedavg" and card["strategy"]["min_sites"] == 2
    privacy = {r["site"]: r["epsilon"] for r in read_jsonl(run_dir / "privacy.jsonl")}
    assert {s: v["epsilon"] for s, v in card["privacy"]["final_per_site"].items()} == privacy
    assert card["privacy"]["noise_multiplier"] == 1.0
    site1 = card["metrics"]["per_site"]["site-1"]["rates"]["roc-auc"]
    assert site1["lo"] <= site1["value"] <= site1["hi"]
    assert card["architecture"]["name"] == "cnn" and card["architecture"]["input"] == ["N", 1, 28, 28]
    assert card["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert card["software"]["versions"]["torch"] == torch.__version__
    assert "git_commit" in card["software"] and card["dataset_checksums"]["md5"] is None  # generated data
    markdown = (run_dir / "model_card.md").read_text()
    assert "NOT FOR CLINICAL USE" in markdown and "site-1" in markdown and "```yaml" in markdown
    report = (run_dir / "clinical" / "report.md").read_text()
    assert "| site-1 | 1 |" in report and (run_dir / "clinical" / "roc.png").is_file()


def test_exported_program_loads_without_medfed_and_matches_training(run_dir: Path, tmp_path: Path) -> None:
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy, torch; "
        f"m = torch.export.load({str(run_dir / 'export' / 'model.pt2')!r}).module(); "
        f"p = m(torch.from_numpy(numpy.load({str(tmp_path / 'x.npy')!r}))); "
        f"numpy.save({str(tmp_path / 'p.npy')!r}, p.detach().numpy()); "
        "bad = [k for k in sys.modules if k.split('.')[0] in ('federation', 'monai', 'client', 'server', 'opacus')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=300)
    with torch.no_grad():
        expected = torch.softmax(_training_model(run_dir)(x), dim=1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, atol=1e-5)


def _dicom_site(tmp_path: Path, shared_data_dir: Path) -> Path:
    """The two shared DICOM test files plus a labels.csv: a site folder the dataset path can read."""
    site = tmp_path / "dcm"
    site.mkdir()
    rows = []
    for i, name in enumerate(("CT_small.dcm", "MR_small.dcm")):
        shutil.copy(shared_data_dir / name, site / name)
        rows.append((str(pydicom.dcmread(site / name, stop_before_pixels=True).SOPInstanceUID), i))
    with open(site / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("sop_instance_uid", "label"), *rows])
    return site


def test_predict_matches_the_dataset_path(run_dir: Path, tmp_path: Path, shared_data_dir: Path) -> None:
    demo = make_demo_site(source="pneumoniamnist", data_dir_of_npz=shared_data_dir, out_dir=tmp_path / "demo",
                          count=6, seed=1)
    model = _training_model(run_dir)
    for site in (_dicom_site(tmp_path, shared_data_dir), demo):
        out = tmp_path / f"{site.name}.csv"
        result = runner.invoke(app, ["predict", "--model", str(run_dir), "--input", str(site), "--out", str(out)])
        assert result.exit_code == 0, result.output
        with open(out, newline="") as handle:
            predicted = {row["input"]: float(row["p_lesion"]) for row in csv.DictReader(handle)}
        # the dataset path: how a site reads its DICOM folder for training and evaluation
        samples = load_site_sample_set(site, image_size=28)
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(samples.images), torch.from_numpy(samples.labels))
        probs = evaluate(model=model, dataset=dataset).probs[:, 1]
        assert sorted(predicted) == sorted(samples.paths)
        np.testing.assert_allclose([predicted[p] for p in samples.paths], probs, atol=1e-5)


def test_grad_cam_maps_and_explain_command(run_dir: Path, tmp_path: Path, shared_data_dir: Path) -> None:
    model, meta = load_run_model(run_dir)
    items = load_inputs(_dicom_site(tmp_path, shared_data_dir), Preprocessing.from_dict(meta["preprocessing"]))
    maps = GradCamExplainer(model)(np.stack([i.image for i in items]), class_index=1)
    assert maps.shape == (2, 28, 28)  # the input's spatial size
    assert all(m.std() > 1e-3 for m in maps) and maps.min() >= 0.0 and maps.max() <= 1.0
    result = runner.invoke(app, ["explain", "--model", str(run_dir), "--input", str(tmp_path / "dcm"),
                                 "--out", str(tmp_path / "cams")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "cams").glob("*.png")) == ["CT_small.dcm.png", "MR_small.dcm.png"]
    assert "CT_small.dcm" in (tmp_path / "cams" / "predictions.csv").read_text()


def test_simulation_gallery_lands_in_the_report(run_dir: Path) -> None:
    assert pick_examples(np.array([1, 1, 0, 0]), np.array([0.9, 0.2, 0.7, 0.1]), threshold=0.5) == {
        "TP": 0, "FP": 2, "TN": 3, "FN": 1}
    written = write_gallery(run_dir)
    assert [p.name for p in written] == ["site-1.png", "site-2.png"]
    report = (run_dir / "clinical" / "report.md").read_text()
    assert "Grad-CAM gallery (simulation only)" in report and "gallery/site-2.png" in report
