"""Strategy registry: names -> builders of Flower (Message API) strategies.

A *builder* turns a validated :class:`~federation.config.StrategyConfig` into a
ready :class:`flwr.serverapp.strategy.Strategy`. The built-in builders (FedAvg,
FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum,
MultiKrum, Bulyan) are registered in :mod:`strategies.builtin` when the
``strategies`` package is imported.

How to register a new strategy
==============================

1. Write a builder with this calling convention::

       def builder(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy

   ``common`` holds the keyword arguments every Flower ``FedAvg``-family
   constructor takes (see :class:`CommonStrategyKwargs`): ``fraction_train``,
   ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``,
   ``min_available_nodes``, ``train_metrics_aggr_fn`` and
   ``evaluate_metrics_aggr_fn``. Pass them through unchanged and add the
   parameters your strategy reads from ``config``. Validate combinations that can
   only be judged against ``num_sites`` here and raise ``ValueError`` naming the
   config keys (``strategy.<field>``, ``data.num_sites``).

2. Register it under a lower-case name, once, at import time of your module::

       from flwr.serverapp.strategy import FedAvg
       from strategies import register_strategy

       class FedAvgLogged(FedAvg):
           # FedAvg that logs the number of replies: override one hook, call super().

           def aggregate_train(self, server_round, replies):
               replies = list(replies)
               logger.info("round %d: %d replies", server_round, len(replies))
               return super().aggregate_train(server_round, replies)

       def _build_fedavg_logged(config, *, num_sites, **common):
           return FedAvgLogged(**common)

       register_strategy("fedavg-logged", _build_fedavg_logged)

   Registering an existing name raises ``ValueError`` unless
   ``replace=True`` is passed (the one rule of :mod:`federation.registries`,
   shared with models and datasets).

   **From an installed package (coordinator only).** A package can offer builders
   through the ``medfed.strategies`` entry-point group, each under its strategy
   name::

       [project.entry-points."medfed.strategies"]
       fedavg-logged = "my_package.strategies:build_fedavg_logged"

   They are registered on the registry's first use (:func:`load_strategy_plugins`).
   Only packages installed at the coordinator count: a run config selects a name,
   never names code to import (it reaches every hospital).

3. Select it with ``strategy.name: fedavg-logged`` in the YAML config (or
   ``--set strategy.name=fedavg-logged``). :func:`build_strategy` looks the name
   up case-insensitively; :func:`available_strategies` lists what is registered.

   If your strategy needs a parameter that :class:`StrategyConfig` does not have,
   add the field to ``federation/config/schema.py`` (every field must be a scalar
   so that it can travel in a Flower run config).

4. If it keeps server-side state across rounds (like FedAdam's moments), teach
   :mod:`strategies.state` to save and restore it, or a resumed run silently
   restarts that state.

Quorum and node minimums
========================

``config.min_sites`` is the quorum: the fewest successful site replies a round
may aggregate. All three Flower minimums (``min_train_nodes``,
``min_evaluate_nodes``, ``min_available_nodes``) are set to
``min(config.min_sites, num_sites)``. Flower's ``sample_nodes`` waits until
``max(min_available_nodes, sample_size)`` nodes are connected, with
``sample_size = max(int(connected * fraction), min_*_nodes)``, so a round starts
as soon as a quorum of sites is connected instead of waiting for every site
(``min_available_nodes = num_sites`` would block a round on a single offline
hospital). Enforcing the quorum on *replies* is the job of
:class:`strategies.quorum.QuorumStrategy`.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any, TypedDict

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from federation.config import StrategyConfig
from federation.registries import check_new_name, unknown_name
from strategies.metrics import aggregate_metrics_nan_safe

logger = logging.getLogger(__name__)

StrategyBuilder = Callable[..., Strategy]
"""``builder(config: StrategyConfig, *, num_sites: int, **common) -> Strategy``."""

_REGISTRY: dict[str, StrategyBuilder] = {}
#: The entry-point group of coordinator-side strategy plug-ins (name -> builder).
PLUGIN_GROUP = "medfed.strategies"
_plugins_loaded = False


class CommonStrategyKwargs(TypedDict):
    """Keyword arguments shared by every Flower ``FedAvg``-family constructor."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord]
    evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord]


def register_strategy(name: str, builder: StrategyBuilder, *, replace: bool = False) -> None:
    """Register a strategy builder under a name.

    Args:
        name: Lower-case name (letters, digits, ``_`` and ``-``; starts with a letter)
            used as ``strategy.name`` in the config.
        builder: Callable ``builder(config, *, num_sites, **common) -> Strategy``; see
            this module's docstring.
        replace: Replace an existing registration of ``name`` instead of failing.

    Raises:
        ValueError: If ``name`` is not a valid lower-case name, or is already
            registered and ``replace`` is False.
        TypeError: If ``builder`` is not callable.
    """
    check_new_name("strategy", name, _REGISTRY, replace=replace)
    if not callable(builder):
        raise TypeError(f"builder for strategy {name!r} must be callable, got {type(builder).__name__}")
    if name in _REGISTRY:
        logger.info("Replacing the registered strategy %r", name)
    _REGISTRY[name] = builder


def available_strategies() -> list[str]:
    """Return the registered strategy names, sorted.

    Returns:
        The names accepted by ``strategy.name`` (built-in, registered, and the
        installed plug-ins of :data:`PLUGIN_GROUP`).
    """
    load_strategy_plugins()
    return sorted(_REGISTRY)


def load_strategy_plugins() -> list[str]:
    """Register the builders that installed packages offer in :data:`PLUGIN_GROUP` (once per process).

    Returns:
        The plug-in names registered by this call (empty after the first).

    Raises:
        RuntimeError: A plug-in cannot be imported, or its name is invalid or taken
            (a plug-in never replaces a registered strategy); the message names the
            entry point and its package.
    """
    global _plugins_loaded  # noqa: PLW0603 - once per process
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    added = []
    for point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        package = point.dist.name if point.dist is not None else "an unknown package"
        try:
            register_strategy(point.name, point.load())
        except Exception as err:  # noqa: BLE001 - named with its origin, then raised
            raise RuntimeError(
                f"strategy plug-in {point.name!r} = {point.value!r} of {package} ({PLUGIN_GROUP} entry point): "
                f"{type(err).__name__}: {err}"
            ) from err
        logger.info("Registered strategy plug-in %r from %s", point.name, package)
        added.append(point.name)
    return added


def common_strategy_kwargs(config: StrategyConfig, *, num_sites: int) -> CommonStrategyKwargs:
    """Compute the keyword arguments every built-in builder receives as ``**common``.

    Args:
        config: The validated strategy section.
        num_sites: Number of sites (``data.num_sites``).

    Returns:
        The shared constructor arguments (fractions, node minimums clamped to
        ``num_sites`` and the NaN-safe metric aggregators).
    """
    quorum = min(config.min_sites, num_sites)
    return CommonStrategyKwargs(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=quorum,
        min_evaluate_nodes=quorum,
        min_available_nodes=quorum,
        train_metrics_aggr_fn=aggregate_metrics_nan_safe,
        evaluate_metrics_aggr_fn=aggregate_metrics_nan_safe,
    )


def build_strategy(config: StrategyConfig, *, num_sites: int) -> Strategy:
    """Build the strategy named by ``config.name``.

    Args:
        config: The validated strategy section of the experiment config.
        num_sites: Number of sites in the federation (``data.num_sites``).

    Returns:
        A new, unwrapped Flower strategy. Wrap it in
        :class:`strategies.quorum.QuorumStrategy` to enforce ``config.min_sites``.

    Raises:
        ValueError: If the name is not registered (the message lists the valid
            names), ``num_sites`` is below 1, or the builder rejects the
            parameters (e.g. Bulyan with too few sites).
    """
    if num_sites < 1:
        raise ValueError(f"data.num_sites must be at least 1, got {num_sites}.")
    key = config.name.strip().lower()
    load_strategy_plugins()
    builder = _REGISTRY.get(key)
    if builder is None:
        raise unknown_name("strategy", key="strategy.name", name=config.name, valid=available_strategies())
    if config.min_sites > num_sites:
        logger.warning(
            "strategy.min_sites=%d exceeds data.num_sites=%d; node minimums are clamped to %d.",
            config.min_sites,
            num_sites,
            num_sites,
        )
    strategy = builder(config, num_sites=num_sites, **common_strategy_kwargs(config, num_sites=num_sites))
    logger.debug("Built strategy %r as %s", key, type(strategy).__name__)
    return strategy
