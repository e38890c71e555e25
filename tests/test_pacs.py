"""A site's cohort from its PACS and results back into it, against a real Orthanc (tests/orthanc_fixture.py)."""

from __future__ import annotations

import csv
import json
import urllib.error
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from tests.orthanc_fixture import OrthancServer, orthanc  # noqa: F401 - the fixture
from tests.test_dicom_series import write_ct_series

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _client(server: OrthancServer):  # the test's own uploads (a modality sending to the PACS)
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = (server.user, server.password)
    return DICOMwebClient(server.dicomweb_url, session=session)


@pytest.fixture(scope="module")
def pacs(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> dict:
    """Orthanc holding a demo CR/DX cohort (pneumonia demo site) and CT series (2 good, 1 missing a slice)."""
    from federation.data.dicom import make_demo_site

    root = tmp_path_factory.mktemp("modality")
    demo = make_demo_site(source="pneumoniamnist", data_dir_of_npz=shared_data_dir, out_dir=root / "demo",
                          count=24, seed=3)
    ct = {}
    for i, broken in enumerate(({}, {}, {"drop": (2,)})):
        uid, files = write_ct_series(root / f"ct{i}", slices=4, seed=40 + i, patient_id=f"CT-P{i}",
                                     accession=f"CTACC{i}", **broken)
        ct[uid] = files
    files = sorted((demo / "images").rglob("*.dcm")) + [f for fs in ct.values() for f in fs]
    client = _client(orthanc)
    client.store_instances([pydicom.dcmread(f) for f in files])
    demo_rows = list(csv.DictReader(open(demo / "labels.csv", encoding="utf-8")))
    return {"demo": demo, "demo_rows": demo_rows, "ct": ct, "n_instances": len(files)}


def _site_yaml(tmp_path: Path, server: OrthancServer, *, url: str | None = None, password: str | None = None,
               cohort: dict, labels: list[tuple[str, str]], key_column: str) -> Path:
    (tmp_path / "pw").write_text((password or server.password) + "\n", encoding="utf-8")
    (tmp_path / "labels.csv").write_text(
        f"{key_column},label\n" + "".join(f"{k},{v}\n" for k, v in labels), encoding="utf-8")
    config = {"dicomweb_url": url or server.dicomweb_url, "username": server.user,
              "password_file": str(tmp_path / "pw"), "labels": "labels.csv", "key_column": key_column,
              "cohort": cohort}
    path = tmp_path / "site-pacs.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def _ct_yaml(tmp_path: Path, server: OrthancServer, pacs: dict, **kwargs) -> Path:
    labels = [(uid, "b" if i % 2 else "a") for i, uid in enumerate(pacs["ct"])]
    return _site_yaml(tmp_path, server, cohort={"modality": "CT", "body_part": "CHEST",
                                                "study_date_from": "20240101", "series_description": "ax chest.*"},
                      labels=labels, key_column="series_instance_uid", **kwargs)


def test_cohort_query_retrieval_is_checksummed_and_a_rerun_fetches_only_what_changed(
        tmp_path: Path, orthanc: OrthancServer, pacs: dict) -> None:
    from federation.data.dicom.pacs import load_pacs_config, query_cohort, sync_cohort

    config = load_pacs_config(_ct_yaml(tmp_path, orthanc, pacs))
    found = query_cohort(config)
    assert sorted(s.series_instance_uid for s in found) == sorted(pacs["ct"])  # the CR/DX demo is not CT
    assert {s.modality for s in found} == {"CT"} and sorted(s.instances for s in found) == [3, 4, 4]
    first = sync_cohort(config, cache_dir=tmp_path / "cache")
    assert (first.fetched, first.reused, first.removed) == (11, 0, 0)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    some = next(iter(manifest.values()))
    cached = tmp_path / "cache" / some["path"]
    import hashlib
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == some["sha256"]
    cached.write_bytes(cached.read_bytes()[:-10])  # damaged on the site's disk
    again = sync_cohort(config, cache_dir=tmp_path / "cache")
    assert (again.fetched, again.reused, again.removed) == (1, 10, 0)
    assert not list((tmp_path / "cache").rglob("*.part"))
    rows = list(csv.DictReader(open(tmp_path / "cache" / "labels.csv", encoding="utf-8")))
    assert len(rows) == 11 and {r["series_instance_uid"] for r in rows} == set(pacs["ct"])
    assert len(orthanc.rest("/instances")) == pacs["n_instances"]  # training's retrieval never writes to the PACS


def test_site_check_pacs_reports_the_cohort_and_names_the_broken_series(
        tmp_path: Path, orthanc: OrthancServer, pacs: dict) -> None:
    from simulations.cli import app

    broken = list(pacs["ct"])[2]
    result = CliRunner().invoke(app, ["site", "check", "--pacs", str(_ct_yaml(tmp_path, orthanc, pacs)),
                                      "--pacs-cache", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json")],
                                terminal_width=250)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["series"], report["modalities"], report["fetched"]) == (3, {"CT": 3}, 11)
    assert report["set_aside"] == [{"series_instance_uid": broken, "reason": "missing_slice",
                                    "detail": report["set_aside"][0]["detail"]}]
    assert "1 slice(s) missing between" in report["set_aside"][0]["detail"]
    assert "series: 2 usable, 1 set aside" in result.output and orthanc.password not in result.output


def test_a_site_trains_from_its_pacs_cohort(tmp_path: Path, orthanc: OrthancServer, pacs: dict) -> None:
    """2-D: the demo CR/DX cohort keyed by accession number; 3-D: the CT series as volumes."""
    import torch

    from federation.config.schema import DataConfig, ModelConfig, TrainConfig
    from federation.data import check_site_data, load_dataset
    from federation.data.dicom.pacs import load_pacs_config, sync_cohort
    from federation.models import build_model
    from federation.training.local import train_local

    rows = pacs["demo_rows"]
    accession = {}
    for row in rows:
        ds = pydicom.dcmread(pacs["demo"] / row["path"], stop_before_pixels=True)
        accession[ds.AccessionNumber] = "pneumonia" if row["label"] == "1" else "normal"
    site = tmp_path / "site"
    site.mkdir()
    config = load_pacs_config(_site_yaml(site, orthanc, cohort={"modality": "CR,DX", "body_part": "chest"},
                                         labels=sorted(accession.items()), key_column="accession_number"))
    result = sync_cohort(config, cache_dir=site / "state" / "pacs-cache")
    assert len(result.series) == 24 and result.fetched == 24
    data = DataConfig(dataset="dicom", data_dir=str(result.cache_dir), image_size=28, dicom_channels=1,
                      dicom_label_names="normal,pneumonia")
    splits = load_dataset(data, seed=0)
    check_site_data(data, splits)
    assert len(splits.train_labels) + len(splits.test_labels) == 24
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn"), in_channels=1, num_classes=2, dp=False)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(np.array(splits.train_images)),
                                             torch.from_numpy(np.array(splits.train_labels)))
    trained = train_local(model=model, dataset=dataset, config=TrainConfig(local_epochs=1, batch_size=8),
                          privacy=None, seed=0)
    assert trained.num_examples == len(splits.train_labels)

    ct = load_pacs_config(_ct_yaml(tmp_path, orthanc, pacs))
    cached = sync_cohort(ct, cache_dir=site / "state" / "ct-cache").cache_dir
    volumes = DataConfig(dataset="dicom_volume", data_dir=str(cached), image_size=8, dicom_channels=1,
                         dicom_label_names="a,b", dicom_test_fraction=0.0)
    vol = load_dataset(volumes, seed=0)
    assert vol.train_images.shape == (2, 1, 8, 8, 8)  # the series missing a slice is set aside


@pytest.mark.parametrize("problem", ["password", "unreachable"])
def test_wrong_password_or_unreachable_pacs_is_a_clear_error_and_nothing_changes(
        tmp_path: Path, orthanc: OrthancServer, pacs: dict, problem: str) -> None:
    from federation.data.dicom.pacs import PacsError, load_pacs_config, sync_cohort

    url = "http://127.0.0.1:9/dicom-web" if problem == "unreachable" else None
    path = _ct_yaml(tmp_path, orthanc, pacs, url=url, password="not-the-password")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(PacsError) as err:
        sync_cohort(load_pacs_config(path), cache_dir=tmp_path / "state" / "cache")
    message = str(err.value)
    expected = "is unreachable" if problem == "unreachable" else "refused the credentials of user 'medfed-site'"
    assert expected in message and (url or orthanc.dicomweb_url) in message
    assert "not-the-password" not in message and orthanc.password not in message
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_orthanc_refuses_a_wrong_password(orthanc: OrthancServer) -> None:
    wrong = OrthancServer(**{**orthanc.__dict__, "password": "wrong"})
    with pytest.raises(urllib.error.HTTPError) as err:
        wrong.rest("/system")
    assert err.value.code == 401


def test_predict_writes_a_research_sr_per_series_back_into_the_pacs(
        tmp_path: Path, orthanc: OrthancServer, pacs: dict) -> None:
    import torch

    from federation.config.schema import ModelConfig
    from federation.inference.export import export_model
    from federation.inference.preprocess import Preprocessing
    from federation.models import build_model
    from simulations.cli import app

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn"), in_channels=1, num_classes=2, dp=False)
    exported = export_model(model=model, preprocessing=Preprocessing(image_size=28, in_channels=1),
                            out_dir=tmp_path / "run" / "export",
                            metadata={"run": "pacs-test", "round": 3, "num_classes": 2, "label_names": ["a", "b"],
                                      "positive_class": 1, "threshold": 0.5, "model": {"name": "cnn"}})
    before = len(orthanc.rest("/instances"))
    result = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "run"), "--pacs",
                                      str(_ct_yaml(tmp_path, orthanc, pacs)), "--pacs-cache", str(tmp_path / "cache"),
                                      "--out", str(tmp_path / "p.csv")], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "3 research report(s)" in result.output
    assert len(orthanc.rest("/instances")) == before + 3
    client = _client(orthanc)
    found = client.search_for_series(search_filters={"Modality": "SR"})
    assert len(found) == 3
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    series_of = {e["path"]: e["series_instance_uid"] for e in manifest.values()}
    for item in found:
        ref = pydicom.Dataset.from_json(item)
        sops = client.search_for_instances(ref.StudyInstanceUID, ref.SeriesInstanceUID)
        sr = client.retrieve_instance(ref.StudyInstanceUID, ref.SeriesInstanceUID,
                                      pydicom.Dataset.from_json(sops[0]).SOPInstanceUID)
        assert sr.SeriesDescription == "medfed research output - NOT FOR CLINICAL USE"
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
        source = items["Source series"].TextValue
        assert source in pacs["ct"] and sr.StudyInstanceUID == pydicom.dcmread(pacs["ct"][source][0]).StudyInstanceUID
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == source
        assert len(evidence.ReferencedSOPSequence) == len(pacs["ct"][source])
        assert items["Notice"].TextValue == "medfed research output - NOT FOR CLINICAL USE"
        assert items["Model SHA-256"].TextValue == exported.meta["sha256"]["model.pt2"]
        assert items["Model name"].TextValue == "medfed cnn (pacs-test)"
        assert items["Model version"].TextValue.startswith("round 3, medfed ")
        expected = np.mean([float(r["p_positive"]) for r in rows if series_of[r["input"]] == source])
        score = float(items["Probability of b"].MeasuredValueSequence[0].NumericValue)
        assert score == pytest.approx(expected, abs=1e-5)


def _demo_yaml(folder: Path, server: OrthancServer, pacs: dict, **kwargs) -> Path:
    accession = {}
    for row in pacs["demo_rows"]:
        ds = pydicom.dcmread(pacs["demo"] / row["path"], stop_before_pixels=True)
        accession[ds.AccessionNumber] = "pneumonia" if row["label"] == "1" else "normal"
    folder.mkdir(parents=True, exist_ok=True)
    return _site_yaml(folder, server, cohort={"modality": "CR,DX", "body_part": "chest"},
                      labels=sorted(accession.items()), key_column="accession_number", **kwargs)


DICOM_RUN = ("data.dataset=dicom", "data.dicom_label_names=normal,pneumonia", "data.dicom_channels=1",
             "data.image_size=28")


def test_a_supernode_with_node_config_pacs_trains_from_its_pacs(real_site, orthanc: OrthancServer,
                                                                pacs: dict, caplog: pytest.LogCaptureFixture) -> None:
    """The real ClientApp of a site whose node config names its PACS YAML trains a round from the cohort."""
    from client.guard import SITE_ERROR_REASON

    real_site.node_config["pacs"] = str(_demo_yaml(real_site.coordinator_dir.parent / "etc", orthanc, pacs))
    reply = real_site.train(*DICOM_RUN)
    assert not reply.has_error(), reply.error
    assert "arrays" in reply.content and reply.content["arrays"]  # the DP update, not a refusal
    cache = real_site.state_dir / real_site.name / "pacs-cache"
    assert len(json.loads((cache / "manifest.json").read_text())) == 24
    audit = (real_site.state_dir / real_site.name / "audit.jsonl").read_text()
    assert orthanc.password not in audit and orthanc.password not in caplog.text

    wrong = real_site.coordinator_dir.parent / "etc-wrong"
    real_site.node_config["pacs"] = str(_demo_yaml(wrong, orthanc, pacs, password="nope"))
    with caplog.at_level("ERROR"):
        reply = real_site.train(*DICOM_RUN, run_name="r2")
    assert reply.has_error() and reply.error.reason == SITE_ERROR_REASON  # the coordinator learns nothing more
    assert f"PACS {orthanc.dicomweb_url} refused the credentials" in caplog.text and "nope" not in caplog.text


def test_predict_with_a_segmentation_model_writes_a_dicom_seg_per_series(
        tmp_path: Path, orthanc: OrthancServer, pacs: dict) -> None:
    import torch

    from federation.config.schema import ModelConfig
    from federation.inference.export import export_model
    from federation.inference.preprocess import Preprocessing
    from federation.models import build_model
    from simulations.cli import app

    torch.manual_seed(0)
    unet = build_model(ModelConfig(name="unet", width=4), in_channels=1, num_classes=2, dp=False,
                       task="segmentation")
    exported = export_model(model=unet, preprocessing=Preprocessing(image_size=32, in_channels=1),
                            out_dir=tmp_path / "run" / "export",
                            metadata={"run": "seg-test", "round": 1, "num_classes": 2,
                                      "label_names": ["background", "lesion"], "model": {"name": "unet"}})
    result = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "run"), "--pacs",
                                      str(_ct_yaml(tmp_path, orthanc, pacs)), "--pacs-cache", str(tmp_path / "cache")],
                                terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "3 research report(s) (DICOM SEG" in result.output
    client = _client(orthanc)
    found = client.search_for_series(search_filters={"Modality": "SEG"})
    assert len(found) == 3
    for item in found:
        ref = pydicom.Dataset.from_json(item)
        sop = pydicom.Dataset.from_json(client.search_for_instances(ref.StudyInstanceUID, ref.SeriesInstanceUID)[0])
        seg = client.retrieve_instance(ref.StudyInstanceUID, ref.SeriesInstanceUID, sop.SOPInstanceUID)
        source = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert source in pacs["ct"] and seg.NumberOfFrames == len(pacs["ct"][source])
        assert (seg.Rows, seg.Columns) == (128, 128)
        assert seg.SeriesDescription == seg.ContentDescription == "medfed research output - NOT FOR CLINICAL USE"
        assert seg.SegmentSequence[0].SegmentLabel == "lesion"
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "medfed unet (seg-test)"
        assert exported.meta["sha256"]["model.pt2"] in algorithm.AlgorithmParameters


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_predict_with_a_volume_model_writes_one_report_per_series_as_a_volume(
        tmp_path: Path, orthanc: OrthancServer, pacs: dict, task: str) -> None:
    """3-D models: each CT series predicted as one volume; the series missing a slice is set aside and named."""
    import torch

    from federation.config.schema import ModelConfig
    from federation.inference.export import export_model
    from federation.inference.preprocess import Preprocessing
    from federation.inference.volume_writeback import cohort_volume_reports
    from federation.models import build_model
    from simulations.cli import app

    torch.manual_seed(0)
    seg = task == "segmentation"
    build = ModelConfig(name="unet" if seg else "cnn", width=4)
    net = build_model(build, in_channels=1, num_classes=2, spatial_dims=3, dp=False, task=task)
    prep = Preprocessing(image_size=8, in_channels=1, spatial_dims=3, volume_shape=(8, 8, 8) if seg else ())
    exported = export_model(model=net, preprocessing=prep, out_dir=tmp_path / "run" / "export",
                            metadata={"run": f"vol-{task}", "round": 1, "num_classes": 2, "task": task,
                                      "label_names": ["background", "lesion"] if seg else ["a", "b"],
                                      "positive_class": 1, "threshold": 0.5, "model": {"name": build.name}})
    modality = "SEG" if seg else "SR"
    client = _client(orthanc)
    before = len(client.search_for_series(search_filters={"Modality": modality}))
    result = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "run"), "--pacs",
                                      str(_ct_yaml(tmp_path, orthanc, pacs)), "--pacs-cache", str(tmp_path / "cache"),
                                      "--out", str(tmp_path / "series.csv")], terminal_width=250)
    assert result.exit_code == 0, result.output
    broken = list(pacs["ct"])[2]
    text = " ".join(result.output.split())
    assert f"2 research report(s) (DICOM {modality}, not for clinical use) stored in PACS" in text
    assert f"for 2 series as volumes, 1 set aside" in text and f"set aside series {broken}: missing_slice" in text
    found = [pydicom.Dataset.from_json(i) for i in client.search_for_series(search_filters={"Modality": modality})]
    assert len(found) == before + 2
    rows = {r["series_instance_uid"]: r for r in csv.DictReader(open(tmp_path / "series.csv", encoding="utf-8"))}
    assert sorted(rows) == sorted(list(pacs["ct"])[:2])
    module = torch.export.load(tmp_path / "run" / "export" / "model.pt2").module()
    direct = cohort_volume_reports(cache_dir=tmp_path / "cache", module=module, meta=exported.meta)
    mine = []
    for ref in found:
        sop = pydicom.Dataset.from_json(client.search_for_instances(ref.StudyInstanceUID, ref.SeriesInstanceUID)[0])
        report = client.retrieve_instance(ref.StudyInstanceUID, ref.SeriesInstanceUID, sop.SOPInstanceUID)
        if seg:
            algorithm = report.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            if algorithm.AlgorithmName != "medfed unet (vol-segmentation)":
                continue  # the 2-D model's SEGs of another test
            source = report.ReferencedSeriesSequence[0].SeriesInstanceUID
            mine.append(source)
            assert report.NumberOfFrames == len(pacs["ct"][source]) == 4 and report.ContentLabel == "MEDFED_RESEARCH"
            assert report.SegmentSequence[0].SegmentLabel == "lesion"
            assert exported.meta["sha256"]["model.pt2"] in algorithm.AlgorithmParameters
            continue
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in report.ContentSequence}
        if items["Model name"].TextValue != "medfed cnn (vol-classification)":
            continue  # the 2-D model's reports of another test
        source = items["Source series"].TextValue
        mine.append(source)
        evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == source and len(evidence.ReferencedSOPSequence) == 4
        score = float(items["Probability of b"].MeasuredValueSequence[0].NumericValue)
        expected = next(r for r in direct.rows if r["series_instance_uid"] == source)["p_positive"]
        assert score == pytest.approx(expected, abs=1e-6) == pytest.approx(float(rows[source]["p_positive"]))
    assert sorted(mine) == sorted(rows)
