"""A strategy wrapper that records what every site sent, round by round.

It wraps the configured (and quorum-guarded) strategy, so aggregation itself is
untouched: it only looks at the replies on their way in, writes per-site lines to
the run directory, and shifts round numbers when a run is resumed so that the
inner strategy and the sites see the true round.

A site names itself in its reply, so the name is bound to the SuperNode that sent
it (:class:`SiteIdentities`): a reply claiming a name another node holds, or a
node that changes its name, is recorded as failed and never reaches aggregation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
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


#: Error code of a reply the coordinator rejected itself (Flower's codes are small integers).
IDENTITY_REJECTED = 1001


class SiteIdentities:
    """Site names bound to the SuperNodes (node ids) that first reported them, for one run.

    The first name a node id reports is bound to it; Flower authenticates node ids
    (a registered key each, with ``--enable-supernode-auth``), whereas a site's name
    is only what its reply says. A coordinator process that resumes a run binds anew.
    """

    def __init__(self) -> None:
        self.name_of: dict[int, str] = {}
        self.node_of: dict[str, int] = {}

    def check(self, msg: Message) -> str | None:
        """Bind the reply's name to its node, or return why the reply is rejected (None: accepted)."""
        node, name = int(msg.metadata.src_node_id), site_name(msg)
        if msg.has_error():
            return None  # claims no name
        bound = self.name_of.get(node)
        if bound is not None and bound != name:
            return f"node {node} reported as {name!r}, but it is {bound!r} in this run"
        holder = self.node_of.get(name)
        if holder is not None and holder != node:
            return f"node {node} claimed the name {name!r} of node {holder}"
        self.name_of[node], self.node_of[name] = name, node
        return None

    def name(self, msg: Message) -> str:
        """The bound name of the reply's node (``node-<id>`` before it named itself)."""
        return self.name_of.get(int(msg.metadata.src_node_id), f"node-{msg.metadata.src_node_id}")


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
        self.identities = SiteIdentities()

    def _screen(self, replies: Iterable[Message]) -> list[Message]:
        """Replies with every identity violation turned into an error reply (recorded as failed)."""
        screened = []
        for msg in replies:
            problem = self.identities.check(msg)
            if problem is not None:
                logger.warning("rejecting a reply: %s", problem)
                msg = Message(error=Error(code=IDENTITY_REJECTED, reason=f"identity: {problem}"),
                              metadata=msg.metadata)
            self.current.setdefault("nodes", {})[self.identities.name(msg)] = int(msg.metadata.src_node_id)
            screened.append(msg)
        return screened

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
        replies = self._screen(replies)
        rnd = self.true_round(server_round)
        for msg in replies:
            name, node = self.identities.name(msg), int(msg.metadata.src_node_id)
            if msg.has_error():
                self.current["failed"][name] = msg.error.reason
                continue
            status = msg.content.get("status")
            if isinstance(status, ConfigRecord) and "refused" in status:
                self.current["refused"][name] = str(status["refused"])
                continue
            metrics = _metrics(msg)
            self.current["sites"][name] = {"train": metrics}
            self.run.append(SITES_FILE, {"round": rnd, "site": name, "node": node, "phase": "train",
                                         "metrics": metrics})
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
        replies = self._screen(replies)
        rnd = self.true_round(server_round)
        for msg in replies:
            name, node = self.identities.name(msg), int(msg.metadata.src_node_id)
            if msg.has_error():
                self.current.setdefault("failed", {})[name] = msg.error.reason
                continue
            status = msg.content.get("status")
            if isinstance(status, ConfigRecord) and "refused" in status:  # e.g. data-mismatch, model-not-allowed
                self.current.setdefault("refused", {}).setdefault(name, str(status["refused"]))
                continue
            metrics = _metrics(msg)
            self.current.setdefault("sites", {}).setdefault(name, {})["evaluate"] = metrics
            self.run.append(SITES_FILE, {"round": rnd, "site": name, "node": node, "phase": "evaluate",
                                         "metrics": metrics})
        aggregated = super().aggregate_evaluate(rnd, replies)
        self.current["evaluate"] = dict(aggregated) if aggregated is not None else {}
        return aggregated

    def pop_round(self) -> dict[str, Any]:
        """The record of the round just finished (and start a new one)."""
        record, self.current = self.current, {}
        return record
