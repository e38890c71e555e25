"""Site-only data (DICOM): the coordinator holds no images (issue 19, item 2).

The model's shape comes from the run config; central evaluation needs the
coordinator's own validation folder; a site whose data disagrees with the declared
classes or channels refuses with ``data-mismatch`` instead of failing.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

import federation.data.registry as registry
from client.app import app as client_app
from client.site import site_settings, train_round
from federation.config import ConfigError, dataset_problems, load_config, to_flat
from federation.data import DataMismatch, is_site_only
from federation.data.dicom import make_demo_site
from federation.models import build_model
from server.app import _initial_model
from server.central_eval import central_test_set
from server.run_dir import read_jsonl
from simulations.harness import resolve_config, simulate

DECLARED = ["data.dataset=dicom", "data.dicom_label_names=normal,pneumonia", "data.dicom_channels=1",
            "data.image_size=16", "model.width=4", "train.batch_size=8", "data.dicom_test_fraction=0.25"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> dict[str, Path]:
    """A grey pneumonia site, the same with only 'normal' labels, and a colour (retina) site."""
    for name in ("pneumoniamnist", "retinamnist"):
        if not (shared_data_dir / f"{name}.npz").is_file():
            pytest.skip(f"{name}.npz not in the shared data folder")
    tmp = tmp_path_factory.mktemp("site-only")
    grey = make_demo_site(source="pneumoniamnist", data_dir_of_npz=shared_data_dir, out_dir=tmp / "grey",
                          count=48, seed=3)
    one_class = make_demo_site(source="pneumoniamnist", data_dir_of_npz=shared_data_dir, out_dir=tmp / "normal",
                               count=24, seed=4)
    _keep_label(one_class / "labels.csv", "0")
    colour = make_demo_site(source="retinamnist", data_dir_of_npz=shared_data_dir, out_dir=tmp / "colour",
                            count=24, seed=5)
    _relabel(colour / "labels.csv", lambda label: str(int(label) % 2))  # two classes, like the run declares
    empty = tmp / "coordinator"
    empty.mkdir()
    return {"grey": grey, "one_class": one_class, "colour": colour, "empty": empty, "tmp": tmp}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _keep_label(path: Path, label: str) -> None:
    _write(path, [row for row in _rows(path) if row["label"] == label])


def _relabel(path: Path, how) -> None:
    _write(path, [{**row, "label": how(row["label"])} for row in _rows(path)])


def test_a_dicom_run_must_declare_classes_and_channels_all_problems_at_once(tmp_path: Path) -> None:
    assert is_site_only("dicom") and not is_site_only("synthetic")
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides=["data.dataset=dicom", f"server.out_dir={tmp_path}",
                                  "server.central_eval_dir=/nowhere"])
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == ["data.dicom_label_names", "data.dicom_channels"]
    assert "--set data.dicom_label_names=normal,pneumonia" in problems[0] and "set 1 (grayscale) or 3" in problems[1]
    assert dataset_problems(load_config(None, ["server.central_eval_dir=/data/val"])) == [
        "server.central_eval_dir: only for data that exists only at the sites (e.g. dicom); 'synthetic' is "
        "evaluated centrally on its pooled test split: set it to ''"]
    assert dataset_problems(load_config(None, DECLARED)) == []


def test_the_coordinator_builds_the_model_and_evaluates_without_images(sites: dict) -> None:
    config = load_config(None, [*DECLARED, f"data.data_dir={sites['empty']}"])
    model = _initial_model(config)  # an empty data folder: nothing is read
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 2)
    assert central_test_set(config) is None  # server.central_eval=true by default, but no images here
    own = load_config(None, [*DECLARED, f"data.data_dir={sites['empty']}", f"server.central_eval_dir={sites['grey']}"])
    images, labels = central_test_set(own).tensors
    assert images.shape == (48, 1, 16, 16) and sorted(set(labels.tolist())) == [0, 1]  # every image of the folder
    wrong = load_config(None, [*DECLARED, f"server.central_eval_dir={sites['colour']}"])
    with pytest.raises(ValueError, match="central_eval_dir=.*colour.*the run declares data.dicom_channels=1"):
        central_test_set(wrong)


def _message(kind: str, weights: dict, node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord({"server-round": 1, "run-name": "r"})})
    metadata = Metadata(run_id=5, message_id=f"{kind}-{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(content=content, metadata=metadata)


@pytest.mark.parametrize(("site", "reason"), [
    ("one_class", "data-mismatch: the site holds no image of declared class(es) 1 (0-based, of 2)"),
    ("colour", "data-mismatch: most of the site's images are colour (3 channel(s)), the run declares "
               "data.dicom_channels=1"),
])
def test_a_site_whose_data_disagrees_refuses_training_and_evaluation(sites: dict, site: str, reason: str) -> None:
    config = load_config(None, [*DECLARED, f"data.data_dir={sites['empty']}", "data.num_sites=1",
                                "strategy.min_sites=1"])
    weights = build_model(config.model, in_channels=1, num_classes=2, dp=True).state_dict()
    node_config = {"site-name": "north", "data-dir": str(sites[site]), "state-dir": str(sites["tmp"] / f"state-{site}")}
    context = Context(run_id=5, node_id=1, node_config=node_config, state=RecordDict(), run_config=to_flat(config))
    for kind in ("train", "evaluate"):
        reply = client_app(_message(kind, weights, 1), context)
        assert not reply.has_error() and "arrays" not in reply.content and "metrics" not in reply.content
        assert reply.content["status"]["refused"] == reason
    settings = site_settings(node_config=node_config, config=config, run_name="r")
    assert train_round(config=config, settings=settings, global_weights=weights, server_round=1).refusal == reason
    assert not (settings.state_dir / "ledger.json").is_file() or "r" not in (settings.state_dir / "ledger.json").read_text()


def test_a_dicom_simulation_completes_without_data_at_the_coordinator(
    sites: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two simulated DICOM sites, one round; the coordinator (this process) never reads an image."""
    config = resolve_config(overrides=[
        *DECLARED, f"data.data_dir={sites['grey']}", "data.num_sites=2", "strategy.min_sites=2", "server.rounds=1",
        "data.dicom_test_fraction=0.5",  # 12 test images a site: enough for the clinical guard's smallest groups
        "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000", f"server.out_dir={tmp_path}",
        "server.run_name=dicom",
    ])

    def no_data(*args, **kwargs):
        raise FileNotFoundError("the coordinator holds no images")

    monkeypatch.setattr(registry, "_load_cached", no_data)  # the sites are Ray workers: their own processes
    run = simulate(config)
    rounds = read_jsonl(run / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and all(r["global"] == {} for r in rounds)
    assert rounds[1]["aggregated"] and sorted(rounds[1]["sites"]) == ["site-1", "site-2"]
    assert all("auc" in site["evaluate"] for site in rounds[1]["sites"].values())  # the run's metrics
