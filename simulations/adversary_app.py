"""The simulation's ClientApp: the deployed site's handlers plus the faults and attacks of simulated sites.

medfed's simulation engine (:mod:`simulations.engine`) runs this app; a SuperNode runs
``client.app:app`` (the FAB's ``[tool.flwr.app.components]``), which imports nothing
from here. So the ``faults.*`` and ``attack.*`` sections of a run config are code that a
deployed site never loads, whatever a coordinator sends (``flwr run .`` runs the
deployment app too: scenarios need ``medfed simulate`` or ``medfed sweep``).

A train request goes through the deployed handler (:func:`client.app.train_body`: setup,
policy, secure aggregation, the outbound guard, the audit log) with the site's round
replaced by :func:`simulated_round`, the honest :func:`client.site.train_round` plus:

* faults (:mod:`federation.faults`): a dropped site raises :class:`SiteDropout` before
  training, which the handler turns into the uniform error reply (and audit entry) of a
  crashed site; a late one sleeps ``faults.straggler_delay`` first;
* ``label_flip`` (:mod:`federation.attacks`): the round trains on a label-flipped copy of
  the site's training split;
* update attacks (``sign_flip``, ``scale``, ``gaussian``): applied to the weights the honest
  round produced, *before* the reply is built. The attacker models a site that replaced
  its training code, not its messaging: its update is quantized (``train.transfer_dtype``),
  masked (``secagg.*``) and checked by the outbound guard like an honest one, so it has
  an honest reply's form (names, shapes, dtypes, metrics) and only its values are
  malicious. The guard checks what may leave a site, not honesty: the update passes.
  The site's disk keeps its honest reply (:mod:`client.replay`); a round resent after a
  coordinator restart is attacked again the same way (the attack depends only on the
  run's seed, the site and the round).

Each scenario also requires the site to be simulated (:func:`client.simulated.is_simulated_site`:
inside Flower's simulation actor pool, no ``state-dir``), so even this app, started by
mistake at a hospital, attacks and fails nothing. Evaluation and the secure-aggregation
stages are the deployed handlers, unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from torch.utils.data import TensorDataset

import client.app as deployed
from client.handling import handle
from client.site import SiteSettings, TrainOutcome, load_data, train_round
from federation.attacks import UPDATE_ATTACKS, attack_seed, attack_update, is_attacking, label_flipped
from federation.config import ExperimentConfig
from federation.data import DataMismatch, SiteData
from federation.faults import SiteDropout, round_faults

logger = logging.getLogger(__name__)


class SiteView(Protocol):
    """What the scenarios read of :class:`client.site.SiteSettings`."""

    name: str
    site_index: int
    num_sites: int
    simulated: bool


def inject_fault(config: ExperimentConfig, site: SiteView, *, server_round: int) -> None:
    """Fail (raise :class:`SiteDropout`) or wait, when the ``faults`` schedule says so.

    Raises:
        SiteDropout: This site drops out of ``server_round``.
    """
    if not site.simulated:
        return
    fault = round_faults(config.faults, num_sites=site.num_sites, server_round=server_round,
                         seed=config.seed).get(site.site_index)
    if fault == "drop":
        logger.warning("simulated fault: %s drops out of round %d", site.name, server_round)
        raise SiteDropout(f"{site.name} dropped out of round {server_round} (faults.dropout_rate)")
    if fault == "late":
        logger.info("simulated fault: %s replies %.1fs late in round %d", site.name,
                    config.faults.straggler_delay, server_round)
        time.sleep(config.faults.straggler_delay)


def training_set(
    config: ExperimentConfig, site: SiteView, *, dataset: TensorDataset, num_classes: int, server_round: int
) -> TensorDataset:
    """The site's training data, label-flipped when it is a ``label_flip`` attacker this round."""
    if not (site.simulated and config.attack.kind == "label_flip" and is_attacking(
            config.attack, site_index=site.site_index, num_sites=site.num_sites, server_round=server_round)):
        return dataset
    logger.warning("simulated attack: %s trains on flipped labels in round %d", site.name, server_round)
    return label_flipped(dataset, num_classes=num_classes)


def outgoing_weights(
    config: ExperimentConfig,
    site: SiteView,
    *,
    global_weights: Mapping[str, torch.Tensor],
    local_weights: dict[str, torch.Tensor],
    server_round: int,
) -> dict[str, torch.Tensor]:
    """The weights the site sends: its honest ones, or the attacked ones of an update attacker."""
    if not (site.simulated and config.attack.kind in UPDATE_ATTACKS and is_attacking(
            config.attack, site_index=site.site_index, num_sites=site.num_sites, server_round=server_round)):
        return local_weights
    logger.warning("simulated attack: %s sends a %s update in round %d", site.name, config.attack.kind, server_round)
    return attack_update(
        kind=config.attack.kind,
        global_weights=global_weights,
        local_weights=local_weights,
        scale=config.attack.scale,
        noise_std=config.attack.noise_std,
        seed=attack_seed(seed=config.seed, site_index=site.site_index, server_round=server_round),
    )


def _poisoned_data(config: ExperimentConfig, settings: SiteSettings, *, server_round: int) -> SiteData | None:
    """A label-flip attacker's data this round (train split flipped), or None: the site loads its own."""
    if config.attack.kind != "label_flip" or not settings.simulated:
        return None
    try:
        data = load_data(config, settings)
    except DataMismatch:  # the honest round loads it again and refuses with the reason
        return None
    train = training_set(config, settings, dataset=data.train, num_classes=data.num_classes, server_round=server_round)
    return None if train is data.train else dataclasses.replace(data, train=train)


def simulated_round(
    *,
    config: ExperimentConfig,
    settings: SiteSettings,
    global_weights: Mapping[str, torch.Tensor],
    server_round: int,
    **honest: Any,  # noqa: ANN401 - the rest of client.site.train_round's arguments, passed on as they are
) -> TrainOutcome:
    """:func:`client.site.train_round` of a simulated site, with this round's faults and attacks.

    Raises:
        SiteDropout: The ``faults`` schedule drops this site from ``server_round``.
    """
    inject_fault(config, settings, server_round=server_round)
    outcome = train_round(config=config, settings=settings, global_weights=global_weights, server_round=server_round,
                          data=_poisoned_data(config, settings, server_round=server_round), **honest)
    if outcome.weights is None:  # refused: nothing to attack
        return outcome
    weights = outgoing_weights(config, settings, global_weights=global_weights, local_weights=outcome.weights,
                               server_round=server_round)
    return outcome if weights is outcome.weights else dataclasses.replace(outcome, weights=weights)


app = ClientApp()
app.lifespan()(deployed.lifespan)  # the site's node-config and policy checks, as at a real site


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The deployed train handler, with :func:`simulated_round` as the site's round."""
    return handle("train", msg, context, functools.partial(deployed.train_body, site_round=simulated_round))


app.evaluate()(deployed.evaluate)
app.query("secagg")(deployed.secagg)
