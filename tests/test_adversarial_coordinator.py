"""A malicious coordinator against a real site (issue 26): paths, simulated-site rule, reply identity.

Every test drives the real ClientApp handlers of a real hospital site (``real_site``:
site-name, data-dir, state-dir and policy in its node config) with a hostile run
config or message, and checks that the site's own configuration decides.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from client.app import app
from client.handling import SiteNodeConfigIncomplete
from client.ledger import PrivacyLedger
from client.simulated import is_simulated_site, runs_in_simulation
from federation.config import from_flat
from federation.faults import round_faults


def _update_norm(reply, weights: dict) -> float:
    sent = reply.content["arrays"].to_torch_state_dict()
    return float(torch.sqrt(sum(((sent[k] - weights[k]) ** 2).sum() for k in weights)))


# ------------------------------------------------- 26.3: the coordinator never chooses a real site's paths
@pytest.mark.parametrize("missing", ["state-dir", "data-dir", "site-name"])
def test_a_real_site_without_its_own_folders_refuses_to_start(
    real_site, missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    node_config = {k: v for k, v in real_site.node_config.items() if k != missing}
    hostile = (f"simulation.site_state_dir={real_site.coordinator_dir / 'disks'}",
               f"data.data_dir={real_site.coordinator_dir / 'data'}")
    run_config = real_site.run_config(*hostile)
    msg = real_site.message("train", real_site.weights(run_config))
    with caplog.at_level(logging.ERROR), pytest.raises(SiteNodeConfigIncomplete) as info:
        app(msg, real_site.context(run_config, node_config=node_config))  # the lifespan check, at start
    assert "details are in the site's own log" in str(info.value) and missing not in str(info.value)
    assert f"node config lacks {missing!r}" in caplog.text
    reply = real_site.train(*hostile, node_config=node_config)  # and on first use, should a runtime skip it
    assert reply.has_error() and not reply.has_content()
    assert not real_site.coordinator_dir.exists()  # nothing written where the coordinator pointed


def test_fresh_site_state_dirs_from_the_coordinator_do_not_reset_the_lifetime_budget(real_site) -> None:
    permissive = real_site.coordinator_dir / "policy.yaml"
    permissive.parent.mkdir(parents=True)
    permissive.write_text("lifetime_epsilon: 1000\nlifetime_delta: 0.5\n")
    replies = [real_site.train(f"simulation.site_state_dir={real_site.coordinator_dir / f'disk-{run}'}",
                               f"simulation.site_policy={permissive}", f"data.data_dir={real_site.coordinator_dir}",
                               run_name=f"study-{run}") for run in range(3)]
    assert [r.has_error() for r in replies] == [False, False, False]
    first, second, third = (dict(r.content["metrics"]) if "metrics" in r.content else r for r in replies)
    epsilon = first["epsilon"]
    assert 10 / 3 < epsilon <= 5 and second["epsilon"] == pytest.approx(epsilon)  # 2 runs fit, 3 do not
    assert third.content["status"]["refused"].startswith(
        f"lifetime-epsilon: lifetime epsilon spent {2 * epsilon:.4f}, this round would reach {3 * epsilon:.4f}, "
        "the site's lifetime budget is 10")
    ledger = PrivacyLedger.open(real_site.state_dir / real_site.name)  # the site's own disk keeps the ledger
    assert ledger.spent_epsilon() == pytest.approx(2 * epsilon)
    assert sorted(p.name for p in real_site.coordinator_dir.iterdir()) == ["policy.yaml"]


# ------------------------------------------------- 26.7 / 19.5: simulated only inside a simulation engine
def test_a_supernode_with_partition_id_and_no_site_name_is_not_simulated(real_site) -> None:
    attack = ("attack.kind=scale", "attack.sites=1", "attack.scale=1000", "faults.dropout_rate=0.99")
    assert not runs_in_simulation()  # this test process is no simulation engine's site worker
    assert not is_simulated_site({"partition-id": 0, "num-partitions": 1})
    bare = real_site.train(*attack, node_config={"partition-id": 0, "num-partitions": 1})
    assert bare.has_error()  # a real site without its own name and folders: refused, never attacked
    run_config = real_site.run_config(*attack)
    config = from_flat(run_config, source="test")
    assert round_faults(config.faults, num_sites=1, server_round=1, seed=config.seed) == {0: "drop"}  # if simulated
    weights = real_site.weights(run_config)
    honest = real_site.train(*attack, weights=weights, node_config={**real_site.node_config, "partition-id": 0})
    assert not honest.has_error() and "arrays" in honest.content  # no simulated dropout
    assert _update_norm(honest, weights) < 5.0  # a DP step, not the x1000 update of the attack


def test_a_state_dir_keeps_a_site_real_even_inside_an_engine(simulated_site_process: None) -> None:
    assert runs_in_simulation()
    assert is_simulated_site({"partition-id": 0, "num-partitions": 2})
    assert not is_simulated_site({"partition-id": 0, "num-partitions": 2, "state-dir": "/var/lib/medfed"})


@pytest.mark.integration
def test_only_a_worker_of_flowers_simulation_actor_pool_is_simulated() -> None:
    ray = pytest.importorskip("ray")
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        @ray.remote
        class OtherActor:
            def check(self) -> bool:
                from client.simulated import runs_in_simulation as probe

                return probe()

        class Probe:
            def __call__(self, message, context) -> bool:
                from client.simulated import runs_in_simulation as probe

                return probe()

        actor = ClientAppActor.remote()
        _, in_flower_actor, _ = ray.get(actor.run.remote(Probe, None, "0", None))
        assert in_flower_actor is True
        assert ray.get(OtherActor.remote().check.remote()) is False  # any other Ray actor is not
        assert runs_in_simulation() is False  # nor is the driver
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------- 26.8: a reply's name is bound to the SuperNode that sent it
def _reply(node: int, name: str, value: float) -> Message:
    content = RecordDict({"site": ConfigRecord({"name": name}),
                          "arrays": ArrayRecord({"w": torch.full((2,), value)}),
                          "metrics": MetricRecord({"num-examples": 10, "epsilon": 1.0})})
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="ins", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type="train")
    return Message(content=content, metadata=metadata)


def test_a_site_cannot_report_as_another_or_change_its_name(tmp_path: Path) -> None:
    from flwr.serverapp.strategy import FedAvg

    from federation.config import load_config
    from server.recording import RecordingStrategy
    from server.run_dir import SITES_FILE, RunDirectory, read_jsonl
    from strategies import QuorumStrategy

    run = RunDirectory.create(load_config(None, [f"server.out_dir={tmp_path}", "server.run_name=ids"]))
    recorder = RecordingStrategy(QuorumStrategy(inner=FedAvg(), min_replies=1), run=run)
    recorder.current = {"round": 1, "sites": {}, "refused": {}, "failed": {}}
    arrays, _ = recorder.aggregate_train(1, [_reply(11, "hospital-a", 1.0), _reply(12, "hospital-b", 3.0)])
    assert arrays["w"].numpy().tolist() == [2.0, 2.0]
    assert recorder.pop_round()["nodes"] == {"hospital-a": 11, "hospital-b": 12}

    recorder.current = {"round": 2, "sites": {}, "refused": {}, "failed": {}}
    replies = [_reply(11, "hospital-a", 1.0), _reply(13, "hospital-a", 1000.0), _reply(12, "hospital-c", 1000.0)]
    arrays, _ = recorder.aggregate_train(2, replies)
    assert arrays["w"].numpy().tolist() == [1.0, 1.0]  # only the genuine hospital-a was aggregated
    record = recorder.pop_round()
    assert list(record["sites"]) == ["hospital-a"]
    assert record["failed"] == {
        "node-13": "identity: node 13 claimed the name 'hospital-a' of node 11",
        "hospital-b": "identity: node 12 reported as 'hospital-c', but it is 'hospital-b' in this run",
    }
    assert record["nodes"] == {"hospital-a": 11, "node-13": 13, "hospital-b": 12}
    lines = read_jsonl(run.path / SITES_FILE)
    assert [(line["round"], line["site"], line["node"]) for line in lines] == [
        (1, "hospital-a", 11), (1, "hospital-b", 12), (2, "hospital-a", 11)]


# ------------------------------------------------- 26.6: paths confined to the site, salted keys, uniform errors
DICOM = ("data.dataset=dicom", "data.dicom_test_fraction=0.25", "data.dicom_label_names=normal,pneumonia",
         "data.dicom_channels=1", "train.batch_size=8")


@pytest.fixture
def dicom_site(real_site, shared_data_dir: Path):
    """``real_site`` whose data-dir is a 40-image DICOM demo site (fake patients)."""
    if not (shared_data_dir / "pneumoniamnist.npz").is_file():
        pytest.skip("pneumoniamnist.npz not in the shared data folder")
    from federation.data.dicom import make_demo_site

    make_demo_site(source="pneumoniamnist", data_dir_of_npz=shared_data_dir, out_dir=real_site.data_dir,
                   count=40, seed=5)
    return real_site


def test_paths_outside_the_site_are_refused_and_every_failure_looks_the_same(
    dicom_site, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from client.guard import SITE_ERROR_REASON

    outside = dicom_site.coordinator_dir
    outside.mkdir()
    shutil.copy(dicom_site.data_dir / "labels.csv", outside / "labels.csv")  # readable, and a valid labels file
    hostile = {
        "absolute labels": f"data.dicom_labels={outside / 'labels.csv'}",
        "../ labels": "data.dicom_labels=../coordinator/labels.csv",
        "missing outside": f"data.dicom_labels={outside / 'nothing.csv'}",
        "index elsewhere": f"data.dicom_cache_dir={outside / 'index'}",
        "missing inside": "data.dicom_labels=nothing.csv",  # an ordinary failure: the same reply
    }
    with caplog.at_level(logging.ERROR):  # one run each: a site fixes a run's data settings at its first evaluation
        replies = {what: dicom_site.evaluate(*DICOM, override, run_name=f"probe-{i}")
                   for i, (what, override) in enumerate(hostile.items())}
    for what, reply in replies.items():
        assert reply.has_error() and reply.error.reason == SITE_ERROR_REASON, what
    assert sorted(p.name for p in outside.iterdir()) == ["labels.csv"]  # no index written there
    assert caplog.text.count("outside this site's own folders") == 4
    assert "data.dicom_cache_dir=" in caplog.text and "data.dicom_labels='../coordinator/labels.csv'" in caplog.text
    assert not dicom_site.evaluate(*DICOM, run_name="own").has_error()  # its own labels.csv, inside data-dir


def test_the_header_index_keys_patients_with_the_sites_own_salt(dicom_site) -> None:
    import hashlib
    import hmac
    import json

    import pydicom

    reply = dicom_site.evaluate(*DICOM, "data.dicom_cache_dir=index")  # relative: inside the site's state folder
    assert not reply.has_error(), reply.error
    disk = dicom_site.state_dir / dicom_site.name
    salt_file = disk / "patient-salt"
    assert salt_file.stat().st_mode & 0o777 == 0o600
    salt = bytes.fromhex(salt_file.read_text())
    assert len(salt) == 32
    (index,) = (disk / "index").glob("medfed-index-*.json")
    records = {r["path"]: r["patient_key"] for r in json.loads(index.read_text())["files"]}
    checked = 0
    for path in dicom_site.data_dir.rglob("*.dcm"):
        patient = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)
        key = records[path.relative_to(dicom_site.data_dir).as_posix()]
        assert key == hmac.new(salt, patient.encode(), hashlib.sha256).hexdigest()[:16]
        assert key != hashlib.sha256(patient.encode()).hexdigest()[:16]  # not matchable against a list of IDs
        checked += 1
    assert checked == 40
    assert not dicom_site.evaluate(*DICOM, "data.dicom_cache_dir=index").has_error()  # same salt next time
    assert bytes.fromhex(salt_file.read_text()) == salt


def test_deploy_supernode_requires_the_sites_own_folders_and_can_pin_the_app(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deploy.cli import deploy_app
    from deploy.commands import SuperNodeSpec, supernode_command

    base = dict(superlink="x:1", site_name="hospital-a", ca_cert=None, private_key=None, insecure=True)
    with pytest.raises(ValueError, match="needs --data-dir and --state-dir"):
        supernode_command(SuperNodeSpec(**base))
    with pytest.raises(ValueError, match="needs --state-dir: "):
        supernode_command(SuperNodeSpec(**base, data_dir="/data/a", state_dir=" "))
    missing = CliRunner().invoke(deploy_app, ["supernode", "--superlink", "x:1", "--site-name", "a", "--insecure",
                                              "--print", "--data-dir", "/data/a"])
    assert missing.exit_code == 2 and "--state-dir" in missing.output
    keys = tmp_path / "trusted.yaml"
    keys.write_text("fpk_reviewer: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake reviewer\n")
    cmd = supernode_command(SuperNodeSpec(**base, data_dir="/data/a", state_dir="/var/lib/medfed",
                                          trusted_entities=str(keys)))
    assert cmd[cmd.index("--trusted-entities") + 1] == str(keys)
    with pytest.raises(FileNotFoundError, match="--trusted-entities"):
        supernode_command(SuperNodeSpec(**base, data_dir="/d", state_dir="/s", trusted_entities=str(tmp_path / "x")))
