"""medfed aggregation strategies on Flower's Message API.

* :mod:`strategies.registry`: name -> builder registry, :func:`build_strategy`
  (see its docstring for how to register a new strategy).
* :mod:`strategies.builtin`: registrations of Flower's built-in strategies.
* :mod:`strategies.metrics`: NaN-safe weighted metric aggregation.
* :mod:`strategies.wrapper`: :class:`StrategyWrapper`, a delegating base class.
* :mod:`strategies.aligned`: :class:`AlignedMetricKeys` (sites may omit suppressed metrics).
* :mod:`strategies.quorum`: :class:`QuorumStrategy` (refusals, failures, quorum).
* :mod:`strategies.state`: save/restore server-side strategy state for resume.
* :mod:`strategies.streaming`: FedAvg-family aggregation in O(model) memory,
  bit-identical to Flower's (what the built-in fedavg-like names build).
* :mod:`strategies.compression`: decode fp16/int8 site updates (``train.transfer_dtype``).
* :mod:`strategies.schedule`: :class:`EvaluationSchedule`, evaluate every k-th round (``server.eval_every``).
"""

from strategies import builtin as _builtin  # noqa: F401  (registers the built-in strategies)
from strategies import reddi as _reddi  # noqa: F401  (registers fedadam-reddi)
from strategies.aligned import AlignedMetricKeys, align_metric_keys
from strategies.metrics import aggregate_metrics_nan_safe
from strategies.quorum import REFUSED_KEY, STATUS_KEY, QuorumStrategy, refusal_reason
from strategies.registry import (
    CommonStrategyKwargs,
    StrategyBuilder,
    available_strategies,
    build_strategy,
    common_strategy_kwargs,
    register_strategy,
)
from strategies.schedule import EvaluationSchedule, evaluation_due
from strategies.state import StrategyState, load_strategy_state, strategy_state
from strategies.wrapper import StrategyWrapper, iter_layers, unwrap

__all__ = [
    "AlignedMetricKeys",
    "REFUSED_KEY",
    "STATUS_KEY",
    "CommonStrategyKwargs",
    "EvaluationSchedule",
    "QuorumStrategy",
    "StrategyBuilder",
    "StrategyState",
    "StrategyWrapper",
    "aggregate_metrics_nan_safe",
    "align_metric_keys",
    "available_strategies",
    "build_strategy",
    "common_strategy_kwargs",
    "evaluation_due",
    "iter_layers",
    "load_strategy_state",
    "refusal_reason",
    "register_strategy",
    "strategy_state",
    "unwrap",
]
