"""Tests for the strategies package: registry, builders, NaN-safe metrics, quorum, state."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from federation.config import StrategyConfig
from strategies.reddi import FedAdamReddi
from strategies import (
    AlignedMetricKeys,
    EvaluationSchedule,
    QuorumStrategy,
    StrategyWrapper,
    aggregate_metrics_nan_safe,
    available_strategies,
    build_strategy,
    evaluation_due,
    load_strategy_state,
    register_strategy,
    strategy_state,
    unwrap,
)
from strategies import registry as registry_module
from strategies.streaming import (
    StreamingFedAdagrad,
    StreamingFedAdam,
    StreamingFedAvg,
    StreamingFedAvgM,
    StreamingFedProx,
    StreamingFedYogi,
)

EXPECTED_TYPES: dict[str, type[Strategy]] = {
    "bulyan": Bulyan,
    "fedadagrad": StreamingFedAdagrad,
    "fedadam": StreamingFedAdam,
    "fedadam-reddi": FedAdamReddi,
    "fedavg": StreamingFedAvg,
    "fedavgm": StreamingFedAvgM,
    "fedmedian": FedMedian,
    "fedprox": StreamingFedProx,
    "fedtrimmedavg": FedTrimmedAvg,
    "fedyogi": StreamingFedYogi,
    "krum": Krum,
    "multikrum": MultiKrum,
}


# --------------------------------------------------------------------------- helpers


def make_reply(
    node_id: int,
    arrays: dict[str, list[float]] | None = None,
    *,
    num_examples: int = 1,
    metrics: dict[str, float | list[float]] | None = None,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """Build a reply Message from ``node_id`` as a ClientApp would send it."""
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord(
            {name: Array(np.asarray(values, dtype=np.float64)) for name, values in arrays.items()}
        )
    content["metrics"] = MetricRecord({"num-examples": num_examples, **(metrics or {})})
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=message_type)
    return Message(content, reply_to=instruction)


def make_refusal(node_id: int, reason: str, *, message_type: str = MessageType.TRAIN) -> Message:
    """Build a refusal reply: a "status" ConfigRecord with "refused", and no arrays."""
    content = RecordDict(
        {"status": ConfigRecord({"refused": reason}), "metrics": MetricRecord({"num-examples": 0})}
    )
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=message_type)
    return Message(content, reply_to=instruction)


def make_error_reply(node_id: int, reason: str, *, message_type: str = MessageType.TRAIN) -> Message:
    """Build an error reply, as the SuperLink returns for a crashed or lost ClientApp."""
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=message_type)
    return Message(Error(code=1, reason=reason), reply_to=instruction)


def as_numpy(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    assert record is not None
    return {name: array.numpy() for name, array in record.items()}


class FakeGrid:
    """Duck-typed Grid: fixed node ids; replies computed by ``respond(message)``."""

    def __init__(self, node_ids: list[int], respond=None) -> None:  # type: ignore[no-untyped-def]
        self.node_ids = node_ids
        self.respond = respond

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.respond(message) for message in messages]


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # see conftest.py


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = dict(registry_module._REGISTRY)
    yield
    registry_module._REGISTRY.clear()
    registry_module._REGISTRY.update(saved)


# --------------------------------------------------------------------------- registry


def test_available_strategies_lists_all_builtins() -> None:
    assert available_strategies() == sorted(EXPECTED_TYPES)


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPES))
def test_build_every_strategy_with_defaults(name: str) -> None:
    if name == "bulyan":
        config, num_sites = StrategyConfig(name=name, num_malicious=1), 7
    else:
        config, num_sites = StrategyConfig(name=name), 5
    strategy = build_strategy(config, num_sites=num_sites)
    assert type(strategy) is EXPECTED_TYPES[name]
    assert isinstance(strategy, FedAvg)
    assert strategy.fraction_train == 1.0
    assert strategy.fraction_evaluate == 1.0
    assert strategy.min_train_nodes == strategy.min_evaluate_nodes == strategy.min_available_nodes == 2
    assert strategy.train_metrics_aggr_fn is aggregate_metrics_nan_safe
    assert strategy.evaluate_metrics_aggr_fn is aggregate_metrics_nan_safe
    assert strategy.weighted_by_key == "num-examples"


def test_node_minimums_follow_quorum_clamped_to_num_sites() -> None:
    strategy = build_strategy(StrategyConfig(min_sites=4, fraction_train=0.5, fraction_evaluate=0.25), num_sites=10)
    assert isinstance(strategy, FedAvg)
    assert (strategy.min_train_nodes, strategy.min_evaluate_nodes, strategy.min_available_nodes) == (4, 4, 4)
    assert (strategy.fraction_train, strategy.fraction_evaluate) == (0.5, 0.25)
    clamped = build_strategy(StrategyConfig(min_sites=4), num_sites=3)
    assert isinstance(clamped, FedAvg)
    assert (clamped.min_train_nodes, clamped.min_evaluate_nodes, clamped.min_available_nodes) == (3, 3, 3)


def test_parameters_are_mapped() -> None:
    fedprox = build_strategy(StrategyConfig(name="fedprox", proximal_mu=0.3), num_sites=5)
    assert isinstance(fedprox, FedProx) and fedprox.proximal_mu == 0.3

    fedavgm = build_strategy(StrategyConfig(name="fedavgm", server_lr=0.5, server_momentum=0.7), num_sites=5)
    assert isinstance(fedavgm, FedAvgM)
    assert (fedavgm.server_learning_rate, fedavgm.server_momentum, fedavgm.server_opt) == (0.5, 0.7, True)

    opt = {"eta": 0.2, "eta_l": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01}
    for name in ("fedadam", "fedyogi"):
        strategy = build_strategy(StrategyConfig(name=name, **opt), num_sites=5)
        assert isinstance(strategy, (FedAdam, FedYogi))
        got = (strategy.eta, strategy.eta_l, strategy.beta_1, strategy.beta_2, strategy.tau)
        assert got == (0.2, 0.05, 0.8, 0.95, 0.01)
    adagrad = build_strategy(StrategyConfig(name="fedadagrad", **opt), num_sites=5)
    assert isinstance(adagrad, FedAdagrad)
    assert (adagrad.eta, adagrad.eta_l, adagrad.tau, adagrad.beta_1, adagrad.beta_2) == (0.2, 0.05, 0.01, 0.0, 0.0)

    trimmed = build_strategy(StrategyConfig(name="fedtrimmedavg", trim_beta=0.3), num_sites=5)
    assert isinstance(trimmed, FedTrimmedAvg) and trimmed.beta == 0.3

    krum = build_strategy(StrategyConfig(name="krum", num_malicious=1), num_sites=5)
    assert isinstance(krum, Krum) and (krum.num_malicious_nodes, krum.num_nodes_to_select) == (1, 1)

    multikrum = build_strategy(StrategyConfig(name="multikrum", num_malicious=1), num_sites=5)
    assert isinstance(multikrum, MultiKrum) and (multikrum.num_malicious_nodes, multikrum.num_nodes_to_select) == (1, 4)
    multikrum = build_strategy(StrategyConfig(name="multikrum", num_malicious=1, num_to_keep=2), num_sites=5)
    assert isinstance(multikrum, MultiKrum) and multikrum.num_nodes_to_select == 2

    bulyan = build_strategy(StrategyConfig(name="bulyan", num_malicious=2), num_sites=11)
    assert isinstance(bulyan, Bulyan) and bulyan.num_malicious_nodes == 2


def test_name_lookup_is_case_insensitive() -> None:
    assert type(build_strategy(StrategyConfig(name="FedAvgM"), num_sites=3)) is StreamingFedAvgM


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_strategy(StrategyConfig(name="fedfoo"), num_sites=3)
    text = str(info.value)
    assert "strategy.name" in text and "'fedfoo'" in text
    for name in EXPECTED_TYPES:
        assert name in text


def test_bulyan_needs_4f_plus_3_sites() -> None:
    with pytest.raises(ValueError, match=r"data\.num_sites.*strategy\.num_malicious") as info:
        build_strategy(StrategyConfig(name="bulyan", num_malicious=1), num_sites=6)
    assert "7" in str(info.value) and "6" in str(info.value)
    build_strategy(StrategyConfig(name="bulyan", num_malicious=1), num_sites=7)


def test_krum_family_rejects_impossible_parameters() -> None:
    with pytest.raises(ValueError, match=r"strategy\.num_malicious=3.*data\.num_sites=3"):
        build_strategy(StrategyConfig(name="krum", num_malicious=3), num_sites=3)
    with pytest.raises(ValueError, match=r"strategy\.num_to_keep=6.*data\.num_sites=5"):
        build_strategy(StrategyConfig(name="multikrum", num_to_keep=6), num_sites=5)


def test_register_strategy(clean_registry: None) -> None:
    def builder(config: StrategyConfig, *, num_sites: int, **common: object) -> Strategy:
        return FedMedian(**common)  # type: ignore[arg-type]

    register_strategy("my-median", builder)
    assert "my-median" in available_strategies()
    built = build_strategy(StrategyConfig(name="my-median", min_sites=3), num_sites=4)
    assert type(built) is FedMedian and built.min_available_nodes == 3

    with pytest.raises(ValueError, match="already registered"):
        register_strategy("my-median", builder)
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("fedavg", builder)
    register_strategy("fedavg", builder, replace=True)
    assert type(build_strategy(StrategyConfig(name="fedavg"), num_sites=3)) is FedMedian
    with pytest.raises(ValueError, match="invalid strategy name .MyStrategy.: use lower-case"):
        register_strategy("MyStrategy", builder)


# --------------------------------------------------------------------------- exact aggregation


def test_fedavg_aggregates_exactly() -> None:
    strategy = build_strategy(StrategyConfig(name="fedavg"), num_sites=3)
    replies = [
        make_reply(1, {"w": [1.0, 2.0], "b": [0.0]}, num_examples=1, metrics={"loss": 1.0}),
        make_reply(2, {"w": [3.0, 4.0], "b": [4.0]}, num_examples=1, metrics={"loss": 2.0}),
        make_reply(3, {"w": [5.0, 6.0], "b": [8.0]}, num_examples=2, metrics={"loss": 4.0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = as_numpy(arrays)
    # weights 1/4, 1/4, 1/2
    np.testing.assert_array_equal(got["w"], np.array([3.5, 4.5]))
    np.testing.assert_array_equal(got["b"], np.array([5.0]))
    assert dict(metrics or {}) == {"loss": 2.75}


def test_fedmedian_aggregates_exactly() -> None:
    strategy = build_strategy(StrategyConfig(name="fedmedian"), num_sites=4)
    replies = [
        make_reply(1, {"w": [1.0, 10.0]}),
        make_reply(2, {"w": [2.0, 20.0]}),
        make_reply(3, {"w": [4.0, 40.0]}),
        make_reply(4, {"w": [100.0, -5.0]}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(as_numpy(arrays)["w"], np.array([3.0, 15.0]))


def test_fedtrimmedavg_aggregates_exactly() -> None:
    strategy = build_strategy(StrategyConfig(name="fedtrimmedavg", trim_beta=0.2), num_sites=5)
    columns = [(1.0, -50.0), (2.0, 0.0), (3.0, 1.0), (4.0, 2.0), (100.0, 3.0)]
    replies = [make_reply(i + 1, {"w": list(values)}) for i, values in enumerate(columns)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # int(0.2 * 5) = 1 value cut at each end: mean(2, 3, 4) = 3, mean(0, 1, 2) = 1
    np.testing.assert_array_equal(as_numpy(arrays)["w"], np.array([3.0, 1.0]))


def test_multikrum_drops_the_outlier() -> None:
    strategy = build_strategy(StrategyConfig(name="multikrum", num_malicious=1), num_sites=5)
    points = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (100.0, 100.0)]
    replies = [make_reply(i + 1, {"w": list(p)}) for i, p in enumerate(points)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(as_numpy(arrays)["w"], np.array([0.5, 0.5]))


# --------------------------------------------------------------------------- NaN-safe metrics


def test_nan_safe_metrics_exact() -> None:
    records = [
        make_reply(1, num_examples=2, metrics={"loss": 1.0, "auc": math.nan, "recall": [0.5, math.nan]}).content,
        make_reply(2, num_examples=1, metrics={"loss": 2.0, "auc": 0.5, "recall": [1.0, math.nan]}).content,
        make_reply(3, num_examples=1, metrics={"loss": 3.0, "auc": 1.0, "recall": [0.0, math.nan]}).content,
    ]
    result = aggregate_metrics_nan_safe(records, "num-examples")
    assert set(result) == {"loss", "auc", "recall"}  # weighting key left out, as Flower does
    assert result["loss"] == 1.75  # (2*1 + 2 + 3) / 4
    assert result["auc"] == 0.75  # (0.5 + 1.0) / 2: the NaN site is left out
    recall = result["recall"]
    assert isinstance(recall, list) and recall[0] == 0.5 and math.isnan(recall[1])


def test_nan_safe_metrics_all_nan_is_nan() -> None:
    records = [make_reply(i, num_examples=i, metrics={"auc": math.nan}).content for i in (1, 2)]
    assert math.isnan(float(aggregate_metrics_nan_safe(records, "num-examples")["auc"]))  # type: ignore[arg-type]


def test_nan_safe_metrics_match_flower_without_nan() -> None:
    def records() -> list[RecordDict]:
        return [
            make_reply(1, num_examples=1, metrics={"acc": 0.5, "per_class": [1.0, 0.0]}).content,
            make_reply(2, num_examples=3, metrics={"acc": 0.25, "per_class": [0.5, 1.0]}).content,
        ]

    ours = aggregate_metrics_nan_safe(records(), "num-examples")
    flower = aggregate_metricrecords(records(), "num-examples")
    assert dict(ours) == dict(flower) == {"acc": 0.3125, "per_class": [0.625, 0.75]}


# --------------------------------------------------------------------------- quorum


def _train_replies() -> list[Message]:
    return [
        make_reply(1, {"w": [1.0, 2.0]}, num_examples=1, metrics={"loss": 1.0}),
        make_refusal(2, "privacy budget spent"),
        make_reply(3, {"w": [3.0, 6.0]}, num_examples=3, metrics={"loss": 2.0}),
        make_error_reply(4, "CUDA out of memory"),
    ]


def test_quorum_filters_refusals_and_failures(caplog: pytest.LogCaptureFixture) -> None:
    strategy = QuorumStrategy(inner=build_strategy(StrategyConfig(), num_sites=4), min_replies=2)
    with caplog.at_level(logging.WARNING, logger="strategies"):
        arrays, metrics = strategy.aggregate_train(1, _train_replies())
    np.testing.assert_array_equal(as_numpy(arrays)["w"], np.array([2.5, 5.0]))
    assert dict(metrics or {}) == {"loss": 1.75}
    assert strategy.last_refusals == [(2, "privacy budget spent")]
    assert strategy.last_failures == [(4, "CUDA out of memory")]
    assert "node 2 refused (privacy budget spent)" in caplog.text
    assert "node 4 failed (CUDA out of memory)" in caplog.text
    assert "below quorum" not in caplog.text


def test_quorum_below_minimum_skips_aggregation(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    class Spy(StrategyWrapper):
        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            calls.append(server_round)
            return super().aggregate_train(server_round, replies)

    strategy = QuorumStrategy(inner=Spy(inner=FedAvg()), min_replies=3)
    with caplog.at_level(logging.WARNING, logger="strategies"):
        assert strategy.aggregate_train(5, _train_replies()) == (None, None)
    assert calls == []
    assert strategy.last_refusals == [(2, "privacy budget spent")]
    assert strategy.last_failures == [(4, "CUDA out of memory")]
    assert "Round 5 train below quorum: 2 of 3 required valid replies (4 received)" in caplog.text


def test_quorum_filters_evaluate_replies() -> None:
    evaluate = MessageType.EVALUATE
    replies = [
        make_reply(1, num_examples=1, metrics={"auc": 0.5}, message_type=evaluate),
        make_reply(2, num_examples=3, metrics={"auc": math.nan}, message_type=evaluate),
        make_reply(3, num_examples=1, metrics={"auc": 1.0}, message_type=evaluate),
        make_refusal(4, "no test data", message_type=evaluate),
        make_error_reply(5, "timeout", message_type=evaluate),
    ]
    strategy = QuorumStrategy(inner=build_strategy(StrategyConfig(), num_sites=5), min_replies=3)
    assert dict(strategy.aggregate_evaluate(1, replies) or {}) == {"auc": 0.75}
    assert strategy.last_evaluate_refusals == [(4, "no test data")]
    assert strategy.last_evaluate_failures == [(5, "timeout")]
    assert strategy.last_refusals == [] and strategy.last_failures == []
    strict = QuorumStrategy(inner=build_strategy(StrategyConfig(), num_sites=5), min_replies=4)
    assert strict.aggregate_evaluate(1, replies) is None
    assert strict.aggregate_evaluate(1, []) is None


def test_aligned_metric_keys_aggregates_replies_that_omit_suppressed_metrics() -> None:
    """A site that suppresses a small reliability bin sends fewer keys; the round must still aggregate."""
    evaluate = MessageType.EVALUATE

    def replies() -> list[Message]:
        return [
            make_reply(1, num_examples=1, metrics={"auc": 0.5, "rel-bin-03-obs": 0.2}, message_type=evaluate),
            make_reply(2, num_examples=3, metrics={"auc": 0.9}, message_type=evaluate),
            make_reply(3, num_examples=1, metrics={"auc": 0.7, "grp-sex-f-n": 12.0}, message_type=evaluate),
        ]

    with pytest.raises(InconsistentMessageReplies):
        build_strategy(StrategyConfig(), num_sites=3).aggregate_evaluate(1, replies())
    aligned = AlignedMetricKeys(inner=build_strategy(StrategyConfig(), num_sites=3))
    result = dict(aligned.aggregate_evaluate(1, replies()) or {})
    # Each metric is averaged over the sites that sent it, weighted by num-examples.
    assert result == {"auc": pytest.approx((0.5 + 3 * 0.9 + 0.7) / 5), "rel-bin-03-obs": 0.2, "grp-sex-f-n": 12.0}


def test_aligned_metric_keys_leaves_matching_replies_untouched() -> None:
    replies = [make_reply(1, {"w": [1.0]}, metrics={"loss": 1.0}), make_reply(2, {"w": [3.0]}, metrics={"loss": 3.0})]
    records = [r.content["metrics"] for r in replies]
    arrays, metrics = AlignedMetricKeys(inner=build_strategy(StrategyConfig(), num_sites=2)).aggregate_train(1, replies)
    assert arrays is not None and arrays["w"].numpy().tolist() == [2.0]
    assert dict(metrics or {}) == {"loss": 2.0}
    assert [r.content["metrics"] for r in replies] == records


def test_quorum_rejects_bad_minimum() -> None:
    with pytest.raises(ValueError, match="min_replies"):
        QuorumStrategy(inner=FedAvg(), min_replies=0)


def test_quorum_runs_inside_flower_start_loop() -> None:
    """Round 2 falls below quorum: Strategy.start() keeps the round-1 model."""
    current_round = {"n": 0}

    def respond(message: Message) -> Message:
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MessageType.EVALUATE:
            return Message(RecordDict({"m": MetricRecord({"num-examples": 1, "acc": float(node)})}), reply_to=message)
        current_round["n"] = int(message.content["config"]["server-round"])  # type: ignore[arg-type]
        if current_round["n"] == 2 and node != 1:
            return Message(RecordDict({"status": ConfigRecord({"refused": "budget"})}), reply_to=message)
        w = np.array([float(node), 2.0 * node])
        return Message(
            RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "m": MetricRecord({"num-examples": 1})}),
            reply_to=message,
        )

    strategy = QuorumStrategy(inner=build_strategy(StrategyConfig(min_sites=2), num_sites=3), min_replies=2)
    result = strategy.start(
        grid=FakeGrid([1, 2, 3], respond),  # type: ignore[arg-type]
        initial_arrays=ArrayRecord({"w": Array(np.zeros(2))}),
        num_rounds=2,
    )
    # Node sampling order is random, so the sums may differ in the last bit.
    np.testing.assert_allclose(result.arrays["w"].numpy(), np.array([2.0, 4.0]), rtol=1e-12)
    assert sorted(strategy.last_refusals) == [(2, "budget"), (3, "budget")]
    assert dict(result.evaluate_metrics_clientapp[2]) == {"acc": pytest.approx(2.0, rel=1e-12)}


def test_unwrap_follows_inner() -> None:
    inner = FedAvg()
    assert unwrap(QuorumStrategy(inner=StrategyWrapper(inner=inner), min_replies=1)) is inner
    assert unwrap(inner) is inner


# --------------------------------------------------------------------------- state


def _run_round(strategy: Strategy, server_round: int, global_w: np.ndarray, updates: list[list[float]]) -> np.ndarray:
    grid = FakeGrid([1, 2, 3])
    arrays = ArrayRecord({"w": Array(global_w)})
    list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
    replies = [make_reply(i + 1, {"w": u}, num_examples=i + 1) for i, u in enumerate(updates)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return as_numpy(arrays)["w"]


ROUND1 = [[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]]
ROUND2 = [[0.5, 0.25], [-1.0, 2.0], [4.0, 1.0]]


@pytest.mark.parametrize(
    "config",
    [
        StrategyConfig(name="fedadam", eta=0.1, beta_1=0.9, beta_2=0.99),
        StrategyConfig(name="fedyogi"),
        StrategyConfig(name="fedadagrad"),
        StrategyConfig(name="fedavgm", server_lr=0.5, server_momentum=0.9),
    ],
    ids=lambda c: c.name,
)
def test_strategy_state_round_trip(config: StrategyConfig, tmp_path) -> None:  # type: ignore[no-untyped-def]
    original = QuorumStrategy(inner=build_strategy(config, num_sites=3), min_replies=1)
    w1 = _run_round(original, 1, np.zeros(2), ROUND1)
    state = strategy_state(original)
    assert state and all(isinstance(v, np.ndarray) for v in state.values())

    # through a file, as a resume would do
    np.savez(tmp_path / "state.npz", **state)  # type: ignore[arg-type]
    with np.load(tmp_path / "state.npz") as loaded:
        restored_state = {key: loaded[key] for key in sorted(loaded.files, reverse=True)}
    resumed = QuorumStrategy(inner=build_strategy(config, num_sites=3), min_replies=1)
    load_strategy_state(resumed, restored_state)
    assert strategy_state(resumed).keys() == state.keys()
    for key, value in strategy_state(resumed).items():
        np.testing.assert_array_equal(value, state[key])

    w2_original = _run_round(original, 2, w1, ROUND2)
    w2_resumed = _run_round(resumed, 2, w1, ROUND2)
    np.testing.assert_array_equal(w2_resumed, w2_original)

    fresh = build_strategy(config, num_sites=3)
    assert not np.array_equal(_run_round(fresh, 2, w1, ROUND2), w2_original)  # the state matters


def test_fedadam_state_names_flower_attributes() -> None:
    strategy = build_strategy(StrategyConfig(name="fedadam"), num_sites=3)
    assert strategy_state(strategy) == {}
    _run_round(strategy, 1, np.zeros(2), ROUND1)
    assert isinstance(strategy, FedAdam) and strategy.m_t is not None and strategy.v_t is not None
    state = strategy_state(strategy)
    assert sorted(state) == ["fedopt/current_arrays/0/w", "fedopt/m_t/0/w", "fedopt/v_t/0/w"]
    np.testing.assert_array_equal(state["fedopt/m_t/0/w"], strategy.m_t["w"])
    np.testing.assert_array_equal(state["fedopt/v_t/0/w"], strategy.v_t["w"])
    state["fedopt/m_t/0/w"][0] = 123.0  # a copy: the strategy is untouched
    assert strategy.m_t["w"][0] != 123.0


def test_stateless_strategies_and_mismatched_state() -> None:
    fedavg = build_strategy(StrategyConfig(name="fedavg"), num_sites=3)
    _run_round(fedavg, 1, np.zeros(2), ROUND1)
    assert strategy_state(fedavg) == {}
    load_strategy_state(fedavg, {})
    fedadam = build_strategy(StrategyConfig(name="fedadam"), num_sites=3)
    _run_round(fedadam, 1, np.zeros(2), ROUND1)
    with pytest.raises(ValueError, match="do not belong to StreamingFedAvg"):
        load_strategy_state(fedavg, strategy_state(fedadam))


# --------------------------------------------------------------------------- evaluation schedule


def test_evaluation_due_every_kth_round_and_always_the_last() -> None:
    assert [r for r in range(8) if evaluation_due(r, every=3, last_round=7)] == [0, 3, 6, 7]
    assert [r for r in range(6) if evaluation_due(r, every=1, last_round=5)] == [0, 1, 2, 3, 4, 5]
    assert [r for r in range(5) if evaluation_due(r, every=10, last_round=4)] == [0, 4]
    with pytest.raises(ValueError, match="server.eval_every must be >= 1, got 0"):
        evaluation_due(1, every=0, last_round=3)
    with pytest.raises(ValueError, match="server.eval_every"):
        EvaluationSchedule(inner=FedAvg(), every=0, last_round=3)


def test_evaluation_schedule_skips_the_evaluate_phase_inside_flower_start_loop() -> None:
    """every=2 over 3 rounds: sites evaluate in rounds 2 and 3 only; training is unchanged."""
    sent: list[tuple[int, str]] = []

    def respond(message: Message) -> Message:
        node = message.metadata.dst_node_id
        rnd = int(message.content["config"]["server-round"])  # type: ignore[arg-type]
        sent.append((rnd, message.metadata.message_type))
        if message.metadata.message_type == MessageType.EVALUATE:
            return Message(RecordDict({"m": MetricRecord({"num-examples": 1, "acc": float(rnd)})}), reply_to=message)
        w = np.array([float(node + rnd)])
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "m": MetricRecord({"num-examples": node})}),
                       reply_to=message)

    def run(every: int):  # type: ignore[no-untyped-def]
        sent.clear()
        strategy = EvaluationSchedule(inner=build_strategy(StrategyConfig(), num_sites=3), every=every, last_round=3)
        result = strategy.start(grid=FakeGrid([1, 2, 3], respond),  # type: ignore[arg-type]
                                initial_arrays=ArrayRecord({"w": Array(np.zeros(1))}), num_rounds=3)
        return result, sorted(sent)

    scheduled, sent_scheduled = run(2)
    assert sent_scheduled == sorted([(r, MessageType.TRAIN) for r in (1, 2, 3) for _ in range(3)]
                                    + [(r, MessageType.EVALUATE) for r in (2, 3) for _ in range(3)])
    assert sorted(scheduled.evaluate_metrics_clientapp) == [2, 3]
    assert dict(scheduled.evaluate_metrics_clientapp[3]) == {"acc": pytest.approx(3.0, rel=1e-12)}
    every_round, sent_every = run(1)
    assert len(sent_every) == 18 and sorted(every_round.evaluate_metrics_clientapp) == [1, 2, 3]
    # the aggregated model is the same whether or not the sites evaluated: (1*4 + 2*5 + 3*6) / 6 in round 3
    np.testing.assert_array_equal(scheduled.arrays["w"].numpy(), every_round.arrays["w"].numpy())
    assert scheduled.arrays["w"].numpy().tolist() == [pytest.approx(32 / 6, rel=1e-12)]
