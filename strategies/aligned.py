"""Give every reply's MetricRecord the same keys, so sites may omit suppressed metrics.

Flower's message-API strategies refuse to aggregate replies whose MetricRecords
have different key sets (``InconsistentMessageReplies``), and the round dies. In
medfed sites legitimately send different keys: a hospital suppresses a reliability
bin or a patient subgroup with fewer than ``clinical.min_group_size`` cases, so
"no number at all" is exactly what privacy asks of it.

:class:`AlignedMetricKeys` fills each reply's missing keys with ``nan`` before the
inner strategy aggregates. The NaN-safe aggregation
(:func:`strategies.metrics.aggregate_metrics_nan_safe`) then averages each metric
over the sites that reported it, so a suppressed value is neither invented nor
counted as zero. It sits *inside* the recording wrapper: what the run directory
stores for each site is what the site sent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import Message, MetricRecord

from strategies.wrapper import ReplyTransform

logger = logging.getLogger(__name__)


def align_metric_keys(replies: Iterable[Message]) -> list[Message]:
    """Add ``nan`` for every metric key some reply has and another lacks.

    Only replies with content and exactly one MetricRecord are aligned (the shape
    Flower's strategies accept); the union is taken per MetricRecord name. Keys
    whose values are lists are left alone: a ``nan`` cannot stand in for a list.

    Args:
        replies: Valid reply messages (errors and refusals already removed).

    Returns:
        The same messages, in the same order; their MetricRecords are replaced
        by copies that carry the union of keys.
    """
    replies = list(replies)
    single = [m for m in replies if not m.has_error() and m.has_content() and len(m.content.metric_records) == 1]
    union: dict[str, dict[str, object]] = {}
    for message in single:
        (name, record), = message.content.metric_records.items()
        keys = union.setdefault(name, {})
        for key, value in record.items():
            keys.setdefault(key, value)
    for message in single:
        (name, record), = message.content.metric_records.items()
        missing = [k for k, example in union[name].items() if k not in record and not isinstance(example, list)]
        if missing:
            filled = MetricRecord(dict(record))
            for key in missing:
                filled[key] = math.nan
            message.content[name] = filled
            logger.debug("reply from node %d lacks %d metrics; filled with nan", message.metadata.src_node_id,
                         len(missing))
    return replies


class AlignedMetricKeys(ReplyTransform):
    """Align metric keys across replies (see the module docstring), then delegate."""

    def transform(self, replies: Iterable[Message]) -> list[Message]:
        """The replies with :func:`align_metric_keys` applied."""
        return align_metric_keys(replies)
