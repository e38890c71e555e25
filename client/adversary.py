"""Scenario hooks of a *simulated* site: faults and attacks (``faults`` / ``attack`` sections).

:func:`client.site.train_round` calls these three functions. Each one does nothing
unless its config section is set **and** the site is simulated: its ClientApp
runs inside a simulation engine and its node config has no ``state-dir``
(:func:`client.simulated.is_simulated_site`, the one rule). A deployed SuperNode,
or any site with a ``state-dir``, never fails on purpose nor poisons its update,
whatever run config a coordinator sends and whatever its node config lacks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Protocol

import torch
from torch.utils.data import TensorDataset

from federation.attacks import UPDATE_ATTACKS, attack_seed, attack_update, is_attacking, label_flipped
from federation.config import ExperimentConfig
from federation.faults import SiteDropout, round_faults

logger = logging.getLogger(__name__)


class SiteView(Protocol):
    """What these hooks read of :class:`client.site.SiteSettings`."""

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
