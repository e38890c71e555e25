"""Secure aggregation (SecAgg+, Bell et al. 2020) for Flower's Message API: the protocol maths.

The coordinator learns only the sum of the sites' updates. This package holds what
both sides compute, with no Flower app code: the protocol's parameters and share
graph (:mod:`.params`), the update vector, its quantization and the pairwise and
self masks (:mod:`.vectors`), a site's side of the protocol (:mod:`.site`) and the
coordinator's reconstruction of the sum (:mod:`.unmask`). The cryptographic
primitives are Flower's (``flwr.common.secure_aggregation``: Shamir sharing,
authenticated encryption) and ``cryptography``'s (ECDH key agreement, AES-CTR as
the mask generator); nothing new is invented here.

The Message exchanges that carry the protocol live in the apps:
``strategies/secagg.py`` (coordinator) and ``client/secagg.py`` (site).
"""

from federation.secagg.params import SecAggParams, share_graph
from federation.secagg.site import SecAggProtocolError, SiteSecAgg
from federation.secagg.unmask import reconstruct_sum
from federation.secagg.vectors import VectorLayout

__all__ = [
    "SecAggParams",
    "SecAggProtocolError",
    "SiteSecAgg",
    "VectorLayout",
    "reconstruct_sum",
    "share_graph",
]
