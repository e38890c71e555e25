"""Fast RDP epsilon: the per-step RDP curve of each (noise, sample rate) pair, computed once.

Opacus' RDP accountant recomputes the Rényi divergence of the sampled Gaussian
mechanism at every order (``_compute_rdp``, a series evaluated in Python, ~0.3-1 s
for its 150 default orders on a CPU) each time an epsilon is asked for, although
the RDP of ``T`` steps at fixed ``(sigma, q)`` is just ``T`` times the RDP of one
step. A federated site asks for several epsilons every round (spent so far, after
the next round, after this round) with a new step count each time, so this cost
was paid again and again.

:func:`rdp_epsilon` caches the one-step curve per ``(q, sigma, orders)`` and then
performs exactly the operations of :meth:`opacus.accountants.RDPAccountant.get_privacy_spent`
(``curve * steps`` per history entry, Python ``sum`` over entries,
``get_privacy_spent``), so its result is bit-for-bit the same as Opacus'.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis

DEFAULT_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
"""Opacus' default RDP orders (what ``RDPAccountant.get_epsilon`` uses)."""


@functools.lru_cache(maxsize=1024)
def rdp_per_step(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...] = DEFAULT_ORDERS) -> np.ndarray:
    """The RDP of one step of the sampled Gaussian mechanism at every order (read-only, cached).

    Args:
        sample_rate: Poisson sample rate ``q``.
        noise_multiplier: Noise multiplier ``sigma``.
        orders: RDP orders.

    Returns:
        ``np.array([_compute_rdp(q, sigma, a) for a in orders])``, as Opacus computes it.
    """
    curve = np.array([privacy_analysis._compute_rdp(sample_rate, noise_multiplier, order) for order in orders])
    curve.setflags(write=False)
    return curve


def rdp_epsilon(
    history: Iterable[tuple[float, float, int]], *, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """Epsilon of a ``(noise_multiplier, sample_rate, steps)`` history, as Opacus' RDP accountant gives it.

    Args:
        history: Accountant history entries (Opacus' order: noise, rate, steps).
        delta: Target delta.
        orders: RDP orders (Opacus' defaults unless given).

    Returns:
        The same float as ``RDPAccountant(history).get_epsilon(delta)``; 0.0 for an empty history.
    """
    key = tuple(orders)
    entries = list(history)
    if not entries:
        return 0.0
    rdp = sum([rdp_per_step(float(q), float(sigma), key) * steps for sigma, q, steps in entries])
    eps, _ = privacy_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)
