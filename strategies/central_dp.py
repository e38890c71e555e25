"""Central (site-level) differential privacy at the coordinator, with an accountant.

Flower 1.42's :class:`DifferentialPrivacyServerSideFixedClipping` clips each site's
model update to an L2 norm ``C`` and adds Gaussian noise of standard deviation
``z * C / n`` to the aggregate (``n`` = sites sampled per round). medfed wraps the
configured strategy with it (``central_dp.enabled``) and adds what Flower's own
accounting would need ``flwr[dp]`` for:

* **uniform averaging**: the noise calibration assumes a plain mean of ``n``
  clipped updates, so every site's weight (``num-examples``) is set to 1 before the
  inner strategy averages (only mean-aggregating strategies are allowed: fedavg,
  fedprox);
* **an Opacus RDP accountant**: each released aggregate of ``m`` updates is a
  Gaussian mechanism with sensitivity ``C / m`` and noise ``z C / n``, i.e. noise
  multiplier ``z m / n`` (``z`` when every sampled site replied), composed over
  rounds without sampling amplification (every round counts fully for every site:
  an upper bound). ε at ``central_dp.target_delta`` is logged and written to
  ``central_privacy.jsonl`` in the run directory after every round; on resume the
  accountant replays that file, so spent budget is never forgotten.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy
from opacus.accountants import RDPAccountant

from federation.config import ExperimentConfig

logger = logging.getLogger(__name__)

CENTRAL_DP_FILE = "central_privacy.jsonl"
#: Strategies whose aggregate is a plain mean of the updates (the noise calibration needs it).
MEAN_STRATEGIES = ("fedavg", "fedprox")


def central_epsilon(*, noise_multipliers: Iterable[float], delta: float) -> float:
    """ε after releasing one Gaussian aggregate per noise multiplier (no sampling amplification)."""
    accountant = RDPAccountant()
    for z in noise_multipliers:
        accountant.step(noise_multiplier=z, sample_rate=1.0)
    return float(accountant.get_epsilon(delta=delta)) if accountant.history else 0.0


class AccountedServerSideClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, uniform site weights, and an Opacus RDP accountant.

    Args:
        strategy: The strategy to wrap (its aggregate must be a mean: FedAvg, FedProx).
        noise_multiplier: ``z``: noise std is ``z * clipping_norm / num_sampled_clients``.
        clipping_norm: ``C``: L2 bound on each site's update.
        num_sampled_clients: ``n``: sites sampled per round.
        delta: δ at which ε is reported.
        log_path: JSON-lines file receiving one record per released aggregate (and
            replayed into the accountant when it already exists, e.g. on resume).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        delta: float,
        log_path: Path | None = None,
    ) -> None:
        if not isinstance(strategy, FedAvg):
            raise ValueError(
                f"central DP needs a mean-aggregating strategy ({MEAN_STRATEGIES}), got {type(strategy).__name__}"
            )
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.delta = delta
        self.log_path = log_path
        self.releases: list[float] = []  # effective noise multiplier of every released aggregate
        if log_path is not None and log_path.is_file():
            for line in log_path.read_text().splitlines():
                self.releases.append(float(json.loads(line)["effective_noise_multiplier"]))
            logger.info("central DP: %d earlier releases replayed from %s", len(self.releases), log_path)

    @property
    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta`."""
        return central_epsilon(noise_multipliers=self.releases, delta=self.delta)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Uniform weights, then Flower's clip + average + noise; then account for the release."""
        replies = list(replies)
        weight_key = self.strategy.weighted_by_key  # type: ignore[attr-defined]
        contributing = 0
        for reply in replies:
            if reply.has_error():
                continue
            contributing += 1
            for record in reply.content.metric_records.values():
                if weight_key in record:
                    record[weight_key] = 1.0
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self._account(server_round, contributing)
        return arrays, metrics

    def _account(self, server_round: int, contributing: int) -> None:
        effective = self.noise_multiplier * contributing / self.num_sampled_clients
        self.releases.append(effective)
        epsilon = self.epsilon
        record = {
            "round": server_round,
            "sites": contributing,
            "noise_multiplier": self.noise_multiplier,
            "effective_noise_multiplier": effective,
            "clipping_norm": self.clipping_norm,
            "epsilon": epsilon,
            "delta": self.delta,
        }
        logger.info("central DP round %d: %d site updates, z_eff=%.4g, ε=%.4f (δ=%g)",
                    server_round, contributing, effective, epsilon, self.delta)
        if self.log_path is not None:
            with self.log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def with_central_dp(strategy: Strategy, *, config: ExperimentConfig, log_path: Path | None = None) -> Strategy:
    """Wrap ``strategy`` for central DP when ``config.central_dp.enabled``; otherwise return it unchanged.

    Sites sampled per round ``n`` = ``data.num_sites * strategy.fraction_train`` (at least 1).

    Raises:
        ValueError: When enabled with a strategy that does not average (names the allowed ones).
    """
    dp = config.central_dp
    if not dp.enabled:
        return strategy
    if config.strategy.name.strip().lower() not in MEAN_STRATEGIES:
        raise ValueError(
            f"central_dp.enabled=true needs strategy.name in {list(MEAN_STRATEGIES)} (a plain mean of "
            f"clipped updates), got {config.strategy.name!r}; disable central_dp or change the strategy"
        )
    return AccountedServerSideClipping(
        strategy,
        noise_multiplier=dp.noise_multiplier,
        clipping_norm=dp.clipping_norm,
        num_sampled_clients=max(1, int(config.data.num_sites * config.strategy.fraction_train)),
        delta=dp.target_delta,
        log_path=log_path,
    )
