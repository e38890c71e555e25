"""The coordinator's central evaluation, started while the sites evaluate."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from federation.config import StrategyConfig
from server.central_eval import CentralEvaluation, PrefetchCentralEvaluation
from strategies import EvaluationSchedule, build_strategy, evaluation_due


class _Recorder:
    """An ``evaluate`` that records which model it saw and in which thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        value = float(arrays["w"].numpy()[0])
        self.calls.append((value, threading.current_thread().name))
        return {"auc": value}


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.array([value]))})


@pytest.fixture
def central() -> Iterator[tuple[CentralEvaluation, _Recorder]]:
    recorder = _Recorder()
    evaluation = CentralEvaluation(recorder)
    yield evaluation, recorder
    evaluation.close()


def test_started_evaluation_runs_in_the_background_once(central: tuple[CentralEvaluation, _Recorder]) -> None:
    evaluation, recorder = central
    arrays = _arrays(0.25)
    evaluation.start(3, arrays)
    evaluation.start(3, arrays)  # a second start of the same round is ignored
    assert evaluation.result(3, arrays) == {"auc": 0.25}
    assert len(recorder.calls) == 1 and recorder.calls[0][1].startswith("medfed-central-eval")


def test_unstarted_or_stale_evaluation_runs_on_the_given_model(central: tuple[CentralEvaluation, _Recorder]) -> None:
    evaluation, recorder = central
    assert evaluation.result(1, _arrays(0.5)) == {"auc": 0.5}
    assert recorder.calls[-1][1] == threading.current_thread().name
    evaluation.start(2, _arrays(0.6))
    assert evaluation.result(2, _arrays(0.7)) == {"auc": 0.7}, "never the result of another model"


class _Grid:
    """Duck-typed Grid of three sites: training returns ``w + 1``, evaluation a metric."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            if message.metadata.message_type == MessageType.EVALUATE:
                content = RecordDict({"m": MetricRecord({"num-examples": 1, "acc": 1.0})})
            else:
                w = message.content.array_records["arrays"]["w"].numpy() + 1.0
                content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "m": MetricRecord({"num-examples": 1})})
            replies.append(Message(content, reply_to=message))
        return replies


@pytest.mark.usefixtures("flower_task_identity")
def test_prefetch_inside_flower_start_loop_evaluates_each_due_round_in_the_background(
    central: tuple[CentralEvaluation, _Recorder],
) -> None:
    """every=2 over 3 rounds: round 0 evaluates directly, rounds 2 and 3 in the background, round 1 not at all."""
    evaluation, recorder = central
    due = lambda rnd: evaluation_due(rnd, every=2, last_round=3)  # noqa: E731
    strategy = PrefetchCentralEvaluation(
        inner=EvaluationSchedule(inner=build_strategy(StrategyConfig(), num_sites=3), every=2, last_round=3),
        central=evaluation,
        due=due,
    )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        return MetricRecord(evaluation.result(server_round, arrays)) if due(server_round) else None

    result = strategy.start(grid=_Grid(), initial_arrays=_arrays(0.0), num_rounds=3,  # type: ignore[arg-type]
                            evaluate_fn=evaluate_fn)
    assert {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()} == {
        0: {"auc": 0.0}, 2: {"auc": 2.0}, 3: {"auc": 3.0}
    }
    assert [value for value, _ in recorder.calls] == [0.0, 2.0, 3.0]
    assert [name.startswith("medfed-central-eval") for _, name in recorder.calls] == [False, True, True]
