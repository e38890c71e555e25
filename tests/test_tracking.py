"""Experiment tracking (server.tracking): the run's records logged to TensorBoard and MLflow, for real."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from federation.config import ConfigError, validate_config
from server.run_dir import PRIVACY_FILE, ROUNDS_FILE, RunDirectory
from server.tracking import RunTracker, TrackingError, open_tracker, round_metrics

RECORD = {
    "round": 2, "global": {"auc": 0.8, "loss": 0.5, "accuracy": None},
    "train": {"train-loss": 0.4}, "evaluate": {"loss": 0.6, "roc-tpr-00": 0.2},
    "sites": {"north": {"train": {"train-loss": 0.41, "epsilon": 3.0},
                        "evaluate": {"auc": 0.7, "roc-tpr-00": 0.1, "rel-bin-03-n": 4.0}}},
    "refused": {"south": "noise-too-low: 0.1"}, "failed": {}, "aggregated": True, "time": 12.0,
}


class ListSink:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.logged.append((step, metrics))

    def close(self) -> None:
        self.closed = True


def _run(tmp_path: Path, tracking: str = "none") -> tuple[RunDirectory, object]:
    config = validate_config({"name": "trk", "server": {"out_dir": str(tmp_path), "run_name": "trk-run",
                                                        "tracking": tracking}})
    return RunDirectory.create(config), config


def _record(run: RunDirectory, rnd: int, auc: float) -> None:
    run.append(PRIVACY_FILE, {"round": rnd, "site": "north", "epsilon": 1.5 * rnd, "delta": 1e-5})
    run.append(ROUNDS_FILE, {**RECORD, "round": rnd, "global": {"auc": auc, "loss": 0.5}})


def test_round_metrics_are_the_recorded_numbers() -> None:
    assert round_metrics(RECORD, {"north": 3.0}) == {
        "global/auc": 0.8, "global/loss": 0.5, "train/train-loss": 0.4, "evaluate/loss": 0.6,
        "site/north/evaluate/auc": 0.7, "site/north/train/epsilon": 3.0, "site/north/train/train-loss": 0.41,
        "epsilon/north": 3.0, "sites/trained": 1.0, "sites/refused": 1.0, "sites/failed": 0.0, "aggregated": 1.0,
    }


def test_tracker_reads_what_was_appended_and_survives_a_broken_sink(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    sink = ListSink()
    tracker = RunTracker(sink, run.path)
    _record(run, 1, 0.7)
    with open(run.path / ROUNDS_FILE, "a") as handle:
        handle.write('{"round": 2, "glob')  # being written
    assert tracker.update() == 1 and [s for s, _ in sink.logged] == [1]
    assert sink.logged[0][1]["epsilon/north"] == 1.5 and sink.logged[0][1]["global/auc"] == 0.7
    with open(run.path / ROUNDS_FILE, "a") as handle:
        handle.write('al": {"auc": 0.9}}\n')
    assert tracker.update() == 1 and sink.logged[1] == (2, {"global/auc": 0.9, "epsilon/north": 1.5, "aggregated": 0.0,
                                                            "sites/trained": 0.0, "sites/refused": 0.0,
                                                            "sites/failed": 0.0})
    assert tracker.update() == 0
    resumed = RunTracker(ListSink(), run.path, at_end=True)  # earlier rounds were tracked by the first process
    _record(run, 3, 0.95)
    assert resumed.update() == 1 and [s for s, _ in resumed.sink.logged] == [3]

    def broken(step: int, metrics: dict) -> None:
        raise OSError("disk full")

    sink.log = broken
    _record(run, 4, 0.96)
    assert tracker.update() == 0 and tracker.failed  # logged, never raised: the run goes on
    tracker.close()
    assert sink.closed


def test_tensorboard_event_files_hold_the_rounds(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="pip install 'medfed[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, config = _run(tmp_path, "tensorboard")
    tracker = open_tracker(config, run.path)
    _record(run, 0, 0.5)
    _record(run, 1, 0.75)
    assert tracker.update() == 2
    tracker.close()
    events = EventAccumulator(str(run.path / "tracking" / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("global/auc")] == [(0, 0.5), (1, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("epsilon/north")] == [(0, 0.0), (1, 1.5)]
    assert "site/north/evaluate/auc" in events.Tags()["scalars"]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_store_holds_the_rounds_and_the_config(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="pip install 'medfed[mlflow]' (mlflow-skinny)")
    from mlflow.tracking import MlflowClient

    run, config = _run(tmp_path, "mlflow")
    tracker = open_tracker(config, run.path)
    _record(run, 1, 0.75)
    _record(run, 2, 0.8)
    tracker.update()
    tracker.close()
    client = MlflowClient(tracking_uri=tracker.sink.uri)
    found = client.get_run(tracker.sink.run_id)
    assert found.info.status == "FINISHED" and found.data.tags["medfed.run"] == "trk-run"
    assert found.data.params["server.tracking"] == "mlflow" and found.data.params["strategy.name"] == "fedavg"
    history = client.get_metric_history(tracker.sink.run_id, "global/auc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.75), (2, 0.8)]
    assert sorted(m.value for m in client.get_metric_history(tracker.sink.run_id, "epsilon/north")) == [1.5, 3.0]
    again = open_tracker(config, run.path)  # resume: the same MLflow run, earlier rounds not logged twice
    assert again.sink.run_id == tracker.sink.run_id and again.update() == 0
    again.close()


def test_a_tracker_without_its_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    run, config = _run(tmp_path, "mlflow")
    with pytest.raises(TrackingError, match=r"pip install 'medfed\[mlflow\]'"):
        open_tracker(config, run.path)
    assert open_tracker(validate_config({}), run.path) is None  # server.tracking=none: nothing at all
    with pytest.raises(ConfigError, match="server.tracking"):
        validate_config({"server": {"tracking": "wandb"}})


def test_the_server_round_hook_feeds_the_tracker(tmp_path: Path) -> None:
    from server.app import _round_end_hook

    run, _ = _run(tmp_path)
    sink = ListSink()
    recorder = SimpleNamespace(true_round=lambda r: r, round_offset=0)
    hook = _round_end_hook(run=run, central=None, due=lambda r: True, recorder=recorder,
                           tracker=RunTracker(sink, run.path))
    assert hook(0, None) is None  # round 0: recorded, then tracked
    assert sink.logged == [(0, {})]
