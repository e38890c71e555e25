"""No patient data leaves a site: every reply of a DICOM site, serialized as Flower sends it, is PHI-free.

A demo hospital (real DICOM files with fake patient names, IDs, birth dates, UIDs,
accession numbers, institution) is split into two simulated sites. Each site's
ClientApp handles a round's train and evaluate requests, a refused round, a failing
request and hostile node configs; every reply is serialized with Flower's own
protobuf serde (exactly the bytes that would travel) and searched for every
identifying string in the files, every file path, and the site folder's path.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

from client.app import app
from client.audit import read_audit
from client.guard import EVALUATE_METRICS, REFUSAL_CODES, SITE_ERROR_REASON, SITE_NAME_PATTERN, TRAIN_METRICS
from federation.config import to_flat
from federation.data import dataset_info
from federation.data.dicom import make_demo_site
from federation.models import build_model
from simulations.harness import resolve_config

#: DICOM value representations that hold text (names, IDs, UIDs, dates, descriptions).
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"}
#: Shorter strings (e.g. "CR", "1") are too generic to be identifying and could occur by chance.
MIN_LEN = 6
RUN = "phi-check"


def _phi_strings(site: Path) -> set[str]:
    """Every identifying text in the site: DICOM tag values (and name parts), file paths."""
    found: set[str] = {str(site), str(site / "labels.csv"), site.name}
    for path in site.rglob("*"):
        found |= {str(path), str(path.relative_to(site)), path.name}
        if path.suffix != ".dcm":
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for elem in [*ds.file_meta, *ds.iterall()]:
            if elem.VR not in TEXT_VRS or elem.value is None:
                continue
            values = elem.value if isinstance(elem.value, pydicom.multival.MultiValue) else [elem.value]
            for value in values:
                found.add(str(value))
                if elem.VR == "PN":
                    found |= {str(value.family_name), str(value.given_name)}
    return {s for s in found if len(s) >= MIN_LEN}


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> dict:
    if not (shared_data_dir / "pneumoniamnist.npz").is_file():
        pytest.skip("pneumoniamnist.npz not in the shared data folder")
    tmp = tmp_path_factory.mktemp("phi")
    site = make_demo_site(source="pneumoniamnist", data_dir_of_npz=shared_data_dir,
                          out_dir=tmp / "St-Elsewhere_MF-radiology", count=40, seed=5)
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({"lifetime_epsilon": 100.0, "lifetime_delta": 1e-3, "max_rounds_per_run": 1}))
    config = resolve_config(overrides=[
        "data.dataset=dicom", f"data.data_dir={site}", "data.num_sites=2", "data.dicom_test_fraction=0.25",
        "data.dicom_label_names=normal,pneumonia", "data.dicom_channels=1",  # the coordinator holds no images
        "model.width=4", "train.batch_size=8", "strategy.min_sites=2", "server.rounds=2",
        "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000",
        f"server.out_dir={tmp / 'runs'}", f"server.run_name={RUN}", f"simulation.site_policy={policy}",
    ])
    info = dataset_info(config.data)
    torch.manual_seed(0)
    weights = build_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                          dp=True).state_dict()
    phi = _phi_strings(site)  # after the sites read it, so index/cache files count too
    return {"site": site, "config": config, "weights": weights, "phi": phi, "tmp": tmp}


def _message(kind: str, weights: dict[str, torch.Tensor], server_round: int, node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(weights),
                          "config": ConfigRecord({"server-round": server_round, "run-name": RUN})})
    metadata = Metadata(run_id=3, message_id=f"{kind}-{server_round}-{node}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=600.0,
                        message_type=kind)
    return Message(content=content, metadata=metadata)


def _context(config, node: int, **node_config) -> Context:
    return Context(run_id=3, node_id=node, node_config={"partition-id": node - 1, "num-partitions": 2, **node_config},
                   state=RecordDict(), run_config=to_flat(config))


@pytest.fixture(scope="module")
def replies(hospital: dict) -> list[tuple[str, Message]]:
    """What both sites send in round 1 (train, evaluate) and round 2 (train: refused by max_rounds_per_run)."""
    out = []
    with pytest.MonkeyPatch.context() as patch:  # this process plays a simulation engine's site workers
        patch.setattr("client.simulated._in_flower_simulation_actor", lambda: True)
        for node in (1, 2):
            context = _context(hospital["config"], node)
            for kind, rnd in (("train", 1), ("evaluate", 1), ("train", 2)):
                reply = app(_message(kind, hospital["weights"], rnd, node), context)
                out.append((f"site-{node} {kind} {rnd}", reply))
    hospital["phi"] |= _phi_strings(hospital["site"])  # the header index written while loading
    return out


def _assert_no_phi(reply: Message, phi: set[str], what: str) -> bytes:
    wire = message_to_proto(reply).SerializeToString()
    leaked = sorted(s for s in phi if s.encode() in wire or s.encode("utf-16-le") in wire)
    assert not leaked, f"{what}: the serialized reply carries {leaked[:5]}"
    roundtrip = message_from_proto(message_to_proto(reply))
    texts = [what]
    if roundtrip.has_content():
        for key, record in roundtrip.content.items():
            texts.append(key)
            texts.extend(str(k) for k in record.keys())
            if isinstance(record, ConfigRecord):
                texts.extend(str(v) for v in record.values())
    else:
        texts.append(roundtrip.error.reason)
    for text in texts:
        assert not any(s in text for s in phi), f"{what}: {text!r} holds PHI"
    return wire


def test_demo_site_really_carries_phi(hospital: dict) -> None:
    phi = hospital["phi"]
    names = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) for p in hospital["site"].rglob("*.dcm")}
    assert names <= phi and len(names) >= 10
    assert any(re.fullmatch(r"MF05\d{6}", s) for s in phi), "patient IDs"
    assert any(s.count(".") > 5 and s[0].isdigit() for s in phi), "UIDs"
    assert "medfed Demo Hospital" in phi and str(hospital["site"]) in phi


def test_no_phi_in_any_reply_of_a_round(hospital: dict, replies: list[tuple[str, Message]]) -> None:
    params = {name: tuple(t.shape) for name, t in hospital["weights"].items()}
    kinds = []
    for what, reply in replies:
        assert not reply.has_error(), f"{what}: {reply.error.reason if reply.has_error() else ''}"
        _assert_no_phi(reply, hospital["phi"], what)
        content = reply.content
        assert set(content.keys()) <= {"site", "arrays", "metrics", "status"}
        assert SITE_NAME_PATTERN.match(content["site"]["name"]) and list(content["site"].keys()) == ["name"]
        if "status" in content:
            kinds.append("refused")
            reason = content["status"]["refused"]
            assert reason.split(":")[0] == "max-rounds" and reason.split(":")[0] in REFUSAL_CODES
            assert not content.array_records and not content.metric_records
        elif "arrays" in content:
            kinds.append("trained")
            arrays = content["arrays"]
            assert {k: tuple(a.shape) for k, a in arrays.items()} == params
            assert all(a.dtype == "float32" for a in arrays.values())
            assert set(content["metrics"].keys()) <= TRAIN_METRICS
        else:
            kinds.append("evaluated")
            assert isinstance(content["metrics"], MetricRecord)
            assert set(content["metrics"].keys()) <= EVALUATE_METRICS
            assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
    assert kinds == ["trained", "evaluated", "refused"] * 2


def test_failures_and_hostile_node_configs_leak_nothing(
    hospital: dict, replies: list, simulated_site_process: None
) -> None:
    config, weights, site = hospital["config"], hospital["weights"], hospital["site"]
    patient_dir = next((site / "images").iterdir())
    broken = config.model_copy(update={"data": config.data.model_copy(
        update={"dicom_labels": str(patient_dir / "labels-of-MF05.csv")})})
    cases = {
        # the labels file is missing: the exception names its path (inside a patient's folder)
        "missing labels": (_context(broken, 1), "evaluate"),
        # a site name that is a path or a patient ID is refused at the site
        "path as site name": (_context(config, 1, **{"site-name": str(patient_dir)}), "train"),
        "UID as site name": (_context(config, 2, **{"site-name": "1.2.826.0.1.3680043.8.498.1"}), "train"),
    }
    phi = hospital["phi"] | {str(patient_dir / "labels-of-MF05.csv"), "labels-of-MF05.csv"}
    for what, (context, kind) in cases.items():
        reply = app(_message(kind, weights, 1, context.node_id), context)
        assert reply.has_error(), what
        assert reply.error.reason == SITE_ERROR_REASON, what  # not even the exception type
        _assert_no_phi(reply, phi, what)
    # the full error stays at the site, in its audit log
    errors = [e for e in read_audit(_disk(hospital, "site-1") / "audit.jsonl") if e["event"] == "error"]
    assert [e["request"] for e in errors] == ["evaluate"]
    assert "FileNotFoundError" in errors[0]["error"] and "labels-of-MF05.csv" in errors[0]["error"]
    assert errors[0]["sent"] == {"error": SITE_ERROR_REASON}


def _disk(hospital: dict, name: str) -> Path:
    return Path(hospital["config"].server.out_dir) / RUN / "site-state" / name


def test_the_site_audit_log_records_the_round(hospital: dict, replies: list) -> None:
    for name in ("site-1", "site-2"):
        entries = read_audit(_disk(hospital, name) / "audit.jsonl")
        assert [(e["event"], e["round"]) for e in entries[:3]] == [("train", 1), ("evaluate", 1), ("train", 2)]
        assert entries[0]["requested"]["run_config"]["data.data_dir"] == str(hospital["site"])
        assert entries[0]["epsilon_after"] > entries[0]["epsilon_before"] == 0.0
        assert entries[2]["refused"].startswith("max-rounds: ") and entries[2]["sent"]["arrays"] == []


def test_the_check_catches_planted_phi(hospital: dict) -> None:
    """Negative control: PHI hidden in a config value, a metric name or raw array bytes is found."""
    import numpy as np
    from flwr.app import Array

    patient_id = next(s for s in hospital["phi"] if re.fullmatch(r"MF05\d{6}", s))
    reply_to = _message("train", hospital["weights"], 1, 1)
    planted = [
        RecordDict({"site": ConfigRecord({"name": patient_id})}),
        RecordDict({"metrics": MetricRecord({f"auc-{patient_id}": 0.5})}),
        RecordDict({"arrays": ArrayRecord({"w": Array(np.frombuffer(patient_id.encode() * 2, dtype=np.uint8))})}),
    ]
    for content in planted:
        with pytest.raises(AssertionError, match=patient_id):
            _assert_no_phi(Message(content, reply_to=reply_to), hospital["phi"], "planted")
