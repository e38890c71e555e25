"""Poisoning attacks of malicious sites, as plain functions (simulation only).

A research harness needs adversaries to test robust aggregation. Four classic ones:

* ``label_flip`` (data poisoning): the site trains honestly on flipped labels,
  ``y -> C - 1 - y`` (binary: 0 <-> 1);
* ``sign_flip``: it sends ``w_global - delta`` instead of ``w_global + delta``, where
  ``delta = w_local - w_global`` is its honest update;
* ``scale``: it sends ``w_global + k * delta`` (``attack.scale``, e.g. 10);
* ``gaussian``: it sends ``w_global + noise``, fresh ``N(0, attack.noise_std^2)``
  per parameter instead of any update (Fang et al., 2020, "Gaussian attack").

Only floating-point parameters and buffers are attacked; integer buffers (e.g.
BatchNorm's ``num_batches_tracked``) pass through unchanged. Nothing here runs
unless ``attack.kind`` is set, and only the simulation's ClientApp applies it, at
simulated sites (:mod:`simulations.adversary_app`; a deployed site never loads it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import TensorDataset

from federation.config.schema import AttackConfig, parse_site_list

logger = logging.getLogger(__name__)

UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian")
"""Attacks that change what a site sends (the others change what it trains on)."""
DATA_ATTACKS = ("label_flip",)
"""Attacks that change the site's training data."""


def malicious_sites(config: AttackConfig, *, num_sites: int) -> tuple[int, ...]:
    """Zero-based indices of the malicious sites (empty when ``attack.kind`` is ``none``).

    Raises:
        ValueError: A listed site does not exist, or an attack names no site.
    """
    if config.kind == "none":
        return ()
    sites = parse_site_list(config.sites)
    if not sites:
        raise ValueError(f"attack.kind={config.kind} needs attack.sites (1-based site numbers, e.g. '5')")
    beyond = [s for s in sites if s > num_sites]
    if beyond:
        raise ValueError(f"attack.sites lists {beyond}, but data.num_sites={num_sites} (sites are 1..{num_sites})")
    return tuple(s - 1 for s in sites)


def is_attacking(config: AttackConfig, *, site_index: int, num_sites: int, server_round: int) -> bool:
    """Whether site ``site_index`` attacks in ``server_round``."""
    return server_round >= config.start_round and site_index in malicious_sites(config, num_sites=num_sites)


def flip_labels(labels: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """``y -> num_classes - 1 - y`` (a new tensor; binary labels swap 0 and 1)."""
    return (num_classes - 1) - labels


def label_flipped(dataset: TensorDataset, *, num_classes: int) -> TensorDataset:
    """A copy of ``(images, labels)`` whose labels are flipped; the images tensor is shared, unchanged."""
    images, labels, *rest = dataset.tensors
    return TensorDataset(images, flip_labels(labels, num_classes=num_classes), *rest)


def attack_update(
    *,
    kind: str,
    global_weights: Mapping[str, torch.Tensor],
    local_weights: Mapping[str, torch.Tensor],
    scale: float = 10.0,
    noise_std: float = 1.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Turn an honest update into a malicious one.

    Args:
        kind: ``sign_flip``, ``scale`` or ``gaussian`` (:data:`UPDATE_ATTACKS`).
        global_weights: The weights the site received.
        local_weights: The weights after honest local training (same keys).
        scale: Factor ``k`` of ``scale``.
        noise_std: Standard deviation of ``gaussian``.
        seed: Seed of the ``gaussian`` noise.

    Returns:
        New weights with the same keys, shapes and dtypes; integer entries are the
        honest local ones.

    Raises:
        ValueError: Unknown kind or mismatched keys.
    """
    if kind not in UPDATE_ATTACKS:
        raise ValueError(f"unknown update attack {kind!r}; allowed: {', '.join(UPDATE_ATTACKS)}")
    if set(global_weights) != set(local_weights):
        raise ValueError("global and local weights have different parameter names")
    generator = torch.Generator().manual_seed(int(seed) % (2**63))
    out: dict[str, torch.Tensor] = {}
    for name, local in local_weights.items():
        if not torch.is_floating_point(local):
            out[name] = local.clone()
            continue
        base = global_weights[name].to(local.dtype)
        if kind == "sign_flip":
            out[name] = base - (local - base)
        elif kind == "scale":
            out[name] = base + scale * (local - base)
        else:
            noise = torch.randn(local.shape, generator=generator, dtype=torch.float32) * noise_std
            out[name] = base + noise.to(local.dtype)
    return out


def attack_seed(*, seed: int, site_index: int, server_round: int) -> int:
    """The seed of a site's ``gaussian`` attack in a round (deterministic per run)."""
    return int(np.random.SeedSequence([int(seed), int(site_index), int(server_round), 9101]).generate_state(1)[0])
