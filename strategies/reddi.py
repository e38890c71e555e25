"""``fedadam-reddi``: FedAdam exactly as Reddi et al. (2020, Algorithm 2) and FLamby run it.

Flower's ``FedAdam`` applies Adam's bias correction to the server step,
``eta_t = eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))``; the paper's
Algorithm 2 and FLamby's ``FedAdam`` use ``eta`` itself. With ``beta_1=0.9`` and
``beta_2=0.999`` Flower's step is 0.24x the paper's in round 1 and 0.15x in round
15, so published FedAdam hyper-parameters under-train in Flower. This strategy
hands Flower ``eta / correction(t)`` for the round (one hook, ``super()`` does the
update), which cancels the correction; everything else (moments, ``tau``,
streaming average) is Flower's FedAdam as built for ``fedadam``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from federation.config import StrategyConfig
from strategies.registry import register_strategy
from strategies.streaming import StreamingFedAdam


def flower_bias_correction(*, server_round: int, beta_1: float, beta_2: float) -> float:
    """The factor Flower's FedAdam multiplies ``eta`` by in ``server_round``."""
    return math.sqrt(1 - beta_2 ** (server_round + 1.0)) / (1 - beta_1 ** (server_round + 1.0))


class FedAdamReddi(StreamingFedAdam):
    """FedAdam without Adam's bias correction (Reddi et al., 2020, Algorithm 2; FLamby)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run Flower's FedAdam step with ``eta`` pre-divided by this round's bias correction."""
        eta = self.eta
        self.eta = eta / flower_bias_correction(server_round=server_round, beta_1=self.beta_1, beta_2=self.beta_2)
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.eta = eta


def build_fedadam_reddi(config: StrategyConfig, *, num_sites: int, **common: Any) -> Strategy:
    """Build :class:`FedAdamReddi` from the same ``strategy.*`` fields as ``fedadam``."""
    return FedAdamReddi(
        **common, eta=config.eta, eta_l=config.eta_l, beta_1=config.beta_1, beta_2=config.beta_2, tau=config.tau
    )


register_strategy("fedadam-reddi", build_fedadam_reddi, replace=True)
