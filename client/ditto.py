"""Ditto (Li et al., ICML 2021) at the site: a personal model regularised towards the global one.

With ``train.ditto_lambda = λ > 0`` a site, in every training round, after its usual
update of the global model ``w`` it received (which it sends), also trains its
personal model ``v`` for as many steps on its own data, minimising its loss plus
``λ/2·||v - w||²``. The proximal term is applied as FedProx's is in
:mod:`federation.training.local` (after each optimizer step, ``v <- v - min(lr·λ, 1)·(v - w)``):
a map of the weights that never touches the gradients, so under DP-SGD it is free
post-processing of the clipped, noised step.

Privacy: the personal steps are DP-SGD steps on the site's private data in the run's
one accountant. They are admitted like a round of their own
(:func:`client.admission.admit_train_round`: policy, run and lifetime budgets, the
ledger's reservation of the epsilon after them) between the global update and the
round's ledger commit, so the ledger's record and the epsilon the site reports cover
both; the noise is calibrated for ``2·server.rounds`` rounds
(:func:`client.personal.planned_rounds`). A personal update the budget does not allow
is skipped (the personal model stays as it was), the global update still goes out.

The personal model lives in the site's run state folder
(:data:`client.personal.PERSONAL_MODEL_FILE`), never leaves it (the outbound guard,
:func:`client.personal.check_local_kept`), and is what the site's evaluation reports as
``personal-*`` metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from client.admission import admit_train_round
from client.personal import save_personal_model, load_personal_model

if TYPE_CHECKING:
    from client.ledger import PrivacyLedger
    from client.policy import SitePolicy
    from client.site import SiteSettings
    from federation.config import ExperimentConfig
    from federation.data import SiteData
    from federation.privacy import SitePrivacy
    from federation.training.results import TrainResult

logger = logging.getLogger(__name__)


def ditto_seed(config: ExperimentConfig, settings: SiteSettings, server_round: int) -> int:
    """The personal update's seed: another stream than the global update's (a DP site mixes in its steps)."""
    return int(np.random.SeedSequence([config.seed, server_round, settings.site_index, 21]).generate_state(1)[0])


def train_ditto(
    model: torch.nn.Module,
    *,
    config: ExperimentConfig,
    settings: SiteSettings,
    data: SiteData,
    privacy: SitePrivacy | None,
    ledger: PrivacyLedger,
    policy: SitePolicy | None,
    global_weights: Mapping[str, torch.Tensor],
    server_round: int,
    run_id: int | None,
    result: TrainResult,
) -> TrainResult:
    """Train the site's personal model one round towards ``global_weights``; keep it at the site.

    Args:
        model: The checked-out model holding the global update; it holds it again on return.
        config: The run config with the round's schedule applied.
        settings: The site.
        data: The site's data (its training split trains the personal model).
        privacy: The run's accountant after the global update, or None without DP.
        ledger: The site's ledger (the personal steps' epsilon is reserved in it).
        policy: The site's policy.
        global_weights: The global model received this round (the proximal anchor).
        server_round: The round.
        run_id: Flower's run id (for the ledger).
        result: The global update's result.

    Returns:
        ``result`` with the epsilon the run's accountant holds after both updates.
    """
    from federation.training import model_state, select_device, train_local  # noqa: PLC0415

    admission = admit_train_round(policy=policy, ledger=ledger, config=config, privacy=privacy,
                                  run=settings.run_name, server_round=server_round, run_id=run_id)
    if admission.refusal is not None:
        logger.warning("site %s: no personal (Ditto) update in round %d: %s", settings.name, server_round,
                       admission.refusal)
        return result
    update = model_state(model)  # the global update, put back afterwards for the reply
    personal = load_personal_model(settings)
    model.load_state_dict(dict(global_weights) if personal is None else personal)
    trained = train_local(
        model=model, dataset=data.train, config=config.train, privacy=privacy,
        seed=ditto_seed(config, settings, server_round), proximal_mu=config.train.ditto_lambda,
        proximal_anchor=global_weights, device=select_device(config.train.device),
        noise_source="seeded" if settings.simulated else "secure", task=config.data.task,
    )
    path = save_personal_model(model_state(model), settings)
    model.load_state_dict(update)
    logger.info("site %s: personal (Ditto) update of round %d, %d steps, kept at %s", settings.name,
                server_round, trained.steps, path)
    return dataclasses.replace(result, epsilon=trained.epsilon) if privacy is not None else result
