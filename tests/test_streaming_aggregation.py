"""Streaming FedAvg-family aggregation equals Flower's aggregate_arrayrecords bit for bit, in O(model) memory."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from federation.config import StrategyConfig
from strategies import build_strategy
from strategies.streaming import (
    StreamingFedAdagrad,
    StreamingFedAdam,
    StreamingFedAvg,
    StreamingFedAvgM,
    StreamingFedProx,
    StreamingFedYogi,
    aggregate_arrayrecords_streaming,
    array_view,
)

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (2, 72), "fc.bias": (2,), "scale": ()}


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # see conftest.py


def _content(rng: np.random.Generator, *, weight: float, dtype=np.float32, shapes=SHAPES) -> RecordDict:
    arrays = {name: Array(rng.standard_normal(shape).astype(dtype)) for name, shape in shapes.items()}
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": weight, "loss": 0.1})})


def _assert_identical(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert list(got.keys()) == list(expected.keys())
    for name in expected:
        a, b = got[name].numpy(), expected[name].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), name  # bit for bit, not approximately


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("num_replies", [1, 2, 7])
def test_equals_flower_bit_for_bit(dtype, num_replies: int, workers: int) -> None:
    rng = np.random.default_rng(num_replies)
    weights = [float(w) for w in rng.integers(1, 500, size=num_replies)]
    records = [_content(rng, weight=w, dtype=dtype) for w in weights]
    _assert_identical(
        aggregate_arrayrecords_streaming(records, "num-examples", workers=workers),
        aggregate_arrayrecords(records, "num-examples"),
    )


def test_fortran_ordered_and_mixed_dtype_replies_fall_back_to_flowers_expression() -> None:
    rng = np.random.default_rng(3)
    records = [_content(rng, weight=w) for w in (3.0, 5.0, 11.0)]
    weird = np.asfortranarray(rng.standard_normal((2, 72)).astype(np.float32))
    records[1]["arrays"]["fc.weight"] = Array(weird)
    records[2]["arrays"]["conv.bias"] = Array(rng.standard_normal(8))  # float64 among float32
    _assert_identical(
        aggregate_arrayrecords_streaming(records, "num-examples"), aggregate_arrayrecords(records, "num-examples")
    )


def test_array_view_shares_the_reply_bytes() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = Array(values)
    view = array_view(array)
    np.testing.assert_array_equal(view, values)
    assert not view.flags.writeable and not view.flags.owndata  # a view on array.data, no copy
    buffer = io.BytesIO()
    np.save(buffer, values)
    assert view.base is not None


def _reply(content: RecordDict, node: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content, reply_to=instruction)


@pytest.mark.parametrize(
    ("name", "stock", "streaming"),
    [
        ("fedavg", FedAvg, StreamingFedAvg),
        ("fedprox", FedProx, StreamingFedProx),
        ("fedavgm", FedAvgM, StreamingFedAvgM),
        ("fedadam", FedAdam, StreamingFedAdam),
        ("fedyogi", FedYogi, StreamingFedYogi),
        ("fedadagrad", FedAdagrad, StreamingFedAdagrad),
    ],
)
def test_registry_builds_streaming_strategies_that_match_flowers_over_rounds(name, stock, streaming) -> None:
    built = build_strategy(StrategyConfig(name=name), num_sites=3)
    assert type(built) is streaming and isinstance(built, stock)
    reference = stock(**{k: getattr(built, k) for k in ("fraction_train", "fraction_evaluate", "min_train_nodes",
                                                        "min_evaluate_nodes", "min_available_nodes")})
    if hasattr(built, "eta"):
        for key in ("eta", "eta_l", "beta_1", "beta_2", "tau"):
            setattr(reference, key, getattr(built, key))
    if name == "fedavgm":
        reference.server_learning_rate, reference.server_momentum = built.server_learning_rate, built.server_momentum
        reference.server_opt = built.server_opt
    rng = np.random.default_rng(11)
    arrays_ref = arrays_new = ArrayRecord({k: Array(np.zeros(s, dtype=np.float32)) for k, s in SHAPES.items()})

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

    for server_round in (1, 2, 3):
        list(reference.configure_train(server_round, arrays_ref, ConfigRecord(), Grid()))
        list(built.configure_train(server_round, arrays_new, ConfigRecord(), Grid()))
        contents = [_content(rng, weight=float(w)) for w in (10, 20, 35)]
        replies = [_reply(c, node) for node, c in enumerate(contents, start=1)]
        arrays_ref, metrics_ref = reference.aggregate_train(server_round, replies)
        arrays_new, metrics_new = built.aggregate_train(server_round, replies)
        _assert_identical(arrays_new, arrays_ref)
        assert dict(metrics_new) == dict(metrics_ref)


def test_extra_memory_is_one_model_not_one_per_reply() -> None:
    rng = np.random.default_rng(0)
    shapes = {f"layer{i}": (64, 64, 3, 3) for i in range(24)}  # 885k float32 = 3.5 MB per reply
    model_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())
    layer_bytes = 64 * 64 * 9 * 4
    records = [_content(rng, weight=float(i + 1), shapes=shapes) for i in range(30)]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = aggregate_arrayrecords_streaming(records, "num-examples", workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the serialized result, plus a few layers in flight (sum, scratch, serialization buffer)
    assert peak - before < model_bytes + 6 * layer_bytes
    assert len(result) == len(shapes)
