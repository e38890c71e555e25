"""Is this site simulated? Decided from the process the ClientApp runs in, never from config.

One rule (:func:`is_simulated_site`): a site is simulated only when its ClientApp
runs inside a simulation engine and its node config has no ``state-dir`` (a
hospital's own disk, which only ever makes a site more real). Both simulation engines medfed runs on (its own harness,
:mod:`simulations.engine`, and Flower's simulation runtime behind ``flwr run .``
on a local SuperLink) call the ClientApp inside a worker of Flower's Ray actor
pool (``flwr.simulation.ray_transport.ray_actor.ClientAppActor``). A deployed
SuperNode runs its ClientApp in a process of its own (``flwr-clientapp``, or in
the SuperNode's process), never in a Ray actor, so it is never taken for
simulated: not because of what its node config holds or lacks (``partition-id``,
``site-name``), nor because of any run-config key or environment variable, all
of which a coordinator or an operator's mistake could set. (So medfed's engine
needs no marker of its own: the actor pool it shares with ``flwr run .`` is the mark,
and an environment variable could be inherited by, or copied into, a SuperNode.)

What depends on it: a simulated site may take its paths and policy from the run
config (one run config serves every virtual node) and obeys the ``attack.*`` and
``faults.*`` scenarios (applied by :mod:`simulations.adversary_app`, the ClientApp only
the simulation engine loads, and only at sites this rule calls simulated); a real site
takes its name, folders and policy from its own node config only and never attacks or
fails on purpose.

This is the only place on the site's side that asks about Ray or Flower internals, through
:mod:`federation.flower_internals` (the actor's class).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

from federation.flower_internals import FLOWER_SIMULATION_ACTOR, current_ray_actor_class

logger = logging.getLogger(__name__)

#: Node-config key of a hospital's own disk (client.site.NODE_STATE_DIR).
NODE_STATE_DIR = "state-dir"


def is_simulated_site(node_config: Mapping[str, Any]) -> bool:
    """The one rule: simulated only inside a simulation engine, and never a site with a ``state-dir``.

    A node config can only make a site *more* real: a ``state-dir`` (a hospital's own
    disk) makes even a node inside an engine a real site; nothing a node config lacks
    makes a deployed SuperNode simulated.
    """
    return NODE_STATE_DIR not in node_config and runs_in_simulation()


def runs_in_simulation() -> bool:
    """True only inside a worker of Flower's simulation actor pool (this process is a simulated site).

    Deployed SuperNodes, the tests' own process and any process that has not
    imported Ray get ``False``. The answer is fixed for the life of the process.
    """
    return _in_flower_simulation_actor()


@functools.cache
def _in_flower_simulation_actor() -> bool:
    # a Ray worker imports Ray before it runs any task; the adapter never imports it
    return current_ray_actor_class() == FLOWER_SIMULATION_ACTOR
