"""A strategy wrapper that records what every site sent, round by round.

It wraps the configured (and quorum-guarded) strategy, so aggregation itself is
untouched: it only looks at the replies on their way in, writes per-site lines to
the run directory, and shifts round numbers when a run is resumed so that the
inner strategy and the sites see the true round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.run_dir import PRIVACY_FILE, SITES_FILE, RunDirectory
from strategies.wrapper import StrategyWrapper

logger = logging.getLogger(__name__)


def site_name(msg: Message) -> str:
    """The name a site gave in its reply, else ``node-<id>``."""
    if not msg.has_error():
        record = msg.content.get("site")
        if isinstance(record, ConfigRecord) and "name" in record:
            return str(record["name"])
    return f"node-{msg.metadata.src_node_id}"


def _metrics(msg: Message) -> dict[str, float]:
    for record in msg.content.metric_records.values():
        return {k: float(v) for k, v in record.items()}
    return {}


class RecordingStrategy(StrategyWrapper):
    """Record per-site replies and aggregated results; offset rounds on resume.

    Args:
        inner: The strategy that really aggregates.
        run: Where records go.
        round_offset: Rounds already completed before this process started.
    """

    def __init__(self, inner: Strategy, *, run: RunDirectory, round_offset: int = 0) -> None:
        super().__init__(inner=inner)
        self.run = run
        self.round_offset = round_offset
        self.current: dict[str, Any] = {}

    def true_round(self, server_round: int) -> int:
        """The round number of the whole run (``server_round`` counts from this process's start)."""
        return server_round + self.round_offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = {"round": self.true_round(server_round), "sites": {}, "refused": {}, "failed": {}}
        return super().configure_train(self.true_round(server_round), arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rnd = self.true_round(server_round)
        for msg in replies:
            name = site_name(msg)
            if msg.has_error():
                self.current["failed"][name] = msg.error.reason
                continue
            status = msg.content.get("status")
            if isinstance(status, ConfigRecord) and "refused" in status:
                self.current["refused"][name] = str(status["refused"])
                continue
            metrics = _metrics(msg)
            self.current["sites"][name] = {"train": metrics}
            self.run.append(SITES_FILE, {"round": rnd, "site": name, "phase": "train", "metrics": metrics})
            if "epsilon" in metrics:
                self.run.append(
                    PRIVACY_FILE,
                    {"round": rnd, "site": name, "epsilon": metrics["epsilon"], "delta": metrics.get("delta")},
                )
        arrays, aggregated = super().aggregate_train(rnd, replies)
        self.current["aggregated"] = arrays is not None
        self.current["train"] = dict(aggregated) if aggregated is not None else {}
        return arrays, aggregated

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(self.true_round(server_round), arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        rnd = self.true_round(server_round)
        for msg in replies:
            name = site_name(msg)
            if msg.has_error():
                self.current.setdefault("failed", {})[name] = msg.error.reason
                continue
            status = msg.content.get("status")
            if isinstance(status, ConfigRecord) and "refused" in status:  # e.g. data-mismatch, model-not-allowed
                self.current.setdefault("refused", {}).setdefault(name, str(status["refused"]))
                continue
            metrics = _metrics(msg)
            self.current.setdefault("sites", {}).setdefault(name, {})["evaluate"] = metrics
            self.run.append(SITES_FILE, {"round": rnd, "site": name, "phase": "evaluate", "metrics": metrics})
        aggregated = super().aggregate_evaluate(rnd, replies)
        self.current["evaluate"] = dict(aggregated) if aggregated is not None else {}
        return aggregated

    def pop_round(self) -> dict[str, Any]:
        """The record of the round just finished (and start a new one)."""
        record, self.current = self.current, {}
        return record
