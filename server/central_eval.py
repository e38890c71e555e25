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
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation.config import ExperimentConfig
from strategies.wrapper import StrategyWrapper

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

logger = logging.getLogger(__name__)


def central_test_set(config: ExperimentConfig) -> TensorDataset | None:
    """The data the coordinator evaluates each global model on, or None when it evaluates nothing itself.

    * ``server.central_eval=false``: None.
    * Data that exists only at the sites (a site-only dataset such as ``dicom``): the
      coordinator's own validation folder ``server.central_eval_dir``, every image in
      it, checked against the declared classes, channels and size like a site's data;
      without that folder None: the sites' own evaluations are the run's metrics.
    * Otherwise: the dataset's pooled test split.

    Raises:
        ValueError: The validation folder disagrees with the declared shape (named).
    """
    if not config.server.central_eval:
        return None
    import numpy as np  # noqa: PLC0415 - the data stack loads with the run, not with this module
    import torch  # noqa: PLC0415
    from torch.utils.data import TensorDataset  # noqa: PLC0415

    from federation.data import DataMismatch, check_site_data, is_site_only, load_central_test, load_dataset  # noqa: PLC0415

    if not is_site_only(config.data.dataset):
        return load_central_test(config.data, seed=config.seed)
    folder = config.server.central_eval_dir
    if not folder:
        logger.info("no central evaluation: %s data exists only at the sites (server.central_eval_dir is not set); "
                    "the sites' evaluations are the run's metrics", config.data.dataset)
        return None
    data = config.data.model_copy(update={"data_dir": folder})
    try:
        splits = load_dataset(data, seed=config.seed)
        check_site_data(data, splits)
    except DataMismatch as err:
        raise ValueError(f"server.central_eval_dir={folder}: the coordinator's validation data disagrees with the "
                         f"run config: {err.detail}") from None
    images = np.concatenate([splits.train_images, splits.test_images])
    labels = np.concatenate([splits.train_labels, splits.test_labels])
    logger.info("central evaluation on %d images of %s", len(labels), folder)
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))

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
