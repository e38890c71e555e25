"""Streaming weighted averaging for the FedAvg family, bit-identical to Flower's.

Flower 1.42's ``aggregate_arrayrecords`` deserializes every array of every reply
into a fresh NumPy copy (``Array.numpy()`` reads the ``.npy`` bytes into a new
buffer), multiplies it into another temporary and adds it to the running sum,
reply after reply: for 100 replies of a 7 M-parameter model that is 2.8 GB
copied, 2.8 GB of temporaries written, and an accumulator of the whole model
streamed through memory 100 times.

:func:`aggregate_arrayrecords_streaming` computes exactly the same numbers
(``acc = v_1 * f_1``, then ``acc += v_i * f_i`` in reply order, with Flower's
weight factors ``f_i = w_i / sum(w)``) but

* reads each reply's array *in place*: a zero-copy NumPy view on the ``.npy``
  bytes the reply already holds (``Array.numpy()`` only where the bytes are not a
  plain C-ordered array; :func:`strategies.flower_internals.array_view`);
* folds the replies into the running sum one array (layer) at a time, so the
  partial sum of a layer stays in the CPU cache while the replies stream past it,
  and only one scratch buffer of the largest layer is ever allocated (per worker
  thread: different layers are folded on up to four cores at once).

Extra memory is O(model) (the serialized result, plus one layer's sum and one
layer of scratch), independent of the number of replies. The replies themselves are held by Flower: in flwr 1.42
``Grid.send_and_receive`` (in-memory grid of the simulation and the gRPC grid
alike) returns a *list* once every reply is in, so they cannot be folded in as they
arrive without replacing Flower's round loop.

:class:`StreamingFedAvg` is FedAvg with this aggregation. Its subclasses
(:class:`StreamingFedProx`, :class:`StreamingFedAvgM`, :class:`StreamingFedAdam`,
:class:`StreamingFedYogi`, :class:`StreamingFedAdagrad`) put it *under* the
Flower class in the method resolution order (``FedAdam -> FedOpt ->
StreamingFedAvg -> FedAvg``), so their own ``aggregate_train`` (server momentum,
adaptive moments) runs unchanged on top of the streamed average.
Median, trimmed mean, Krum and Bulyan need every reply at once and keep Flower's
code.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from strategies.flower_internals import array_view, valid_replies

__all__ = [
    "StreamingFedAdagrad", "StreamingFedAdam", "StreamingFedAvg", "StreamingFedAvgM", "StreamingFedProx",
    "StreamingFedYogi", "aggregate_arrayrecords_streaming", "array_view",
]

def _weight_factors(records: Sequence[RecordDict], weighting_metric_name: str) -> list[float]:
    """Flower's weight factors ``w_i / sum(w)`` (same float operations, same order)."""
    weights = [
        cast(float, next(iter(record.metric_records.values()))[weighting_metric_name]) for record in records
    ]
    total_weight = sum(weights)
    return [w / total_weight for w in weights]


def _fold(contributions: list[tuple[int, Array]], factors: list[float], scratch: list[np.ndarray]) -> Array:
    """``sum(v_i * f_i)`` of one array over the replies, in reply order, as Flower computes it."""
    (first_index, first), rest = contributions[0], contributions[1:]
    first_view = array_view(first)
    total = np.asarray(first_view * factors[first_index])  # np.asarray: a 0-d product is a scalar
    for index, array in rest:
        view = array_view(array)
        if view.shape != total.shape or view.dtype != first_view.dtype:
            total += view * factors[index]  # unusual replies: Flower's exact expression
            continue
        if scratch[0].nbytes < total.nbytes:
            scratch[0] = np.empty(total.nbytes, dtype=np.uint8)
        term = scratch[0][: total.nbytes].view(total.dtype).reshape(total.shape)
        np.multiply(view, factors[index], out=term)
        np.add(total, term, out=total)
    return Array(total)  # serialized now: only one layer's float sum per worker is alive


def aggregate_arrayrecords_streaming(
    records: Sequence[RecordDict], weighting_metric_name: str, *, workers: int | None = None
) -> ArrayRecord:
    """Weighted average of the replies' ArrayRecords, equal bit for bit to Flower's ``aggregate_arrayrecords``.

    Args:
        records: Reply contents (already validated: one ArrayRecord and one
            MetricRecord each, the same array names everywhere).
        weighting_metric_name: Metric holding each reply's weight (``num-examples``).
        workers: Threads folding different arrays at once (NumPy releases the GIL
            in its loops); default ``min(4, cores)``. Each array is still summed in
            reply order, so the result does not depend on it.

    Returns:
        The aggregated ArrayRecord, with the array names and order of Flower's.
    """
    factors = _weight_factors(records, weighting_metric_name)
    by_key: dict[str, list[tuple[int, Array]]] = {}  # Flower's iteration order: reply, then array
    for index, record in enumerate(records):
        for array_record in record.array_records.values():
            for key, array in array_record.items():
                by_key.setdefault(key, []).append((index, array))
    workers = min(4, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    if workers == 1 or len(by_key) < 2:
        scratch = [np.empty(0, dtype=np.uint8)]
        return ArrayRecord({key: _fold(parts, factors, scratch) for key, parts in by_key.items()})
    local = threading.local()

    def fold(parts: list[tuple[int, Array]]) -> Array:
        if not hasattr(local, "scratch"):
            local.scratch = [np.empty(0, dtype=np.uint8)]
        return _fold(parts, factors, local.scratch)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        folded = list(pool.map(fold, by_key.values()))
    return ArrayRecord(dict(zip(by_key, folded)))


class StreamingFedAvg(FedAvg):
    """Flower's FedAvg, aggregating arrays with :func:`aggregate_arrayrecords_streaming`.

    Same constructor, same results; less memory and time per round.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate ArrayRecords and MetricRecords in the received Messages (as FedAvg does)."""
        valid = valid_replies(self, replies, is_train=True)  # FedAvg's own check
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        arrays = aggregate_arrayrecords_streaming(contents, self.weighted_by_key)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics


class StreamingFedProx(FedProx, StreamingFedAvg):
    """FedProx with streaming aggregation."""


class StreamingFedAvgM(FedAvgM, StreamingFedAvg):
    """FedAvgM (server momentum on top of the streamed average)."""


class StreamingFedAdam(FedAdam, StreamingFedAvg):
    """FedAdam (adaptive server step on top of the streamed average)."""


class StreamingFedYogi(FedYogi, StreamingFedAvg):
    """FedYogi (adaptive server step on top of the streamed average)."""


class StreamingFedAdagrad(FedAdagrad, StreamingFedAvg):
    """FedAdagrad (adaptive server step on top of the streamed average)."""
