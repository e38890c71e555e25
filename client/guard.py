"""The site's outbound guard: a reply may carry model arrays and whitelisted numbers only.

Every Message a site sends is checked here before it leaves; anything else (a
string, an unexpected record or metric, an array that is not a model parameter) is
an error raised at the site, so a bug or a hostile config cannot leak data.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

#: Metric names a site may send after training.
TRAIN_METRICS = frozenset(
    {"num-examples", "train-loss", "epsilon", "delta", "noise-multiplier", "steps", "seconds"}
)
#: Metric names a site may send after evaluation.
EVALUATE_METRICS = frozenset({"num-examples", "loss", "auc", "accuracy"})
#: Config entries a site may send: its (public) name, and a refusal reason.
CONFIG_ENTRIES = {"site": frozenset({"name"}), "status": frozenset({"refused"})}


class OutboundViolation(RuntimeError):
    """A reply would carry something the site does not allow to leave."""


def check_reply(
    content: RecordDict, *, allowed_metrics: Iterable[str], parameter_names: Iterable[str] = ()
) -> RecordDict:
    """Raise :class:`OutboundViolation` unless ``content`` holds only allowed items.

    Args:
        content: The reply's RecordDict.
        allowed_metrics: Metric names permitted in the MetricRecord.
        parameter_names: Names the ArrayRecord may use (the model's parameters);
            empty means no ArrayRecord is allowed.

    Returns:
        ``content`` unchanged, for chaining.
    """
    allowed = frozenset(allowed_metrics)
    params = frozenset(parameter_names)
    for key, record in content.items():
        if isinstance(record, MetricRecord):
            extra = sorted(set(record.keys()) - allowed)
            if key != "metrics" or extra:
                raise OutboundViolation(f"metric record {key!r} carries non-whitelisted {extra}")
            for name, value in record.items():
                if not isinstance(value, (int, float)):
                    raise OutboundViolation(f"metric {name!r} is not a single number")
        elif isinstance(record, ArrayRecord):
            extra = sorted(set(record.keys()) - params)
            if key != "arrays" or extra:
                raise OutboundViolation(f"array record {key!r} carries non-parameter arrays {extra[:5]}")
        elif isinstance(record, ConfigRecord):
            entries = CONFIG_ENTRIES.get(key)
            if entries is None or set(record.keys()) - entries:
                raise OutboundViolation(f"config record {key!r} is not allowed to leave the site")
        else:
            raise OutboundViolation(f"record {key!r} of type {type(record).__name__} is not allowed")
    return content
