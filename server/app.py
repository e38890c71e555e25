"""medfed ServerApp: the coordinator's round loop.

The ServerApp reads the run config, then :func:`run_federation` builds the model
and the strategy chosen by name, and drives Flower's own ``Strategy.start()``
loop. Checkpoints, per-round records and central evaluation happen in the
``evaluate_fn`` hook that ``start()`` calls after every round (central and site
evaluation only in the rounds ``server.eval_every`` selects, and always the last).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from federation.config import ConfigError, ExperimentConfig, dataset_problems, from_flat
from federation.data import dataset_info
from federation.models import build_model
from federation.tasks import get_task
from federation.training import select_device
from server.central_eval import CentralEvaluation, PrefetchCentralEvaluation, central_test_set
from server.model_card import finish_run
from server.polling import with_poll_interval
from server.recording import RecordingStrategy
from server.run_dir import ROUNDS_FILE, Checkpoint, RunDirectory
from server.summary import build_summary
from server.tracking import RunTracker, open_tracker
from strategies import (
    AlignedMetricKeys,
    EvaluationSchedule,
    QuorumStrategy,
    build_strategy,
    load_strategy_state,
    strategy_state,
)
from strategies.central_dp import CENTRAL_DP_FILE, with_central_dp
from strategies.secagg import with_secure_aggregation
from strategies.compression import with_transfer_decoding
from strategies.ordered import OrderedReplies

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls on the coordinator."""
    config = from_flat(context.run_config, source="run config")
    run_federation(grid=grid, config=config)


def _open_run(config: ExperimentConfig) -> RunDirectory:
    return RunDirectory.resume(config) if config.server.resume else RunDirectory.create(config)


#: Written to the run directory when model.init loaded weights (read by the model card).
INIT_FILE = "init.json"


def _initial_model(config: ExperimentConfig, run: RunDirectory | None = None) -> torch.nn.Module:
    """Round 0's global model: fresh (seeded), then ``model.init``'s weights when set (reported in ``init.json``)."""
    info = dataset_info(config.data)
    if config.clinical.positive_class >= info.num_classes:  # sites would fail every evaluation
        raise ConfigError([f"clinical.positive_class: {config.clinical.positive_class} is not a class of "
                           f"{config.data.dataset} (0..{info.num_classes - 1})"], source="run config")
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        spatial_dims=info.spatial_dims,
        dp=config.privacy.enabled,
        task=config.data.task,
    )
    # train.trainable and train.augment fail here, before any site starts, rather than at every site
    from federation.data.augment import parse_augment  # noqa: PLC0415
    from federation.training.trainable import trainable_names  # noqa: PLC0415

    parse_augment(config.train.augment)
    trainable_names(model, config.train.trainable)
    if config.model.init:  # pretrained weights: only the coordinator reads them, sites get round 0's model
        from federation.models.init import load_init  # noqa: PLC0415

        report = load_init(model, source=config.model.init, model_name=config.model.name)
        if run is not None:
            (run.path / INIT_FILE).write_text(json.dumps(report.as_dict(), indent=2))
    return model


def _central_evaluation(config: ExperimentConfig, model: torch.nn.Module) -> CentralEvaluation | None:
    """The coordinator's evaluation on its test data (``server.central_eval``, see ``central_test_set``), or None."""
    test_set = central_test_set(config)
    if test_set is None:
        return None
    device = select_device(config.train.device)
    task = get_task(config.data.task)  # loss and AUC, or loss and Dice

    def evaluate_global(arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return task.evaluate(model=model, dataset=test_set, device=device)

    return CentralEvaluation(evaluate_global)


def _round_end_hook(
    *,
    run: RunDirectory,
    central: CentralEvaluation | None,
    due: Callable[[int], bool],
    recorder: RecordingStrategy,
    tracker: RunTracker | None = None,
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Build the ``evaluate_fn`` that ``Strategy.start()`` calls after every round (``due``: evaluated rounds)."""
    # a run resumed before its first checkpoint (killed in round 1) has its round 0 recorded already
    recorded_start = recorder.round_offset > 0 or any(r.get("round") == 0 for r in run.rounds())

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = recorder.true_round(server_round)
        if server_round == 0 and recorded_start:
            return None  # round 0 of a resumed run was recorded by the first process
        global_metrics: dict[str, float] = {}
        if central is not None and due(rnd):
            global_metrics = central.result(rnd, arrays)
        record = recorder.pop_round() if server_round > 0 else {"round": 0}
        record.update({"round": rnd, "global": global_metrics, "time": time.time() - run.started})
        run.append(ROUNDS_FILE, record)
        if tracker is not None:  # server.tracking: MLflow/TensorBoard log what was just recorded
            tracker.update()
        if server_round > 0:
            run.save_checkpoint(
                Checkpoint(
                    round=rnd,
                    weights=arrays.to_torch_state_dict(),
                    strategy_state=strategy_state(recorder.inner),
                )
            )
        logger.info("round %d done: %s", rnd, {k: round(v, 4) for k, v in global_metrics.items()})
        return MetricRecord(global_metrics) if global_metrics else None

    return on_round_end


def _run_rounds(
    *,
    grid: Grid,
    config: ExperimentConfig,
    run: RunDirectory,
    strategy: Strategy,
    model: torch.nn.Module,
    arrays: ArrayRecord,
    done: int,
) -> None:
    """Drive Flower's ``Strategy.start()`` over the rounds still to do, recording each."""
    schedule = EvaluationSchedule(  # server.eval_every (the recorder passes the run's round numbers)
        inner=QuorumStrategy(
            inner=AlignedMetricKeys(inner=OrderedReplies(inner=strategy)), min_replies=config.strategy.min_sites
        ),
        every=config.server.eval_every,
        last_round=config.server.rounds,
    )
    due = schedule.due  # one definition of the evaluated rounds, for the sites and the coordinator
    tracker = open_tracker(config, run.path)  # server.tracking (none by default)
    central = _central_evaluation(config, model)
    guarded: Strategy = schedule
    if central is not None:  # the coordinator evaluates while the sites do
        guarded = PrefetchCentralEvaluation(inner=schedule, central=central, due=due)
    recorder = RecordingStrategy(guarded, run=run, round_offset=done)
    try:
        recorder.start(
            grid=with_poll_interval(
                grid, interval=config.server.poll_interval, simulation_interval=config.simulation.poll_interval
            ),
            initial_arrays=arrays,
            num_rounds=config.server.rounds - done,
            timeout=config.server.round_timeout,
            train_config=ConfigRecord({"run-name": run.name}),
            evaluate_config=ConfigRecord({"run-name": run.name}),
            evaluate_fn=_round_end_hook(run=run, central=central, due=due, recorder=recorder, tracker=tracker),
        )
    finally:
        if central is not None:
            central.close()
        if tracker is not None:
            tracker.close()


def run_federation(*, grid: Grid, config: ExperimentConfig) -> Path:
    """Run (or resume) a whole federation and write its run directory.

    Args:
        grid: Flower's Grid, connecting to the sites.
        config: The validated experiment config.

    Returns:
        The run directory.
    """
    problems = dataset_problems(config)  # before anything starts: site-only data declares the model's shape
    if problems:
        raise ConfigError(problems, source="run config")
    run = _open_run(config)
    model = _initial_model(config, run)
    arrays = ArrayRecord(model.state_dict())
    strategy = with_transfer_decoding(  # sites may send quantized updates (train.transfer_dtype)
        with_central_dp(  # central DP (central_dp.*), off by default
            with_secure_aggregation(  # secagg.*: the coordinator sees only the sum of the updates
                build_strategy(config.strategy, num_sites=config.data.num_sites), config=config,
            ),
            config=config,
            log_path=run.path / CENTRAL_DP_FILE,
        ),
        transfer_dtype=config.train.transfer_dtype,
    )
    done = 0
    checkpoint = run.load_checkpoint() if config.server.resume else None
    if checkpoint is not None:
        done = checkpoint.round
        arrays = ArrayRecord(checkpoint.weights)
        load_strategy_state(strategy, checkpoint.strategy_state)
    remaining = config.server.rounds - done
    if remaining <= 0:
        logger.info("run %s already completed %d of %d rounds", run.path, done, config.server.rounds)
    else:
        _run_rounds(grid=grid, config=config, run=run, strategy=strategy, model=model, arrays=arrays, done=done)
    summary: dict[str, Any] = build_summary(run=run, config=config)
    run.write_summary(summary)
    # exported model, clinical report, model card: each recorded in outputs.json, written or failed with its
    # reason (the command that started the run reads it back); the run's records are already safe on disk
    problem = finish_run(run.path, config).failure_message()
    if problem is not None:
        logger.error("%s", problem)
    logger.info("run finished: %s", run.path.resolve())
    return run.path
