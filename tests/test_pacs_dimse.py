"""A site's cohort from a PACS over DIMSE (C-FIND, C-GET, C-STORE) against a real Orthanc's DICOM port.

Orthanc (tests/orthanc_fixture.py) admits only the AE title ``MEDFEDSITE`` from 127.0.0.1
and checks that it is called by its own AE title: DIMSE has no password.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from tests.orthanc_fixture import PACS_AET, SITE_AET, OrthancServer, orthanc  # noqa: F401 - the fixture
from tests.test_pacs import _client, pacs  # noqa: F401 - the demo cohort in Orthanc

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _dimse_yaml(tmp_path: Path, server: OrthancServer, pacs: dict, *, port: int | None = None,  # noqa: F811
                calling_ae: str = SITE_AET, extra: dict | None = None) -> Path:
    labels = [(uid, "b" if i % 2 else "a") for i, uid in enumerate(pacs["ct"])]
    (tmp_path / "labels.csv").write_text("series_instance_uid,label\n" + "".join(f"{k},{v}\n" for k, v in labels),
                                         encoding="utf-8")
    config = {"dimse": {"host": "127.0.0.1", "port": port or server.dicom_port, "called_ae": PACS_AET,
                        "calling_ae": calling_ae},
              "labels": "labels.csv", "key_column": "series_instance_uid", "timeout_s": 10,
              "cohort": {"modality": "CT", "body_part": "CHEST", "study_date_from": "20240101",
                         "series_description": "ax chest.*"}, **(extra or {})}
    path = tmp_path / "site-pacs.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_dimse_config_has_no_password_and_checks_its_block(tmp_path: Path) -> None:
    from federation.data.dicom.pacs import PacsError, load_pacs_config

    def load(config: dict) -> object:
        (tmp_path / "p.yaml").write_text(json.dumps(config), encoding="utf-8")
        return load_pacs_config(tmp_path / "p.yaml")

    block = {"host": "pacs.local", "port": 104, "called_ae": "HOSPITALPACS", "calling_ae": "MEDFED_NORTH"}
    config = load({"dimse": block})
    assert config.address == "dicom://HOSPITALPACS@pacs.local:104" and config.dicomweb_url == ""
    with pytest.raises(PacsError, match=r"password_env: DIMSE has no password: the PACS admits the site by its AE"):
        load({"dimse": block, "password_env": "X"})
    with pytest.raises(PacsError, match=r"dimse.port: a TCP port \(1-65535\), got '104'"):
        load({"dimse": {**block, "port": "104"}})
    with pytest.raises(PacsError, match=r"dimse.called_ae: an AE title of 1-16 printable"):
        load({"dimse": {**block, "called_ae": "A" * 17}})
    with pytest.raises(PacsError, match=r"dimse.tls: unknown key \(valid: called_ae, calling_ae, host, move_bind, "
                                        r"move_port, port, retrieve, tls_ca, tls_cert, tls_key\)"):
        load({"dimse": {**block, "tls": True}})
    with pytest.raises(PacsError, match=r"dimse.move_port: retrieve: move needs the TCP port this site's storage"):
        load({"dimse": {**block, "retrieve": "move"}})
    with pytest.raises(PacsError, match=r"dimse.retrieve: 'get' \(C-GET\) or 'move'"):
        load({"dimse": {**block, "retrieve": "wado"}})
    (tmp_path / "ca.pem").write_text("x", encoding="utf-8")
    with pytest.raises(PacsError, match=r"dimse.tls_key: give both tls_cert and tls_key"):
        load({"dimse": {**block, "tls_ca": "ca.pem", "tls_cert": "site.pem"}})
    with pytest.raises(PacsError, match=r"dimse.tls_ca: .*/missing.pem is not a file"):
        load({"dimse": {**block, "tls_ca": "missing.pem"}})
    with pytest.raises(PacsError, match=r"dimse.retrieve: retrieve: move is not supported with TLS yet"):
        load({"dimse": {**block, "tls_ca": "ca.pem", "retrieve": "move", "move_port": 11112}})
    assert load({"dimse": {**block, "tls_ca": "ca.pem"}}).dimse.tls_ca == str(tmp_path / "ca.pem")
    with pytest.raises(PacsError, match="give dicomweb_url or dimse, not both"):
        load({"dimse": block, "dicomweb_url": "https://pacs/dicom-web"})


def test_dimse_cohort_is_queried_retrieved_and_checked_like_dicomweb(
        tmp_path: Path, orthanc: OrthancServer, pacs: dict, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from federation.data.dicom.dimse import DimseClient
    from federation.data.dicom.pacs import load_pacs_config, query_cohort, sync_cohort
    from federation.data.dicom.pacs_report import check_pacs_cohort

    opened: list[str] = []
    real_open = DimseClient._open

    def counting_open(self: DimseClient, ae: object, **kwargs: object) -> object:
        opened.append("get" if "evt_handlers" in kwargs else "find")
        return real_open(self, ae, **kwargs)

    monkeypatch.setattr(DimseClient, "_open", counting_open)
    config = load_pacs_config(_dimse_yaml(tmp_path, orthanc, pacs))
    found = query_cohort(config)  # study-level then series-level C-FIND
    assert sorted(s.series_instance_uid for s in found) == sorted(pacs["ct"])
    assert {s.modality for s in found} == {"CT"} and sorted(s.instances for s in found) == [3, 4, 4]
    assert {s.study_date for s in found} == {"20240312"} and {s.accession_number for s in found} == {
        "CTACC0", "CTACC1", "CTACC2"}
    assert opened == ["find"]  # one association for the study-level and the 3 series-level C-FINDs
    opened.clear()
    first = sync_cohort(config, cache_dir=tmp_path / "cache")  # C-GET
    assert (first.fetched, first.reused, first.removed) == (11, 0, 0)
    assert opened.count("get") == 1  # the 11 C-GETs (one SOP class) share one association
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    originals = {pydicom.dcmread(f).SOPInstanceUID: f for files in pacs["ct"].values() for f in files}
    assert sorted(manifest) == sorted(originals)
    for sop, entry in manifest.items():
        cached = tmp_path / "cache" / entry["path"]
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == entry["sha256"]
        assert (pydicom.dcmread(cached).pixel_array == pydicom.dcmread(originals[sop]).pixel_array).all()
    cached.write_bytes(cached.read_bytes()[:-10])
    report = check_pacs_cohort(config, cache_dir=tmp_path / "cache")  # the re-run fetches only the damaged one
    assert (report.sync.fetched, report.sync.reused) == (1, 10)
    broken = list(pacs["ct"])[2]
    assert [(p.series_instance_uid, p.reason) for p in report.problems] == [(broken, "missing_slice")]
    rows = list(csv.DictReader(open(tmp_path / "cache" / "labels.csv", encoding="utf-8")))
    assert len(rows) == 11 and {r["series_instance_uid"] for r in rows} == set(pacs["ct"])
    assert len(orthanc.rest("/instances")) == pacs["n_instances"]  # training never writes to the PACS


def test_dimse_retrieval_by_c_move_to_the_sites_own_storage_scp(tmp_path: Path, orthanc: OrthancServer,
                                                                  pacs: dict) -> None:  # noqa: F811
    """A PACS without C-GET: C-MOVE each instance to the site's storage SCP (registered at Orthanc)."""
    import socket

    from federation.data.dicom.pacs import load_pacs_config, sync_cohort

    move = {"retrieve": "move", "move_port": orthanc.site_port, "move_bind": "127.0.0.1"}
    path = _dimse_yaml(tmp_path, orthanc, pacs)
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "dimse": {**config["dimse"], **move}}), encoding="utf-8")
    result = sync_cohort(load_pacs_config(path), cache_dir=tmp_path / "cache")
    assert (result.fetched, result.reused) == (11, 0)
    originals = {pydicom.dcmread(f).SOPInstanceUID: f for files in pacs["ct"].values() for f in files}
    for sop, entry in json.loads((tmp_path / "cache" / "manifest.json").read_text()).items():
        cached = pydicom.dcmread(tmp_path / "cache" / entry["path"])
        assert (cached.pixel_array == pydicom.dcmread(originals[sop]).pixel_array).all()
    with socket.socket() as sock:  # the storage SCP is stopped once the retrieval ends
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", orthanc.site_port))


def test_dimse_over_tls_stores_queries_and_retrieves_and_a_plain_site_is_refused(tmp_path: Path,
                                                                                   pacs: dict) -> None:  # noqa: F811
    """Orthanc with DICOM TLS (client certificates required): C-STORE, C-FIND and C-GET over TLS."""
    from federation.data.dicom.pacs import PacsError, connect, load_pacs_config, sync_cohort
    from tests.orthanc_fixture import start_orthanc, stop_orthanc, write_tls_files

    tls = write_tls_files(tmp_path / "tls")
    server, proc = start_orthanc(tmp_path / "orthanc", extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(tls["pacs_cert"]),
        "DicomTlsPrivateKey": str(tls["pacs_key"]), "DicomTlsTrustedCertificates": str(tls["ca_cert"]),
        "DicomTlsRemoteCertificateRequired": True})
    try:
        (tmp_path / "plain").mkdir()
        plain = _dimse_yaml(tmp_path / "plain", server, pacs)  # no TLS against a TLS-only DICOM port
        with pytest.raises(PacsError, match=r"closed the association without accepting it: .* or TLS on one side"):
            sync_cohort(load_pacs_config(plain), cache_dir=tmp_path / "plain-cache")
        secure = {"tls_ca": str(tls["ca_cert"]), "tls_cert": "tls/site.pem", "tls_key": "tls/site.key"}
        path = _dimse_yaml(tmp_path, server, pacs)
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "dimse": {**config["dimse"], **secure}}), encoding="utf-8")
        site = load_pacs_config(path)
        uid = list(pacs["ct"])[0]
        connect(site).store_instances([pydicom.dcmread(f) for f in pacs["ct"][uid]])  # C-STORE over TLS
        result = sync_cohort(site, cache_dir=tmp_path / "cache")  # C-FIND and C-GET over TLS
        assert [s.series_instance_uid for s in result.series] == [uid] and result.fetched == 4
    finally:
        stop_orthanc(proc)


@pytest.mark.parametrize("problem", ["unknown_ae", "unreachable"])
def test_a_refused_or_unreachable_dimse_pacs_is_a_clear_error_and_nothing_changes(
        tmp_path: Path, orthanc: OrthancServer, pacs: dict, problem: str) -> None:  # noqa: F811
    from federation.data.dicom.pacs import PacsError, load_pacs_config, sync_cohort

    port = 9 if problem == "unreachable" else None
    path = _dimse_yaml(tmp_path, orthanc, pacs, port=port, calling_ae="INTRUDER" if port is None else SITE_AET)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(PacsError) as err:
        sync_cohort(load_pacs_config(path), cache_dir=tmp_path / "state" / "cache")
    address = f"dicom://{PACS_AET}@127.0.0.1:{port or orthanc.dicom_port}"
    expected = ("is unreachable" if port else "rejected the association of calling AE title 'INTRUDER'")
    assert str(err.value).startswith(f"PACS {address} {expected}") and "C-FIND" in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_predict_stores_research_reports_by_c_store(tmp_path: Path, orthanc: OrthancServer,
                                                    pacs: dict) -> None:  # noqa: F811
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
                            metadata={"run": "dimse-test", "round": 2, "num_classes": 2, "label_names": ["a", "b"],
                                      "positive_class": 1, "threshold": 0.5, "model": {"name": "cnn"}})
    client = _client(orthanc)
    before = len(client.search_for_series(search_filters={"Modality": "SR"}))
    result = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "run"), "--pacs",
                                      str(_dimse_yaml(tmp_path, orthanc, pacs)), "--pacs-cache", str(tmp_path / "c")],
                                terminal_width=250)
    assert result.exit_code == 0, result.output
    assert (f"3 research report(s) (DICOM SR, not for clinical use) stored in PACS dicom://{PACS_AET}@127.0.0.1:"
            f"{orthanc.dicom_port} for 11 image(s) of 3 series") in " ".join(result.output.split())
    found = [pydicom.Dataset.from_json(i) for i in client.search_for_series(search_filters={"Modality": "SR"})]
    mine = []
    for ref in found:
        sop = pydicom.Dataset.from_json(client.search_for_instances(ref.StudyInstanceUID, ref.SeriesInstanceUID)[0])
        sr = client.retrieve_instance(ref.StudyInstanceUID, ref.SeriesInstanceUID, sop.SOPInstanceUID)
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
        if items["Model name"].TextValue == "medfed cnn (dimse-test)":
            mine.append(items["Source series"].TextValue)
            assert items["Model SHA-256"].TextValue == exported.meta["sha256"]["model.pt2"]
            assert sr.SeriesDescription == "medfed research output - NOT FOR CLINICAL USE"
    assert len(found) == before + 3 and sorted(mine) == sorted(pacs["ct"])


def test_simulated_sites_train_from_their_pacs_cohorts(tmp_path: Path, orthanc: OrthancServer,
                                                       pacs: dict) -> None:  # noqa: F811
    """`medfed simulate` with simulation.site_pacs: site 1 over DICOMweb, site 2 over DIMSE, one round."""
    from server.run_dir import read_jsonl
    from simulations.harness import resolve_config, simulate
    from tests.test_pacs import _demo_yaml

    web = _demo_yaml(tmp_path / "north", orthanc, pacs)
    dimse = tmp_path / "south" / "site-pacs.yaml"
    dimse.parent.mkdir()
    (tmp_path / "south" / "labels.csv").write_text((web.parent / "labels.csv").read_text(), encoding="utf-8")
    dimse.write_text(json.dumps({"dimse": {"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae": PACS_AET,
                                           "calling_ae": SITE_AET},
                                 "labels": "labels.csv", "key_column": "accession_number",
                                 "cohort": {"modality": "CR,DX", "body_part": "chest"}}), encoding="utf-8")
    config = resolve_config(overrides=[
        "data.dataset=dicom", "data.dicom_label_names=normal,pneumonia", "data.dicom_channels=1",
        "data.image_size=16", "model.width=4", "train.batch_size=8", "data.dicom_test_fraction=0.5",
        f"simulation.site_pacs={web},{dimse}", "data.num_sites=2", "strategy.min_sites=2", "server.rounds=1",
        "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000", f"server.out_dir={tmp_path / 'runs'}",
        "server.run_name=pacs-sim"])
    run = simulate(config)
    rounds = read_jsonl(run / "rounds.jsonl")
    assert rounds[1]["aggregated"] and sorted(rounds[1]["sites"]) == ["site-1", "site-2"]
    for site in ("site-1", "site-2"):  # each site took its whole cohort of 24: 12 to train, 12 to test
        assert rounds[1]["sites"][site]["train"]["num-examples"] == rounds[1]["sites"][site]["evaluate"][
            "num-examples"] == 12
        cache = run / "site-state" / site / "pacs-cache"
        assert len(json.loads((cache / "manifest.json").read_text())) == 24


def test_simulation_site_pacs_names_one_yaml_per_site() -> None:
    from federation.data.dicom.pacs import simulated_site_pacs

    assert simulated_site_pacs("/a.yaml, /b.yaml", site_index=1, num_sites=2) == "/b.yaml"
    with pytest.raises(ValueError, match=r"simulation.site_pacs names 1 PACS YAML\(s\) for 2 simulated sites"):
        simulated_site_pacs("/a.yaml", site_index=0, num_sites=2)


def test_a_real_site_never_reads_simulation_site_pacs(tmp_path: Path, simulated_site_process: None) -> None:
    """simulation.site_pacs comes from the run config (the coordinator): only simulated sites follow it."""
    from client.site import site_settings
    from simulations.harness import resolve_config

    yaml = tmp_path / "pacs.yaml"
    yaml.write_text(json.dumps({"dimse": {"host": "127.0.0.1", "port": 104, "called_ae": "PACS"}}), encoding="utf-8")
    config = resolve_config(overrides=[f"simulation.site_pacs={yaml},{yaml}", "data.num_sites=2",
                                       f"server.out_dir={tmp_path}"])
    node = {"site-name": "north", "data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state")}
    real = site_settings(node_config=node, config=config, run_name="r")
    assert (real.pacs, real.data_dir) == ("", str(tmp_path / "data"))
    simulated = site_settings(node_config={"partition-id": 1, "num-partitions": 2}, config=config, run_name="r")
    assert (simulated.pacs, simulated.data_dir) == (str(yaml), str(tmp_path / "r" / "site-state" / "site-2" /
                                                                  "pacs-cache"))
