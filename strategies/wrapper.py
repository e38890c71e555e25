"""A strategy that delegates everything to an inner strategy.

Wrappers add one behaviour around any Flower strategy by composition, the way
Flower's ``DifferentialPrivacy*Clipping`` wrappers do: subclass
:class:`StrategyWrapper`, override one hook, and call ``super()`` (which
delegates to ``self.inner``). ``Strategy.start()`` is inherited unchanged, so the
round loop always calls the outermost wrapper's hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

logger = logging.getLogger(__name__)


class StrategyWrapper(Strategy):
    """Delegate every :class:`Strategy` hook to ``inner``.

    Args:
        inner: The wrapped strategy (may itself be a wrapper).

    Attributes:
        inner: The wrapped strategy.
    """

    def __init__(self, *, inner: Strategy) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner must be a flwr Strategy, got {type(inner).__name__}.")
        self.inner = inner

    def __repr__(self) -> str:
        """Show the wrapping chain, e.g. ``QuorumStrategy(FedAvg)``."""
        inner = self.inner if isinstance(self.inner, StrategyWrapper) else type(self.inner).__name__
        return f"{type(self).__name__}({inner})"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to ``inner.configure_train``."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate to ``inner.aggregate_train``."""
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to ``inner.configure_evaluate``."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate to ``inner.aggregate_evaluate``."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log this wrapper's name, then the inner strategy's summary."""
        logger.info("%s wrapping %s", type(self).__name__, type(self.inner).__name__)
        self.inner.summary()


class ReplyTransform(StrategyWrapper):
    """A wrapper that only rewrites the replies before the inner strategy aggregates them.

    Subclasses implement :meth:`transform`; it runs for training and evaluation replies alike.
    """

    def transform(self, replies: Iterable[Message]) -> list[Message]:
        """Return the replies the inner strategy should see."""
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Transform, then delegate to ``inner.aggregate_train``."""
        return super().aggregate_train(server_round, self.transform(replies))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Transform, then delegate to ``inner.aggregate_evaluate``."""
        return super().aggregate_evaluate(server_round, self.transform(replies))


def unwrap(strategy: Strategy) -> Strategy:
    """Return the innermost strategy of a wrapping chain.

    Follows :attr:`StrategyWrapper.inner` and the ``strategy`` attribute of
    Flower's ``DifferentialPrivacy*Clipping`` wrappers.

    Args:
        strategy: A strategy, possibly wrapped.

    Returns:
        The first strategy in the chain that wraps nothing.
    """
    for layer in iter_layers(strategy):
        strategy = layer
    return strategy


def iter_layers(strategy: Strategy) -> Iterable[Strategy]:
    """Yield the wrapping chain from the outermost strategy to the innermost.

    Args:
        strategy: A strategy, possibly wrapped.

    Yields:
        Each layer, outermost first.
    """
    seen: set[int] = set()
    current: Strategy | None = strategy
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if isinstance(current, StrategyWrapper):
            current = current.inner
        else:
            nested = getattr(current, "strategy", None)
            current = nested if isinstance(nested, Strategy) else None
