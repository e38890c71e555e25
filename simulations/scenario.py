"""Scenario checks and descriptions: the research settings of a run, validated and put in words.

:func:`scenario_problems` is called by :func:`simulations.harness.resolve_config`,
so an impossible scenario (an attacker at site 7 of 5, three fractions for four
sites) fails before any site starts, every problem named by its key.
:func:`describe_scenario` is what run and sweep reports print.
"""

from __future__ import annotations

import logging
from typing import Any

from federation.attacks import malicious_sites
from federation.config import ExperimentConfig
from federation.data.shift import parse_components
from federation.data.skew import quantity_shares
from federation.faults import _count

logger = logging.getLogger(__name__)


def scenario_problems(config: ExperimentConfig) -> list[str]:
    """Problems a run would only hit once its sites start (empty: fine).

    Unknown dataset, model or strategy names, and scenario settings that span
    sections (attackers beyond ``data.num_sites``, one fraction per site, known
    shift components). A dropout rate that leaves fewer sites than the quorum is
    allowed (those rounds do not aggregate) but logged as a warning.
    """
    from federation.data import available_datasets
    from federation.models import available_models
    from strategies import available_strategies

    problems = []
    data = config.data
    for key, value, names in (("data.dataset", data.dataset, available_datasets()),
                              ("model.name", config.model.name, available_models()),
                              ("strategy.name", config.strategy.name.strip().lower(), available_strategies())):
        if value not in names:
            problems.append(f"{key}: unknown name {value!r}; valid names: {', '.join(names)}")
    if data.partition == "quantity":
        try:
            quantity_shares(num_sites=data.num_sites, fractions=data.quantity_fractions,
                            exponent=data.quantity_exponent)
        except ValueError as err:
            problems.append(str(err))
    if data.site_shift == "acquisition":
        try:
            parse_components(data.shift_components)
        except ValueError as err:
            problems.append(str(err))
    from strategies.secagg import secagg_config_problems

    problems.extend(secagg_config_problems(config))  # secagg.* with a robust aggregator, central DP, ...
    try:
        malicious_sites(config.attack, num_sites=data.num_sites)
    except ValueError as err:
        problems.append(str(err))
    quorum = min(config.strategy.min_sites, data.num_sites)
    healthy = data.num_sites - _count(config.faults.dropout_rate, data.num_sites)
    if healthy < quorum:
        logger.warning(
            "faults.dropout_rate=%g leaves %d of %d sites per round, below the quorum strategy.min_sites=%d: "
            "rounds from faults.start_round on will not aggregate", config.faults.dropout_rate, healthy,
            data.num_sites, quorum,
        )
    return problems


def describe_scenario(config: ExperimentConfig) -> dict[str, str]:
    """One line per aspect of the scenario: partition, feature shift, faults, attack."""
    data = config.data
    partition = {
        "iid": "IID (random, equal sizes)",
        "dirichlet": f"label skew, Dirichlet alpha={data.alpha}",
        "quantity": "quantity skew, sizes "
        + (f"in proportions {data.quantity_fractions}" if data.quantity_fractions.strip()
           else f"~ k^-{data.quantity_exponent} (power law)"),
        "natural": "natural split (each site = one real hospital)",
    }[data.partition]
    if data.site_shift == "acquisition":
        shift = f"MONAI acquisition profiles, strength {data.shift_strength} ({data.shift_components})"
    elif data.site_shift == "default" and data.dataset == "synthetic":
        shift = "the synthetic dataset's own per-site scanner shift"
    else:
        shift = "none"
    faults = "none"
    if config.faults.dropout_rate or config.faults.straggler_rate:
        faults = (f"{config.faults.dropout_rate:g} of sites drop out and {config.faults.straggler_rate:g} reply "
                  f"{config.faults.straggler_delay:g}s late per round, from round {config.faults.start_round} "
                  f"(quorum {min(config.strategy.min_sites, data.num_sites)})")
    attack = "none"
    if config.attack.kind != "none":
        sites = ", ".join(f"site-{k + 1}" for k in malicious_sites(config.attack, num_sites=data.num_sites))
        detail = {"scale": f" x{config.attack.scale:g}", "gaussian": f" (std {config.attack.noise_std:g})"}
        attack = (f"{config.attack.kind}{detail.get(config.attack.kind, '')} at {sites}, "
                  f"from round {config.attack.start_round}")
    return {"partition": partition, "feature shift": shift, "faults": faults, "attack": attack}


def scenario_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The raw scenario settings (for JSON)."""
    return {
        "data": {k: getattr(config.data, k) for k in (
            "dataset", "num_sites", "partition", "alpha", "quantity_fractions", "quantity_exponent",
            "site_shift", "shift_strength", "shift_components")},
        "faults": config.faults.model_dump(),
        "attack": config.attack.model_dump(),
    }
