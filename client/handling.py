"""How the ClientApp handles a request: policy first, guard on the way out, audit always.

:func:`handle` wraps each ClientApp handler body so that

* every reply passes the outbound guard inside the body (:func:`client.guard.check_reply`);
* every request, reply, refusal and failure is written to the site's audit log
  *before* the reply leaves (a reply that cannot be audited is not sent);
* any exception becomes :func:`client.guard.error_reply`, whose reason is the same
  for every failure: the exception (type, file paths, DICOM values) stays in the
  site's own log and audit log.

:func:`check_policy_at_start` is the ClientApp lifespan check: the policy is
validated every time the ClientApp starts, before it handles anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.audit import AuditLog, describe_config, describe_sent
from client.guard import error_reply
from client.policy import PolicyError, SitePolicy, policy_source, site_policy
from client.ledger import PrivacyLedger
from client.site import SiteConfigError, SiteSettings, TrainOutcome, check_node_config, site_settings
from federation.config import ExperimentConfig, from_flat

logger = logging.getLogger(__name__)


class SitePolicyInvalid(RuntimeError):
    """The site's policy file is invalid; the details (file, keys) are in the site's log only."""

    def __init__(self) -> None:
        super().__init__("the site's policy file is invalid; details are in the site's own log")


class SiteNodeConfigIncomplete(RuntimeError):
    """A real site's node config lacks site-name, data-dir or state-dir; which one is in the site's log only."""

    def __init__(self) -> None:
        super().__init__("the site's node config is incomplete; details are in the site's own log")


@dataclass
class Request:
    """What a handler learned about a request, for the audit log (filled in as it goes)."""

    event: str
    settings: SiteSettings | None = None
    audit: dict[str, Any] = field(default_factory=dict)


def _message_config(msg: Message) -> ConfigRecord | None:
    record = msg.content.get("config") if msg.has_content() else None
    return record if isinstance(record, ConfigRecord) else None


def setup(msg: Message, context: Context, request: Request) -> tuple[ExperimentConfig, SiteSettings, SitePolicy | None]:
    """Validate the run config, resolve the site's settings and load its policy (on first use)."""
    config = from_flat(context.run_config, source="run config received by the site")
    round_config = _message_config(msg) or {}
    run_name = str(round_config.get("run-name", "run"))
    request.settings = site_settings(node_config=context.node_config, config=config, run_name=run_name)
    policy = site_policy(node_config=context.node_config, run_config=context.run_config)
    return config, request.settings, policy


def train_audit(outcome: TrainOutcome, settings: SiteSettings) -> dict[str, Any]:
    """Audit fields of a training round: epsilons before/after (run and lifetime), delta, refusal."""
    admission = outcome.admission
    fields: dict[str, Any] = {"refused": outcome.refusal}
    if outcome.replayed:  # a redone round: the reply already sent, nothing spent
        fields["replayed"] = True
    if admission is None or admission.run_epsilon_before is None:
        return fields
    trained = outcome.refusal is None
    ledger = PrivacyLedger.open(settings.state_dir)
    fields.update(
        epsilon_before=admission.run_epsilon_before,
        epsilon_after=outcome.metrics["epsilon"] if trained else admission.run_epsilon_before,
        epsilon_planned=admission.run_epsilon_after,
        lifetime_epsilon_before=admission.lifetime_epsilon_before,
        lifetime_epsilon_after=ledger.spent_epsilon() if trained else admission.lifetime_epsilon_before,
        lifetime_delta=ledger.spent_delta(),
        delta=outcome.metrics.get("delta") if trained else None,
    )
    return fields


def _write(request: Request, entry: dict[str, Any]) -> None:
    settings = request.settings
    if settings is None:
        logger.error("request failed before the site's state dir was known; not audited: %s", entry.get("error"))
        return
    AuditLog(settings.state_dir, durable=not settings.simulated).append(
        {"site": settings.name, "run_name": settings.run_name, **entry})


def handle(
    event: str,
    msg: Message,
    context: Context,
    body: Callable[[Message, Context, Request], RecordDict],
) -> Message:
    """Run ``body`` (which returns guard-checked reply content), audit it, and reply.

    Args:
        event: ``"train"`` or ``"evaluate"`` (names the audit entry).
        msg: The coordinator's message.
        context: The ClientApp context.
        body: The handler body; it may add fields (epsilons, refusal) to ``request.audit``.

    Returns:
        The reply, or an error reply without exception text when anything failed.
    """
    round_config = _message_config(msg)
    request = Request(event=event)
    base = {
        "event": event,
        "run_id": int(context.run_id),
        "round": int(round_config.get("server-round", 0)) if round_config else 0,
        "requested": {
            "run_config": describe_config(context.run_config),
            "message_config": describe_config(round_config),
        },
    }
    try:
        content = body(msg, context, request)
        _write(request, {**base, **request.audit, "sent": describe_sent(content)})
        return Message(content, reply_to=msg)
    except Exception as err:  # noqa: BLE001  (every failure must become a safe reply)
        logger.exception("site failed to handle a %s request", event)
        reply = error_reply(msg, err)
        try:
            _write(request, {**base, **request.audit, "event": "error", "request": event,
                             "error": f"{type(err).__name__}: {err}", "sent": {"error": reply.error.reason}})
        except Exception:  # noqa: BLE001
            logger.exception("could not write the audit entry of the failure")
        return reply


def check_policy_at_start(context: Context) -> Iterator[None]:
    """ClientApp lifespan: refuse to start without a complete node config or under an invalid policy.

    A real site must set ``site-name``, ``data-dir`` and ``state-dir`` itself
    (:func:`client.site.check_node_config`); the full errors go to the site's log.

    Raises:
        SiteNodeConfigIncomplete: A real site's node config lacks one of them.
        SitePolicyInvalid: The policy named by the node (or, simulated, run) config is invalid;
            neither message names a file or key, since Flower sends it to the coordinator.
    """
    try:
        check_node_config(context.node_config)
    except SiteConfigError as err:
        logger.error("site refuses to start: %s", err)
        raise SiteNodeConfigIncomplete() from None
    try:
        site_policy(node_config=context.node_config, run_config=context.run_config)
    except PolicyError as err:
        source = policy_source(node_config=context.node_config, run_config=context.run_config)
        logger.error("site policy from %s is invalid:\n%s", source.origin, err)
        raise SitePolicyInvalid() from None
    yield
