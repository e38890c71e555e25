"""NaN-safe weighted aggregation of the MetricRecords in site replies.

A hospital whose test split holds a single class reports ``auc = NaN``. Flower's
default ``aggregate_metricrecords`` would turn the federated AUC into NaN for the
whole round; :func:`aggregate_metrics_nan_safe` averages over the sites that
reported a number instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import cast

from flwr.app import MetricRecord, RecordDict

logger = logging.getLogger(__name__)

_Number = int | float


def _is_nan(value: _Number) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _weighted_mean(pairs: Sequence[tuple[float, _Number]]) -> float:
    """Weighted mean of ``(weight, value)`` pairs, skipping NaN values (NaN if none left)."""
    kept = [(w, v) for w, v in pairs if not _is_nan(v)]
    total = math.fsum(w for w, _ in kept)
    if not kept or total == 0.0:
        return math.nan
    return math.fsum(w * v for w, v in kept) / total


def aggregate_metrics_nan_safe(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted average of every metric in the replies' MetricRecords, ignoring NaN.

    Drop-in replacement for Flower's ``aggregate_metricrecords`` with the signature
    Flower expects for ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``
    (``(list[RecordDict], str) -> MetricRecord``). Like Flower's version it takes
    each reply's weight from ``weighting_key`` in its first MetricRecord, averages
    every key of every MetricRecord, averages list-valued metrics element-wise and
    leaves ``weighting_key`` itself out of the result.

    Unlike Flower's version, each metric (and each list element) is normalised by
    the total weight of the replies that reported a non-NaN value for it, so a
    NaN from one site does not poison the average. A metric that is NaN (or
    missing) everywhere, or whose remaining weights sum to zero, is NaN. Replies
    whose weight is NaN are skipped entirely.

    Args:
        records: Contents of the reply messages.
        weighting_key: MetricRecord key holding each reply's weight, e.g.
            ``"num-examples"``.

    Returns:
        The aggregated metrics (floats, or lists of floats), without ``weighting_key``.

    Raises:
        KeyError: If a reply's first MetricRecord has no ``weighting_key``.
        ValueError: If a list-valued metric has different lengths (or is a scalar
            in some replies), or a reply carries no MetricRecord.
    """
    collected: dict[str, list[tuple[float, _Number | list[_Number]]]] = {}
    for record in records:
        metric_records = list(record.metric_records.values())
        if not metric_records:
            raise ValueError("A reply carries no MetricRecord; cannot aggregate metrics.")
        weight = float(cast(_Number, metric_records[0][weighting_key]))
        if math.isnan(weight):
            logger.warning("Skipping a reply whose %r is NaN in metric aggregation.", weighting_key)
            continue
        for metric_record in metric_records:
            for key, value in metric_record.items():
                if key != weighting_key:
                    collected.setdefault(key, []).append((weight, cast(_Number | list[_Number], value)))

    aggregated = MetricRecord()
    for key, pairs in collected.items():
        if all(not isinstance(value, list) for _, value in pairs):
            aggregated[key] = _weighted_mean(cast(list[tuple[float, _Number]], pairs))
            continue
        lengths = {len(value) if isinstance(value, list) else -1 for _, value in pairs}
        if len(lengths) != 1 or -1 in lengths:
            raise ValueError(f"Metric {key!r} has mismatched list lengths or types across replies.")
        size = lengths.pop()
        aggregated[key] = [
            _weighted_mean([(weight, cast(list[_Number], value)[i]) for weight, value in pairs]) for i in range(size)
        ]
    return aggregated
