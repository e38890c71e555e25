"""Quantized update transfer (train.transfer_dtype): codec bounds, outbound guard, server decoding, a real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.guard import TRAIN_METRICS, OutboundViolation, check_reply
from client.transfer import update_record
from federation.compression import SCALE_SUFFIX, decode_update, encode_update, transfer_layout
from server.run_dir import read_jsonl
from strategies.compression import TransferDecodingStrategy, with_transfer_decoding
from strategies.streaming import StreamingFedAvg

SHAPES = {"conv.weight": (6, 1, 3, 3), "conv.bias": (6,), "fc.weight": (2, 24), "fc.bias": (2,)}


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # see conftest.py


def _weights(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def _pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(global, trained) with a small update, as after a round of local SGD."""
    global_w = _weights(seed)
    update = _weights(seed + 100, scale=0.01)
    return global_w, {name: global_w[name] + update[name] for name in global_w}


def _np(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in weights.items()}


def test_fp32_is_the_trained_weights_unchanged() -> None:
    global_w, trained = _pair()
    encoded = encode_update(trained, global_w, dtype="fp32")
    assert all(np.array_equal(encoded[k], trained[k].numpy()) for k in SHAPES)
    decoded = decode_update(encoded, _np(global_w))
    assert all(np.array_equal(decoded[k], trained[k].numpy()) for k in SHAPES)


def test_fp16_error_is_half_precision_rounding_of_the_update() -> None:
    global_w, trained = _pair()
    encoded = encode_update(trained, global_w, dtype="fp16")
    assert {k: (v.shape, str(v.dtype)) for k, v in encoded.items()} == {
        k: v for k, v in transfer_layout(SHAPES, dtype="fp16").items()
    }
    decoded = decode_update(encoded, _np(global_w))
    for name in SHAPES:
        delta = trained[name].numpy() - global_w[name].numpy()
        error = np.abs(decoded[name] - trained[name].numpy())
        assert decoded[name].dtype == np.float32
        # fp16 relative rounding 2^-11 of the delta, plus float32 rounding of the sum
        assert np.all(error <= np.abs(delta) * 2.0**-11 + np.abs(trained[name].numpy()) * 2.0**-23 + 1e-12)


def test_int8_error_is_at_most_half_a_step_per_output_channel() -> None:
    global_w, trained = _pair(3)
    encoded = encode_update(trained, global_w, dtype="int8")
    layout = transfer_layout(SHAPES, dtype="int8")
    assert {k: (v.shape, str(v.dtype)) for k, v in encoded.items()} == layout
    assert layout["conv.weight" + SCALE_SUFFIX] == ((6,), "float32")
    assert layout["fc.bias" + SCALE_SUFFIX] == ((1,), "float32")
    decoded = decode_update(encoded, _np(global_w))
    for name in SHAPES:
        delta = (trained[name].numpy() - global_w[name].numpy()).reshape(encoded[name + SCALE_SUFFIX].shape[0], -1)
        step = np.abs(delta).max(axis=1) / 127.0
        error = np.abs(decoded[name] - trained[name].numpy()).reshape(delta.shape)
        assert np.all(error <= step[:, None] / 2 + 1e-6 * (1 + np.abs(delta)))
        assert np.abs(encoded[name]).max() == 127  # the largest change uses the full range


def test_int8_of_an_unchanged_model_is_exact() -> None:
    global_w = _weights(5)
    encoded = encode_update(global_w, global_w, dtype="int8")
    assert all(not encoded[k].any() for k in SHAPES)
    decoded = decode_update(encoded, _np(global_w))
    assert all(np.array_equal(decoded[k], global_w[k].numpy()) for k in SHAPES)


def test_decode_rejects_updates_that_do_not_fit_the_model() -> None:
    global_w, trained = _pair()
    encoded = encode_update(trained, global_w, dtype="int8")
    del encoded["fc.bias" + SCALE_SUFFIX]
    with pytest.raises(ValueError, match="without 'fc.bias:int8-scale'"):
        decode_update(encoded, _np(global_w))
    with pytest.raises(ValueError, match="lacks 'fc.bias'"):
        decode_update({k: v for k, v in encoded.items() if k != "fc.bias"}, _np(global_w))
    with pytest.raises(ValueError, match="transfer_dtype must be one of"):
        encode_update(trained, global_w, dtype="int4")


def _content(global_w, trained, dtype: str) -> RecordDict:
    return RecordDict(
        {
            "site": ConfigRecord({"name": "site-1"}),
            "arrays": update_record(trained, global_w, transfer_dtype=dtype),
            "metrics": MetricRecord({"num-examples": 10.0, "train-loss": 0.5}),
        }
    )


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_guard_passes_the_configured_encoding(dtype: str) -> None:
    global_w, trained = _pair()
    content = _content(global_w, trained, dtype)
    assert check_reply(content, allowed_metrics=TRAIN_METRICS, parameter_shapes=SHAPES, transfer_dtype=dtype) is content


@pytest.mark.parametrize(
    ("sent", "declared", "message"),
    [
        ("fp32", "int8", "lacks update entries"),  # no scales
        ("fp16", "int8", "lacks update entries"),
        ("int8", "fp16", "non-parameter arrays"),  # the scales are not parameters under fp16
        ("fp32", "fp16", "the float16"),
    ],
)
def test_guard_rejects_any_other_layout(sent: str, declared: str, message: str) -> None:
    global_w, trained = _pair()
    content = _content(global_w, trained, sent)
    with pytest.raises(OutboundViolation, match=message):
        check_reply(content, allowed_metrics=TRAIN_METRICS, parameter_shapes=SHAPES, transfer_dtype=declared)


def test_guard_rejects_extra_arrays_in_an_encoded_update() -> None:
    global_w, trained = _pair()
    content = _content(global_w, trained, "int8")
    content["arrays"]["pixels"] = Array(np.zeros((28, 28), dtype=np.int8))
    with pytest.raises(OutboundViolation, match="non-parameter arrays \\['pixels'\\]"):
        check_reply(content, allowed_metrics=TRAIN_METRICS, parameter_shapes=SHAPES, transfer_dtype="int8")


def _reply(content: RecordDict, node: int) -> Message:
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_server_decodes_before_aggregating(dtype: str) -> None:
    global_w = _weights(0)
    torch.manual_seed(1)
    trained = [{k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in global_w.items()} for i in range(3)]
    strategy = with_transfer_decoding(StreamingFedAvg(), transfer_dtype=dtype)
    assert isinstance(strategy, TransferDecodingStrategy) == (dtype != "fp32")
    global_record = ArrayRecord({k: Array(v.numpy()) for k, v in global_w.items()})
    list(strategy.configure_train(1, global_record, ConfigRecord(), _Grid()))
    replies = [_reply(_content(global_w, w, dtype), node) for node, w in enumerate(trained, start=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # what FedAvg makes of the decoded weights
    decoded = [decode_update(encode_update(w, global_w, dtype=dtype), _np(global_w)) for w in trained]
    expected, _ = FedAvg().aggregate_train(
        1, [_reply(_content(global_w, {k: torch.from_numpy(v) for k, v in d.items()}, "fp32"), n)
            for n, d in enumerate(decoded, start=1)]
    )
    exact, _ = FedAvg().aggregate_train(1, [_reply(_content(global_w, w, "fp32"), n) for n, w in enumerate(trained, 1)])
    for name in SHAPES:
        np.testing.assert_array_equal(arrays[name].numpy(), expected[name].numpy())
        # fp16: 2^-11 of the largest change (~0.15); int8: half a step of 0.15 / 127
        tolerance = {"fp32": 0.0, "fp16": 1e-4, "int8": 2e-3}[dtype]
        np.testing.assert_allclose(arrays[name].numpy(), exact[name].numpy(), rtol=0, atol=tolerance)


@pytest.mark.integration
def test_a_simulated_run_with_int8_updates_aggregates_every_site(tmp_path: Path) -> None:
    from simulations.harness import resolve_config, simulate

    config = resolve_config(
        overrides=[
            "data.num_sites=2", "data.num_samples=160", "model.width=4", "train.batch_size=16",
            "strategy.min_sites=2", "server.rounds=1", "privacy.noise_multiplier=1.0",
            "privacy.target_epsilon=1000", "train.transfer_dtype=int8",
            f"server.out_dir={tmp_path}", "server.run_name=int8",
        ]
    )
    run_dir = simulate(config)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert rounds[-1]["aggregated"] is True and not rounds[-1]["failed"] and not rounds[-1]["refused"]
    assert sorted(rounds[-1]["sites"]) == ["site-1", "site-2"]
    weights = torch.load(run_dir / "checkpoints" / "round-0001.pt", weights_only=False)["weights"]
    assert all(torch.isfinite(v).all() for v in weights.values())
