"""Central evaluation of the global model, started while the sites evaluate it.

Flower's ``Strategy.start()`` asks the sites to evaluate a round's new global
model, waits for their replies, and only then calls ``evaluate_fn``, where the
coordinator evaluates the same model on the pooled test split. The coordinator is
idle while it waits, so :class:`CentralEvaluation` starts its own evaluation as
soon as the round's model is known (:class:`PrefetchCentralEvaluation`, in
``configure_evaluate``) in one background thread, and ``evaluate_fn`` collects the
result. Where nothing started it (round 0, no site evaluation that round), the
evaluation runs when asked. The numbers are those of a direct call: same model,
same data, same function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

logger = logging.getLogger(__name__)

Evaluate = Callable[[ArrayRecord], dict[str, float]]
"""``evaluate(arrays) -> metrics`` of one global model."""


class CentralEvaluation:
    """Run ``evaluate`` on a round's global model, at most one at a time, possibly ahead of need.

    Args:
        evaluate: Evaluates one global model (not called concurrently with itself).
    """

    def __init__(self, evaluate: Evaluate) -> None:
        self._evaluate = evaluate
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medfed-central-eval")
        self._pending: dict[int, tuple[ArrayRecord, Future[dict[str, float]]]] = {}

    def start(self, server_round: int, arrays: ArrayRecord) -> None:
        """Begin evaluating round ``server_round``'s model in the background."""
        if server_round not in self._pending:
            self._pending[server_round] = (arrays, self._pool.submit(self._evaluate, arrays))

    def result(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        """The metrics of ``arrays``: the background result if it was started for these arrays, else now."""
        started = self._pending.pop(server_round, None)
        if started is not None and started[0] is arrays:
            return started[1].result()
        if started is not None:  # another model than the one started: never report a stale result
            started[1].result()
            logger.debug("round %d: central evaluation restarted for a different model", server_round)
        return self._evaluate(arrays)

    def close(self) -> None:
        """Wait for a running evaluation, then stop the thread."""
        self._pool.shutdown(wait=True)
        self._pending.clear()


class PrefetchCentralEvaluation(StrategyWrapper):
    """Start the central evaluation of the round's model when the sites are asked to evaluate it.

    Args:
        inner: The strategy configuring the sites' evaluation.
        central: Where the evaluation runs.
        due: Whether a round is centrally evaluated (``server.eval_every``).
    """

    def __init__(self, *, inner: Strategy, central: CentralEvaluation, due: Callable[[int], bool]) -> None:
        super().__init__(inner=inner)
        self.central = central
        self.due = due

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Start the central evaluation (when due), then delegate."""
        if self.due(server_round):
            self.central.start(server_round, arrays)
        return super().configure_evaluate(server_round, arrays, config, grid)
