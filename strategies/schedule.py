"""Evaluate every k-th round instead of every round (``server.eval_every``).

A federation of hundreds of rounds rarely needs the sites' and the coordinator's
evaluation after each one: on the synthetic 10-site preset the per-site evaluation
phase and the central evaluation were about a quarter of a steady round
(docs/BENCHMARKS.md, P1 session 6). :class:`EvaluationSchedule` sends no evaluation
instructions in the rounds between, so those rounds have no evaluation phase at
all; the last round of the run is always evaluated, so the final metrics, the
summary and the clinical report describe the final model as before. Round
numbers are the run's own (a resumed run keeps its schedule).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

logger = logging.getLogger(__name__)


def evaluation_due(server_round: int, *, every: int, last_round: int) -> bool:
    """Whether round ``server_round`` of a run of ``last_round`` rounds is evaluated.

    Round 0 (the initial model), every ``every``-th round and the last round are.

    Args:
        server_round: The run's round number (0 = before training).
        every: Evaluate every ``every``-th round (1 = every round).
        last_round: The run's planned number of rounds.
    """
    if every < 1:
        raise ValueError(f"server.eval_every must be >= 1, got {every}")
    return server_round % every == 0 or server_round >= last_round


class EvaluationSchedule(StrategyWrapper):
    """Ask the sites to evaluate only in the rounds :func:`evaluation_due` names.

    In the other rounds ``configure_evaluate`` returns no instructions (Flower's
    ``Strategy.start()`` then sends nothing and waits for nothing) and
    ``aggregate_evaluate`` returns ``None`` without consulting the inner strategy,
    exactly like a round in which ``strategy.fraction_evaluate`` sampled no site.

    Args:
        inner: The strategy that configures and aggregates evaluation when due.
        every: Evaluate every ``every``-th round (``server.eval_every``).
        last_round: The run's planned number of rounds (always evaluated).
    """

    def __init__(self, *, inner: Strategy, every: int, last_round: int) -> None:
        super().__init__(inner=inner)
        evaluation_due(0, every=every, last_round=last_round)  # validates ``every``
        self.every = every
        self.last_round = last_round

    def due(self, server_round: int) -> bool:
        """Whether ``server_round`` is evaluated."""
        return evaluation_due(server_round, every=self.every, last_round=self.last_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate when the round is due; otherwise no evaluation instructions."""
        if not self.due(server_round):
            logger.debug("round %d: no evaluation (server.eval_every=%d)", server_round, self.every)
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate when the round is due; otherwise ``None`` (nothing was asked)."""
        if not self.due(server_round):
            return None
        return super().aggregate_evaluate(server_round, replies)
