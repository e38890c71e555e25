"""Quorum enforcement: aggregate only when enough sites replied with real results.

Sites may *refuse* a round (for example when their differential-privacy budget is
spent) by replying with content that carries no arrays and a ConfigRecord under
:data:`STATUS_KEY` holding a string entry :data:`REFUSED_KEY` with the reason::

    RecordDict({"status": ConfigRecord({"refused": "privacy budget spent"}),
                "metrics": MetricRecord({"num-examples": 0})})

:class:`QuorumStrategy` removes refusals and error replies before the inner
strategy sees them, records why each site dropped out, and skips aggregation
(the global model stays unchanged) when fewer than ``min_replies`` valid replies
remain.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

logger = logging.getLogger(__name__)

STATUS_KEY = "status"
"""RecordDict key of the ConfigRecord a site uses to report its status."""
REFUSED_KEY = "refused"
"""ConfigRecord entry whose string value is the reason a site refused the round."""

NodeReason = tuple[int, str]
"""``(node id, reason)``."""


def refusal_reason(message: Message) -> str | None:
    """Return the refusal reason carried by a reply, or None if it is not a refusal.

    A refusal is a reply without error whose content has no ArrayRecord and a
    ConfigRecord under :data:`STATUS_KEY` with a string entry :data:`REFUSED_KEY`.

    Args:
        message: A reply message.

    Returns:
        The reason string, or None.
    """
    if message.has_error() or not message.has_content():
        return None
    content = message.content
    status = content.config_records.get(STATUS_KEY)
    if not isinstance(status, ConfigRecord):
        return None
    reason = status.get(REFUSED_KEY)
    if not isinstance(reason, str) or content.array_records:
        return None
    return reason


def _error_reason(message: Message) -> str:
    error = message.error
    return error.reason or f"error code {error.code}"


class QuorumStrategy(StrategyWrapper):
    """Filter refusals and failures out of replies and enforce a quorum.

    Args:
        inner: The strategy that aggregates the valid replies.
        min_replies: Fewest valid replies a round may aggregate (>= 1). Usually
            ``min(config.strategy.min_sites, config.data.num_sites)``.

    Attributes:
        min_replies: The quorum.
        last_refusals: ``(node id, reason)`` of the refusals in the latest
            ``aggregate_train`` call.
        last_failures: ``(node id, reason)`` of the error replies in the latest
            ``aggregate_train`` call.
        last_evaluate_refusals: As ``last_refusals``, for ``aggregate_evaluate``.
        last_evaluate_failures: As ``last_failures``, for ``aggregate_evaluate``.
    """

    def __init__(self, *, inner: Strategy, min_replies: int) -> None:
        super().__init__(inner=inner)
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
            raise ValueError(f"min_replies must be an integer >= 1, got {min_replies!r}.")
        self.min_replies = min_replies
        self.last_refusals: list[NodeReason] = []
        self.last_failures: list[NodeReason] = []
        self.last_evaluate_refusals: list[NodeReason] = []
        self.last_evaluate_failures: list[NodeReason] = []

    def summary(self) -> None:
        """Log the quorum, then the inner strategy's summary."""
        logger.info("QuorumStrategy: at least %d valid replies per round", self.min_replies)
        super().summary()

    def _partition(
        self, server_round: int, replies: Iterable[Message], stage: str
    ) -> tuple[list[Message], list[NodeReason], list[NodeReason]]:
        """Split replies into valid ones, refusals and failures, logging the latter two."""
        valid: list[Message] = []
        refusals: list[NodeReason] = []
        failures: list[NodeReason] = []
        for message in replies:
            node_id = message.metadata.src_node_id
            if message.has_error() or not message.has_content():
                failures.append((node_id, _error_reason(message) if message.has_error() else "empty reply"))
                logger.warning("Round %d %s: node %d failed (%s)", server_round, stage, node_id, failures[-1][1])
                continue
            reason = refusal_reason(message)
            if reason is not None:
                refusals.append((node_id, reason))
                logger.warning("Round %d %s: node %d refused (%s)", server_round, stage, node_id, reason)
                continue
            valid.append(message)
        return valid, refusals, failures

    def _below_quorum(self, server_round: int, stage: str, num_valid: int, num_replies: int) -> bool:
        """Return True (and log a warning) if ``num_valid`` is below the quorum."""
        if num_valid >= self.min_replies:
            return False
        logger.warning(
            "Round %d %s below quorum: %d of %d required valid replies (%d received); skipping aggregation.",
            server_round,
            stage,
            num_valid,
            self.min_replies,
            num_replies,
        )
        return True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid training replies if a quorum replied.

        Args:
            server_round: The current round, from 1.
            replies: Reply messages from the sites.

        Returns:
            The inner strategy's result on the valid replies, or ``(None, None)``
            (global model unchanged) when fewer than ``min_replies`` are valid.
        """
        replies = list(replies)
        valid, self.last_refusals, self.last_failures = self._partition(server_round, replies, "train")
        if self._below_quorum(server_round, "train", len(valid), len(replies)):
            return None, None
        return super().aggregate_train(server_round, valid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate the valid evaluation replies if a quorum replied.

        A round with no evaluation replies at all (e.g. ``fraction_evaluate=0``)
        returns None without a warning.

        Args:
            server_round: The current round, from 1.
            replies: Reply messages from the sites.

        Returns:
            The inner strategy's metrics on the valid replies, or None below quorum.
        """
        replies = list(replies)
        valid, self.last_evaluate_refusals, self.last_evaluate_failures = self._partition(
            server_round, replies, "evaluate"
        )
        if not replies:
            return None
        if self._below_quorum(server_round, "evaluate", len(valid), len(replies)):
            return None
        return super().aggregate_evaluate(server_round, valid)
