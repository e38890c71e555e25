"""Registrations of Flower's built-in (Message API) strategies.

Each builder maps :class:`~federation.config.StrategyConfig` fields onto one
Flower constructor; ``**common`` carries the shared arguments computed by
:func:`strategies.registry.common_strategy_kwargs`. Imported for its side effect
by ``strategies/__init__.py``.

FedAvg, FedProx, FedAvgM, FedAdam, FedYogi and FedAdagrad are built as their
:mod:`strategies.streaming` subclasses: the same strategy and the same numbers,
with a weighted average that needs O(model) memory instead of a copy per reply.

Config field -> constructor parameter:

============== ============================================================
fedavg         (common only)
fedprox        proximal_mu
fedavgm        server_lr -> server_learning_rate, server_momentum
fedadam        eta, eta_l, beta_1, beta_2, tau
fedyogi        eta, eta_l, beta_1, beta_2, tau
fedadagrad     eta, eta_l, tau (FedAdagrad has no betas)
fedmedian      (common only)
fedtrimmedavg  trim_beta -> beta
krum           num_malicious -> num_malicious_nodes
multikrum      num_malicious -> num_malicious_nodes,
               num_to_keep -> num_nodes_to_select (0: num_sites - num_malicious)
bulyan         num_malicious -> num_malicious_nodes (needs num_sites >= 4f + 3)
============== ============================================================
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from federation.config import StrategyConfig
from strategies.registry import register_strategy
from strategies.streaming import (
    StreamingFedAdagrad,
    StreamingFedAdam,
    StreamingFedAvg,
    StreamingFedAvgM,
    StreamingFedProx,
    StreamingFedYogi,
)

logger = logging.getLogger(__name__)


def _check_malicious(config: StrategyConfig, *, num_sites: int) -> None:
    """Reject an impossible number of malicious sites and warn below Krum's bound."""
    if config.num_malicious >= num_sites:
        raise ValueError(
            f"strategy.num_malicious={config.num_malicious} must be smaller than "
            f"data.num_sites={num_sites} for {config.name}."
        )
    if num_sites <= 2 * config.num_malicious + 2:
        logger.warning(
            "%s's guarantee needs data.num_sites > 2 * strategy.num_malicious + 2 (got %d sites, %d malicious).",
            config.name,
            num_sites,
            config.num_malicious,
        )


def build_fedavg(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`FedAvg` (streaming aggregation)."""
    return StreamingFedAvg(**common)


def build_fedprox(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`FedProx` (sites read ``proximal-mu`` from the train config)."""
    return StreamingFedProx(**common, proximal_mu=config.proximal_mu)


def build_fedavgm(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`FedAvgM` with server learning rate and momentum."""
    return StreamingFedAvgM(**common, server_learning_rate=config.server_lr, server_momentum=config.server_momentum)


def build_fedadam(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`FedAdam`."""
    return StreamingFedAdam(
        **common, eta=config.eta, eta_l=config.eta_l, beta_1=config.beta_1, beta_2=config.beta_2, tau=config.tau
    )


def build_fedyogi(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`FedYogi`."""
    return StreamingFedYogi(
        **common, eta=config.eta, eta_l=config.eta_l, beta_1=config.beta_1, beta_2=config.beta_2, tau=config.tau
    )


def build_fedadagrad(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`FedAdagrad` (no betas: Flower fixes them to 0)."""
    return StreamingFedAdagrad(**common, eta=config.eta, eta_l=config.eta_l, tau=config.tau)


def build_fedmedian(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`FedMedian`."""
    return FedMedian(**common)


def build_fedtrimmedavg(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`FedTrimmedAvg` cutting ``trim_beta`` at each end."""
    return FedTrimmedAvg(**common, beta=config.trim_beta)


def build_krum(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`Krum`."""
    _check_malicious(config, num_sites=num_sites)
    return Krum(**common, num_malicious_nodes=config.num_malicious)


def build_multikrum(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`MultiKrum` averaging ``num_to_keep`` (0: n - f) selected updates."""
    _check_malicious(config, num_sites=num_sites)
    if config.num_to_keep > num_sites:
        raise ValueError(
            f"strategy.num_to_keep={config.num_to_keep} exceeds data.num_sites={num_sites} for multikrum."
        )
    num_to_keep = config.num_to_keep or num_sites - config.num_malicious
    return MultiKrum(**common, num_malicious_nodes=config.num_malicious, num_nodes_to_select=num_to_keep)


def build_bulyan(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`Bulyan`, which needs ``num_sites >= 4 * num_malicious + 3``."""
    required = 4 * config.num_malicious + 3
    if num_sites < required:
        raise ValueError(
            f"bulyan needs data.num_sites >= 4 * strategy.num_malicious + 3 = {required}, "
            f"got data.num_sites={num_sites} with strategy.num_malicious={config.num_malicious}."
        )
    return Bulyan(**common, num_malicious_nodes=config.num_malicious)


BUILTIN_BUILDERS = {
    "fedavg": build_fedavg,
    "fedprox": build_fedprox,
    "fedavgm": build_fedavgm,
    "fedadam": build_fedadam,
    "fedyogi": build_fedyogi,
    "fedadagrad": build_fedadagrad,
    "fedmedian": build_fedmedian,
    "fedtrimmedavg": build_fedtrimmedavg,
    "krum": build_krum,
    "multikrum": build_multikrum,
    "bulyan": build_bulyan,
}
"""Built-in name -> builder, registered below."""

for _name, _builder in BUILTIN_BUILDERS.items():
    register_strategy(_name, _builder)
