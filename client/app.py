"""medfed ClientApp: one hospital site.

Thin by design: each handler turns the incoming Message into a call of a plain
function in :mod:`client.site` and its result back into a reply, which the
outbound guard checks before it leaves the site.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.guard import EVALUATE_METRICS, TRAIN_METRICS, check_reply
from client.site import evaluate_round, site_settings, train_round
from federation.config import from_flat

logger = logging.getLogger(__name__)

app = ClientApp()


def _setup(msg: Message, context: Context):
    config = from_flat(context.run_config, source="run config received by the site")
    run_name = str(msg.content["config"].get("run-name", "run"))
    settings = site_settings(node_config=context.node_config, config=config, run_name=run_name)
    return config, settings


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model locally (with DP when configured)."""
    config, settings = _setup(msg, context)
    global_weights = msg.content["arrays"].to_torch_state_dict()
    round_config = msg.content["config"]
    outcome = train_round(
        config=config,
        settings=settings,
        global_weights=global_weights,
        server_round=int(round_config.get("server-round", 0)),
        proximal_mu=float(round_config.get("proximal-mu", 0.0)),
    )
    content = RecordDict({"site": ConfigRecord({"name": settings.name})})
    if outcome.refusal is not None:
        content["status"] = ConfigRecord({"refused": outcome.refusal})
        return Message(check_reply(content, allowed_metrics=()), reply_to=msg)
    content["arrays"] = ArrayRecord(outcome.weights)
    content["metrics"] = MetricRecord(outcome.metrics)
    check_reply(content, allowed_metrics=TRAIN_METRICS, parameter_names=global_weights.keys())
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's own test split."""
    config, settings = _setup(msg, context)
    metrics = evaluate_round(
        config=config, settings=settings, global_weights=msg.content["arrays"].to_torch_state_dict()
    )
    content = RecordDict(
        {"site": ConfigRecord({"name": settings.name}), "metrics": MetricRecord(metrics)}
    )
    return Message(check_reply(content, allowed_metrics=EVALUATE_METRICS), reply_to=msg)
