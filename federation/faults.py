"""Simulated site faults: which sites drop out or reply late in a round (deterministic).

Each round from ``faults.start_round`` on, ``round(dropout_rate * num_sites)``
sites fail (their training request ends in an error reply, as a crashed or
unreachable hospital's would) and ``round(straggler_rate * num_sites)`` of the
others reply ``straggler_delay`` seconds late. Which sites is drawn from
``(seed, round)`` alone, so a run and its rerun see the same faults, and the
quorum (``strategy.min_sites``) decides whether a round still aggregates.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from federation.config.schema import FaultsConfig

Fault = Literal["drop", "late"]

_FAULT_STREAM = 9001


class SiteDropout(RuntimeError):
    """A simulated site failure: the site's reply to this round is an error."""


def _count(rate: float, num_sites: int) -> int:
    return int(math.floor(rate * num_sites + 0.5))


def round_faults(config: FaultsConfig, *, num_sites: int, server_round: int, seed: int) -> dict[int, Fault]:
    """The faulty sites of one round.

    Args:
        config: The ``faults`` section.
        num_sites: Sites in the federation.
        server_round: The round (from 1).
        seed: Experiment seed.

    Returns:
        Zero-based site index -> ``"drop"`` or ``"late"``; sites not listed behave.
    """
    if server_round < config.start_round or (config.dropout_rate == 0 and config.straggler_rate == 0):
        return {}
    order = np.random.default_rng([int(seed), int(server_round), _FAULT_STREAM]).permutation(num_sites)
    drops = _count(config.dropout_rate, num_sites)
    lates = min(_count(config.straggler_rate, num_sites), num_sites - drops)
    faults: dict[int, Fault] = {int(site): "drop" for site in order[:drops]}
    faults.update({int(site): "late" for site in order[drops : drops + lates]})
    return faults


def fault_schedule(config: FaultsConfig, *, num_sites: int, rounds: int, seed: int) -> dict[int, dict[int, Fault]]:
    """:func:`round_faults` for rounds ``1..rounds`` (rounds without faults left out), for reports."""
    schedule = {r: round_faults(config, num_sites=num_sites, server_round=r, seed=seed) for r in range(1, rounds + 1)}
    return {r: f for r, f in schedule.items() if f}
