"""The peer baseline of bench/federation_overhead.py: a minimal Flower app doing the same work.

What a Flower user would write from the quickstart: a ClientApp that loads its
partition, builds the model, trains it with the same DP-SGD routine as medfed
(``federation.training.train_local``; the accountant kept in ``context.state``) and
evaluates it; a ServerApp running Flower's stock ``FedAvg`` through
``Strategy.start``. No run directory, no checkpoints, no central evaluation, no
audit log, no outbound guard. Started with ``flwr.simulation.run_simulation`` on
the same Ray engine (same ``client_resources``). The medfed config travels in the
environment variable ``MEDFED_BENCH_CONFIG`` (``run_simulation`` gives apps an empty
run config); the time of every round goes to ``MEDFED_BENCH_TIMES``.
"""

from __future__ import annotations

import json
import os
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from federation.config import ExperimentConfig
from federation.data import dataset_info, load_site_data
from federation.models import build_model
from federation.privacy import SitePrivacy
from federation.training import evaluate, model_state, select_device, train_local

CONFIG_ENV = "MEDFED_BENCH_CONFIG"
TIMES_ENV = "MEDFED_BENCH_TIMES"


def _config() -> ExperimentConfig:
    return ExperimentConfig.model_validate_json(os.environ[CONFIG_ENV])


client_app = ClientApp()


def _site(context: Context, config: ExperimentConfig):
    index, count = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    data = load_site_data(config.data, seed=config.seed, site_index=index, num_sites=count)
    model = build_model(config.model, in_channels=data.in_channels, num_classes=data.num_classes,
                        dp=config.privacy.enabled)
    return index, data, model


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = _config()
    index, data, model = _site(context, config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    privacy = None
    if config.privacy.enabled:
        privacy = SitePrivacy(config=config.privacy, num_examples=len(data.train), batch_size=config.train.batch_size,
                              local_epochs=config.train.local_epochs, planned_rounds=config.server.rounds)
        if "privacy" in context.state:
            privacy.load_state_dict(dict(context.state["privacy"]))
    server_round = int(msg.content["config"]["server-round"])
    result = train_local(model=model, dataset=data.train, config=config.train, privacy=privacy,
                         seed=config.seed * 100_003 + server_round * 1_009 + index,
                         device=select_device(config.train.device))
    if privacy is not None:
        context.state["privacy"] = ConfigRecord(privacy.state_dict())
    content = RecordDict({"arrays": ArrayRecord(model_state(model)),
                          "metrics": MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss})})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    config = _config()
    _, data, model = _site(context, config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    result = evaluate(model=model, dataset=data.test, batch_size=max(256, config.train.batch_size),
                      device=select_device(config.train.device))
    content = RecordDict({"metrics": MetricRecord({"num-examples": result.num_examples, "auc": result.auc})})
    return Message(content=content, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = _config()
    info = dataset_info(config.data)
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                        dp=config.privacy.enabled)
    started, times = time.time(), []

    def on_round(server_round: int, arrays: ArrayRecord) -> None:
        times.append({"round": server_round, "time": time.time() - started})
        return None

    FedAvg(min_available_nodes=config.data.num_sites).start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=config.server.rounds,
        evaluate_fn=on_round,
    )
    with open(os.environ[TIMES_ENV], "w") as handle:
        json.dump(times, handle)


def run(config: ExperimentConfig, times_path: str) -> None:
    """Run the vanilla app on Flower's simulation engine with medfed's Ray resources."""
    os.environ[CONFIG_ENV] = config.model_dump_json()
    os.environ[TIMES_ENV] = times_path
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from flwr.simulation import run_simulation

    from simulations.engine import _backend_config

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.data.num_sites,
                   backend_config=_backend_config(config, verbose=False))
