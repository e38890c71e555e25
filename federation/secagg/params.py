"""The protocol's parameters and its share graph.

SecAgg+ replaces SecAgg's complete graph by a sparse one: each site shares its
secrets with, and masks against, only its neighbours. medfed uses a Harary graph
(a ring over a random order of the sampled sites, each site joined to the
``degree / 2`` sites on either side), as Bell et al. suggest; with as many shares as
sites it is the complete graph of the original SecAgg.

Security needs more than half of a site's share holders to reconstruct any of its
secrets (``threshold > holders / 2``): a coordinator that asks some holders for a
site's self-mask seed and others for its masking key then never gets both.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Updates are summed in uint64 arithmetic: every sum of weighted, quantized values must stay below this.
SUM_BOUND = 2**63


@dataclass(frozen=True)
class SecAggParams:
    """Parameters of one secure-aggregation round, as the coordinator sends them to every site.

    Attributes:
        threshold: Shares needed to reconstruct a secret (more than half of each site's holders).
        clipping_range: Every element of a site's model update is clipped to ``[-range, range]``.
        quantization_bits: Quantized elements are integers in ``[0, 2**bits]``.
        weighting: ``examples``: each update is weighted by the site's example count, capped at
            ``max_weight``, and the coordinator learns only the total; ``uniform``: each site counts once.
        max_weight: Cap on a site's weight (``examples``).
    """

    threshold: int
    clipping_range: float
    quantization_bits: int
    weighting: str
    max_weight: int

    @property
    def target_range(self) -> int:
        """The largest quantized value."""
        return 2**self.quantization_bits

    def check(self, *, num_sites: int, holders: int) -> list[str]:
        """Every reason these parameters are unsafe or unusable for ``num_sites`` sites, ``holders`` per secret."""
        problems = []
        if self.threshold * 2 <= holders:
            problems.append(
                f"threshold {self.threshold} of {holders} share holders: more than half are needed, or a "
                "coordinator could reconstruct both secrets of a site that did not drop out"
            )
        if self.threshold > holders:
            problems.append(f"threshold {self.threshold} is above the {holders} share holders of a site")
        if self.weighting not in ("examples", "uniform"):
            problems.append(f"weighting must be 'examples' or 'uniform', got {self.weighting!r}")
        weight = self.max_weight if self.weighting == "examples" else 1
        if num_sites * weight * (self.target_range + 1) >= SUM_BOUND:
            problems.append(
                f"{num_sites} sites x max_weight {weight} x 2^{self.quantization_bits} overflows the 64-bit sum"
            )
        if not self.clipping_range > 0:
            problems.append(f"clipping_range must be > 0, got {self.clipping_range}")
        return problems

    def to_config(self) -> dict[str, Any]:
        """The parameters as a flat dict of scalars (a Flower ConfigRecord)."""
        return asdict(self)

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> SecAggParams:
        """Read parameters sent by the coordinator (types checked; unsafe values are the caller's to refuse)."""
        try:
            return cls(
                threshold=int(record["threshold"]),
                clipping_range=float(record["clipping_range"]),
                quantization_bits=int(record["quantization_bits"]),
                weighting=str(record["weighting"]),
                max_weight=int(record["max_weight"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"secure aggregation parameters incomplete or malformed: {error}") from None


def holders_per_site(*, num_sites: int, num_shares: int) -> int:
    """Share holders of each secret, the site itself included: all sites, or an odd ``num_shares``.

    Args:
        num_sites: Sites taking part in the round.
        num_shares: Requested holders (0 = every site: SecAgg's complete graph).
    """
    if num_shares <= 0 or num_shares >= num_sites:
        return num_sites
    return max(3, num_shares - (1 - num_shares % 2))  # the Harary graph needs an even degree


def threshold_for(*, holders: int, fraction: float) -> int:
    """The reconstruction threshold: ``ceil(fraction * holders)``, at least a strict majority."""
    return max(holders // 2 + 1, math.ceil(fraction * holders - 1e-9))


def share_graph(node_ids: Sequence[int], *, holders: int, rng: random.Random) -> dict[int, list[int]]:
    """Each site's neighbours (itself excluded) in a Harary graph over a random order of ``node_ids``.

    The relation is symmetric: ``j in graph[i]`` exactly when ``i in graph[j]``.

    Args:
        node_ids: The sites of the round.
        holders: Share holders per secret, the site included (see :func:`holders_per_site`).
        rng: The coordinator's randomness for the order.
    """
    order = list(node_ids)
    rng.shuffle(order)
    n = len(order)
    if holders >= n:
        return {node: [other for other in order if other != node] for node in order}
    half = (holders - 1) // 2
    graph: dict[int, list[int]] = {}
    for position, node in enumerate(order):
        graph[node] = [order[(position + step) % n] for step in range(-half, half + 1) if step != 0]
    return graph
