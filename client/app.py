"""medfed ClientApp: one hospital site.

Thin by design: each handler turns the incoming Message into a call of a plain
function in :mod:`client.site` and its result back into a reply, which the
outbound guard checks before it leaves the site. :func:`client.handling.handle`
writes every request and reply to the site's audit log and turns failures into
error replies that carry no exception text; the site's policy
(:mod:`client.policy`) is validated when the ClientApp starts and on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.admission import evaluate_refusal
from client.guard import check_reply, evaluate_metrics, refusal, train_metrics_allowed
from client.handling import Request, check_policy_at_start, handle, setup, train_audit
from client.secagg import MASKED_ARRAY, answer_stage, check_masked_record, masked_update, secure_round
from client.site import TrainOutcome, evaluate_request, train_round
from client.transfer import update_record
from federation.data import DataMismatch
from federation.secagg import SecAggProtocolError

logger = logging.getLogger(__name__)

app = ClientApp()


@app.lifespan()
def lifespan(context: Context) -> Iterator[None]:
    """Validate the site's policy before the ClientApp handles anything."""
    yield from check_policy_at_start(context)


def train_body(
    msg: Message, context: Context, request: Request, *, site_round: Callable[..., TrainOutcome] = train_round
) -> RecordDict:
    """The train handler's body: policy and secagg checks, ``site_round`` (the site's round), the guarded reply.

    A deployed site always runs :func:`client.site.train_round`; only the simulation's
    ClientApp (:mod:`simulations.adversary_app`) passes another ``site_round``: the honest
    one plus a simulated site's faults and attacks.
    """
    config, settings, policy = setup(msg, context, request)
    global_weights = msg.content["arrays"].to_torch_state_dict()
    round_config = msg.content["config"]
    content = RecordDict({"site": ConfigRecord({"name": settings.name})})
    try:  # secure aggregation (secagg.*): the shares arrive before training, so a broken protocol spends no epsilon
        secure = secure_round(msg, context, server_round=int(round_config.get("server-round", 0)))
    except SecAggProtocolError as error:
        content["status"] = ConfigRecord({"refused": refusal("secagg-protocol", "the round's shares do not fit")})
        logger.warning("secure aggregation refused before training: %s", error)
        return check_reply(content, allowed_metrics=())
    if secure is None and policy is not None and policy.require_secagg:
        content["status"] = ConfigRecord({"refused": refusal("secagg-required", "policy require_secagg is true")})
        request.audit["refused"] = content["status"]["refused"]
        return check_reply(content, allowed_metrics=())
    outcome = site_round(
        config=config,
        settings=settings,
        global_weights=global_weights,
        server_round=int(round_config.get("server-round", 0)),
        proximal_mu=float(round_config.get("proximal-mu", 0.0)),
        policy=policy,
        run_id=int(context.run_id),
    )
    request.audit.update(train_audit(outcome, settings))
    if outcome.refusal is not None:
        content["status"] = ConfigRecord({"refused": outcome.refusal})
        return check_reply(content, allowed_metrics=())
    if config.train.local_norm or config.train.ditto_lambda > 0:  # FedBN's norm layers, Ditto's model stay here
        from client.personal import check_local_kept  # noqa: PLC0415

        check_local_kept(outcome.weights, global_weights=global_weights, settings=settings)
    allowed = train_metrics_allowed(dp=config.privacy.enabled, simulated=settings.simulated)
    if secure is not None:  # only the masked update; the example count travels inside it
        content["arrays"] = masked_update(secure, context, weights=outcome.weights, global_weights=global_weights,
                                          num_examples=int(outcome.metrics.get("num-examples", 0)))
        check_masked_record(content["arrays"], global_weights=global_weights)
        content["metrics"] = MetricRecord({k: v for k, v in outcome.metrics.items() if k != "num-examples"})
        return check_reply(content, allowed_metrics=allowed - {"num-examples"}, parameter_names=(MASKED_ARRAY,))
    transfer = config.train.transfer_dtype  # fp32 weights, or the update quantized (client/transfer.py)
    content["arrays"] = update_record(outcome.weights, global_weights, transfer_dtype=transfer)
    content["metrics"] = MetricRecord(outcome.metrics)
    shapes = {name: tuple(tensor.shape) for name, tensor in global_weights.items()}
    return check_reply(content, allowed_metrics=allowed, parameter_shapes=shapes, transfer_dtype=transfer)


def _evaluate(msg: Message, context: Context, request: Request) -> RecordDict:
    config, settings, policy = setup(msg, context, request)
    content = RecordDict({"site": ConfigRecord({"name": settings.name})})
    reason = evaluate_refusal(policy, config)
    if reason is not None:
        request.audit["refused"] = reason
        content["status"] = ConfigRecord({"refused": reason})
        return check_reply(content, allowed_metrics=())
    try:
        outcome = evaluate_request(
            config=config, settings=settings, global_weights=msg.content["arrays"].to_torch_state_dict(),
            policy=policy, server_round=int(msg.content["config"].get("server-round", 0)),
        )
    except DataMismatch as mismatch:  # site-only data unlike the declared classes/channels/size
        reason = refusal("data-mismatch", mismatch.detail)
        request.audit["refused"] = reason
        content["status"] = ConfigRecord({"refused": reason})
        return check_reply(content, allowed_metrics=())
    request.audit.update(evaluations=outcome.evaluations, cached=outcome.cached, refused=outcome.refusal)
    if outcome.refusal is not None:  # evaluation budget, or settings other than the run's first evaluation
        content["status"] = ConfigRecord({"refused": outcome.refusal})
        return check_reply(content, allowed_metrics=())
    content["metrics"] = MetricRecord(outcome.metrics)
    return check_reply(content, allowed_metrics=evaluate_metrics(config.data.task), count_floors=not settings.simulated)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model locally (with DP when configured), within the site's policy."""
    return handle("train", msg, context, train_body)


@app.query("secagg")
def secagg(msg: Message, context: Context) -> Message:
    """Answer a stage of secure aggregation (keys, shares, unmasking): see client/secagg.py."""
    return handle("secagg", msg, context, _secagg)


def _secagg(msg: Message, context: Context, request: Request) -> RecordDict:
    setup(msg, context, request)  # the run config and the site's settings are checked as for any request
    stage, content = answer_stage(msg, context)
    request.audit["stage"] = stage
    return content


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's own test split."""
    return handle("evaluate", msg, context, _evaluate)
