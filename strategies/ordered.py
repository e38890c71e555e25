"""Aggregate site replies in a fixed order, so a rerun with the same seed gives identical weights.

Replies arrive in whatever order the sites finish. Floating-point sums depend on
the order of their terms, so FedAvg over three or more sites can differ in the last
bits from run to run, and those bits grow over the rounds. :class:`OrderedReplies`
sorts the replies by the site name each one carries (error replies last, by node
id) before the inner strategy sees them; the aggregate itself is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message

from strategies.wrapper import ReplyTransform


def reply_order_key(message: Message) -> tuple[int, str]:
    """Sort key of a reply: ``(0, site name)``, or ``(1, node id)`` without one."""
    if not message.has_error() and message.has_content():
        record = message.content.get("site")
        if isinstance(record, ConfigRecord) and "name" in record:
            return 0, str(record["name"])
    return 1, f"{message.metadata.src_node_id:020d}"


def ordered(replies: Iterable[Message]) -> list[Message]:
    """The replies sorted with :func:`reply_order_key`."""
    return sorted(replies, key=reply_order_key)


class OrderedReplies(ReplyTransform):
    """Hand the inner strategy its replies sorted by site name (see the module docstring)."""

    def transform(self, replies: Iterable[Message]) -> list[Message]:
        """The replies in :func:`reply_order_key` order."""
        return ordered(replies)
