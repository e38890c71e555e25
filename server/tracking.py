"""Experiment tracking (``server.tracking``): what a run recorded, also logged to MLflow or TensorBoard.

The tracker is a reader of the run directory, not a second source of numbers: after
each round's line is appended to ``rounds.jsonl`` the ServerApp calls
:meth:`RunTracker.update`, which reads the lines appended since its last look (to
``privacy.jsonl`` and ``rounds.jsonl``) and logs, with the round as the step:

* ``global/<metric>`` (central evaluation), ``train/<metric>`` and ``evaluate/<metric>``
  (site metrics aggregated by the strategy);
* ``site/<site>/<phase>/<metric>`` (each site's own numbers);
* ``epsilon/<site>`` (ε spent so far), ``sites/trained|refused|failed`` and ``aggregated``
  (ROC curve points and reliability bins are left to the clinical report);

and the run's config once, as parameters (MLflow) or text (TensorBoard). Stores live
in the run directory: ``tracking/mlflow/mlflow.db`` (MLflow's SQLite store, artifacts in
``tracking/mlflow/mlartifacts``; ``mlflow ui --backend-store-uri sqlite:///<run>/tracking/mlflow/mlflow.db``)
or ``tracking/tensorboard/`` (``tensorboard --logdir <run>/tracking/tensorboard``).
A tracking failure is logged and never stops the run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

from federation.config import ExperimentConfig, to_flat
from server.run_dir import PRIVACY_FILE, ROUNDS_FILE

logger = logging.getLogger(__name__)

TRACKERS = ("none", "mlflow", "tensorboard")
TRACKING_DIR = "tracking"
#: Metrics not logged per round (ROC curve points and calibration bins: the clinical report draws them).
_SKIPPED_SITE_METRICS = ("roc-tpr-", "rel-bin-")
_EXTRAS = {"mlflow": "mlflow", "tensorboard": "tensorboard"}


class TrackingError(RuntimeError):
    """The tracker asked for cannot be used (e.g. its package is not installed)."""


class Sink(Protocol):
    """Where a tracker's numbers go."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Log the metrics of one round."""

    def close(self) -> None:
        """Flush and finish."""


class _Appended:
    """The whole JSON lines appended to a file since the last call (a torn last line waits)."""

    def __init__(self, path: Path, *, at_end: bool) -> None:
        self.path = path
        self.offset = path.stat().st_size if at_end and path.is_file() else 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _numbers(prefix: str, values: Any) -> dict[str, float]:
    out = {}
    for key, value in (values or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def round_metrics(record: dict[str, Any], epsilon: dict[str, float]) -> dict[str, float]:
    """The numbers logged for one round's record (``rounds.jsonl`` line) and its sites' ε."""
    metrics = {**_numbers("global/", record.get("global")), **_numbers("train/", record.get("train")),
               **_numbers("evaluate/", record.get("evaluate"))}
    for site, phases in sorted((record.get("sites") or {}).items()):
        for phase, values in sorted((phases or {}).items()):
            metrics.update(_numbers(f"site/{site}/{phase}/", values))
    metrics = {k: v for k, v in metrics.items() if not any(part in k for part in _SKIPPED_SITE_METRICS)}
    metrics.update({f"epsilon/{site}": eps for site, eps in sorted(epsilon.items())})
    if int(record.get("round", 0)) > 0:
        metrics.update({"sites/trained": float(sum(1 for p in (record.get("sites") or {}).values() if "train" in p)),
                        "sites/refused": float(len(record.get("refused") or {})),
                        "sites/failed": float(len(record.get("failed") or {})),
                        "aggregated": float(bool(record.get("aggregated")))})
    return metrics


class RunTracker:
    """Logs what a run directory records, round by round, to a :class:`Sink`.

    Args:
        sink: MLflow or TensorBoard.
        run_path: The run directory.
        at_end: Start after what is already recorded (a resumed run whose earlier rounds were tracked).
    """

    def __init__(self, sink: Sink, run_path: Path, *, at_end: bool = False) -> None:
        self.sink = sink
        self._rounds = _Appended(run_path / ROUNDS_FILE, at_end=at_end)
        self._privacy = _Appended(run_path / PRIVACY_FILE, at_end=at_end)
        self._epsilon: dict[str, float] = {}  # ε per site as of the last round logged
        self._pending: list[dict[str, Any]] = []  # privacy lines of rounds not logged yet
        self.failed = False

    def update(self) -> int:
        """Log the rounds recorded since the last call; returns how many (0 after a failure, which is logged)."""
        if self.failed:
            return 0
        try:
            self._pending += self._privacy.read()  # a round's ε lines are written before its round line
            rows = self._rounds.read()
            for record in rows:
                rnd = int(record.get("round", 0))
                for row in [r for r in self._pending if int(r.get("round", 0)) <= rnd]:
                    self._epsilon[str(row["site"])] = float(row["epsilon"])
                self._pending = [r for r in self._pending if int(r.get("round", 0)) > rnd]
                self.sink.log(rnd, round_metrics(record, self._epsilon))
            return len(rows)
        except Exception:  # noqa: BLE001 - tracking is an extra: never lose the run over it
            self.failed = True
            logger.exception("experiment tracking failed; the run goes on and its run directory has every record")
            return 0

    def close(self) -> None:
        """Log what is left and close the sink."""
        self.update()
        try:
            self.sink.close()
        except Exception:  # noqa: BLE001
            logger.exception("closing the experiment tracker failed")


class MlflowSink:
    """An MLflow run in a SQLite store under the run directory (one MLflow run per medfed run, kept on resume)."""

    def __init__(self, folder: Path, *, run_name: str, config: ExperimentConfig) -> None:
        from mlflow.entities import Param  # noqa: PLC0415 - optional extra
        from mlflow.tracking import MlflowClient  # noqa: PLC0415

        folder.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{folder.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(config.name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            config.name, artifact_location=(folder.resolve() / "mlartifacts").as_uri())
        found = [r for r in self.client.search_runs([experiment_id], max_results=5000)
                 if r.data.tags.get("medfed.run") == run_name]
        if found:  # a resumed run goes on in the same MLflow run
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                                 tags={"medfed.run": run_name}).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in to_flat(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TensorBoardSink:
    """TensorBoard event files under the run directory (written with torch's ``SummaryWriter``)."""

    def __init__(self, folder: Path, *, config: ExperimentConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(folder))
        flat = "\n".join(f"    {k} = {v!r}" for k, v in to_flat(config).items())
        self.writer.add_text("config", flat, global_step=0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(config: ExperimentConfig, run_path: Path) -> RunTracker | None:
    """The tracker ``server.tracking`` asks for (None for ``none``).

    Raises:
        TrackingError: Its package is not installed (naming the extra to install).
    """
    kind = config.server.tracking
    if kind == "none":
        return None
    folder = run_path / TRACKING_DIR / ("mlflow" if kind == "mlflow" else "tensorboard")
    resumed_with_tracking = folder.exists()
    try:
        sink: Sink = (MlflowSink(folder, run_name=run_path.name, config=config) if kind == "mlflow"
                      else TensorBoardSink(folder, config=config))
    except ImportError as err:
        raise TrackingError(f"server.tracking={kind} needs the {_EXTRAS[kind]} package ({err}); install it with "
                            f"pip install 'medfed[{_EXTRAS[kind]}]', or set server.tracking=none") from err
    logger.info("experiment tracking: %s in %s", kind, folder)
    return RunTracker(sink, run_path, at_end=resumed_with_tracking)
