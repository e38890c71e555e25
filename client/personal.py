"""Personalization at the site: FedBN (``train.local_norm``), fine-tuning, and what Ditto keeps (client.ditto).

With ``train.local_norm`` a site keeps its own normalisation layers (GroupNorm,
InstanceNorm, frozen BatchNorm: their affine parameters and statistics, see
:func:`federation.models.convert.norm_state_names`) in its state folder
(``<state-dir>/runs/<run>/local_norm.pt``). Each round it trains the global model
with its own norm layers put back, saves them again, and replies with the *global*
values in their place: the tensors that leave are exactly the ones that arrived, so
every strategy averages identical values (the norm layers are not aggregated), the
guard's exact-names rule holds, and :func:`check_local_kept` (the outbound guard)
refuses a reply in which any kept tensor differs from what the coordinator sent.

With ``train.finetune_rounds = F`` the evaluation after the last round first
fine-tunes the final global model on the site's data for F local rounds
(:func:`finetune_after_federation`: DP steps in the site's ε and ledger like any
round) and keeps the result at the site (``personal_model.pt``).

With ``train.ditto_lambda = λ > 0`` (Ditto, Li et al. 2021) each site also trains a
personal model every round (:func:`train_ditto`): from its previous personal model
(the global one in its first round), as many steps as the global update, on the loss
plus ``λ/2·||v - w_global||²`` towards the global model it received. Its DP steps are
admitted, reserved and committed in the run's accountant and the site's ledger with
the global update's (the noise is calibrated for ``2·server.rounds`` rounds); the
personal model stays in ``personal_model.pt`` and :func:`check_local_kept` refuses a
reply that carries any of its trained tensors.

Evaluation then reports the global model's metrics and the site's personalized ones
(``personal-loss``, ``personal-auc``, ``personal-accuracy``: its fine-tuned or Ditto
model, or the global model with its norm layers) under the same disclosure rules.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from client.guard import OutboundViolation
from federation.models.convert import norm_state_names

if TYPE_CHECKING:
    from client.policy import SitePolicy
    from client.site import SiteSettings
    from federation.config import ExperimentConfig
    from federation.data import SiteData

logger = logging.getLogger(__name__)

LOCAL_NORM_FILE = "local_norm.pt"
"""The site's own normalisation layers, in its run state folder."""
PERSONAL_METRICS = ("personal-loss", "personal-auc", "personal-accuracy")
"""Evaluation metrics of the personalized model (whitelisted by the guard)."""


def local_norm_path(settings: SiteSettings) -> Path:
    """Where this site keeps its norm layers for this run."""
    return settings.run_state_dir / LOCAL_NORM_FILE


def load_local_norm(settings: SiteSettings) -> dict[str, torch.Tensor] | None:
    """The site's saved norm layers, or None before its first trained round."""
    path = local_norm_path(settings)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_local_norm(model: nn.Module, settings: SiteSettings) -> bool:
    """Put the site's own norm layers into ``model`` (loaded with the global weights); False if none yet."""
    saved = load_local_norm(settings)
    if saved is None:
        return False
    expected = set(norm_state_names(model))
    if set(saved) != expected:
        raise RuntimeError(f"site {settings.name}: {local_norm_path(settings)} holds other norm layers than the "
                           "model; the run's model changed: start a new run name")
    model.load_state_dict(saved, strict=False)
    return True


def keep_local_norm(model: nn.Module, *, settings: SiteSettings, local: Mapping[str, torch.Tensor],
                    global_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Save ``model``'s norm layers at the site; return ``local`` with the global values in their place."""
    names = norm_state_names(model)
    path = local_norm_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".local-norm-", suffix=".pt")
    os.close(fd)
    torch.save({n: local[n].detach().cpu().clone() for n in names}, tmp)
    os.replace(tmp, path)
    out = dict(local)
    for name in names:
        out[name] = global_weights[name].detach().cpu().clone()
    logger.debug("site %s keeps %d norm tensors local", settings.name, len(names))
    return out


def check_local_kept(weights: Mapping[str, torch.Tensor], *, global_weights: Mapping[str, torch.Tensor],
                     settings: SiteSettings) -> None:
    """Outbound guard for personalization: nothing the site keeps for itself leaves.

    FedBN: every kept norm-layer tensor must leave exactly as it arrived. Ditto (and a
    fine-tuned model): no reply tensor may equal the site's personal model where that
    differs from the global model it received.

    Raises:
        OutboundViolation: A kept (norm-layer) tensor in the reply differs from the global
            one, or a reply tensor is the site's personal one.
    """
    saved = load_local_norm(settings) or {}
    leaked = [n for n in saved if n in weights and not torch.equal(weights[n].cpu(), global_weights[n].cpu())]
    if leaked:
        raise OutboundViolation(f"local norm-layer tensors would leave the site: {leaked[:5]}")
    personal = load_personal_model(settings) or {}  # Ditto / fine-tuning: no tensor the site trained for itself
    leaked = [n for n, v in personal.items() if n in weights and n in global_weights
              and not torch.equal(v, global_weights[n].cpu()) and torch.equal(weights[n].cpu(), v)]
    if leaked:
        raise OutboundViolation(f"personal-model tensors would leave the site: {leaked[:5]}")


PERSONAL_MODEL_FILE = "personal_model.pt"
"""The site's fine-tuned (``train.finetune_rounds``) or Ditto (``train.ditto_lambda``) model, in its run state
folder; it never leaves."""


def personal_state(global_weights: Mapping[str, torch.Tensor],
                   settings: SiteSettings) -> dict[str, torch.Tensor] | None:
    """The site's personalized model: its fine-tuned model if it has one, else the global weights with its
    own norm layers; None if it has neither."""
    tuned = load_personal_model(settings)
    if tuned is not None:
        return tuned
    saved = load_local_norm(settings)
    if saved is None:
        return None
    return {**dict(global_weights), **saved}


def load_personal_model(settings: SiteSettings) -> dict[str, torch.Tensor] | None:
    """The site's fine-tuned or Ditto model (:data:`PERSONAL_MODEL_FILE`), or None before it has one."""
    path = settings.run_state_dir / PERSONAL_MODEL_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def save_personal_model(weights: Mapping[str, torch.Tensor], settings: SiteSettings) -> Path:
    """Write the personal model atomically in the site's run state folder."""
    path = settings.run_state_dir / PERSONAL_MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".personal-", suffix=".pt")
    os.close(fd)
    torch.save({k: v.detach().cpu() for k, v in weights.items()}, tmp)
    os.replace(tmp, path)
    return path


def planned_rounds(config: ExperimentConfig) -> int:
    """Rounds of ``steps_per_round`` DP steps a site's accountant is calibrated for.

    ``server.rounds`` (twice with Ditto: a global and a personal update each round)
    plus ``train.finetune_rounds``.
    """
    per_round = 2 if config.train.ditto_lambda > 0 else 1
    return config.server.rounds * per_round + config.train.finetune_rounds


def finetune_due(config: ExperimentConfig, server_round: int) -> bool:
    """Whether an evaluation of ``server_round`` is the one after federation that fine-tunes."""
    return config.train.finetune_rounds > 0 and server_round == config.server.rounds


def finetune_after_federation(*, config: ExperimentConfig, settings: SiteSettings,
                              global_weights: Mapping[str, torch.Tensor], policy: SitePolicy | None,
                              run_id: int | None = None) -> bool:
    """Fine-tune the final global model on the site's data for ``train.finetune_rounds`` local rounds.

    Each is a training round of its own (rounds ``server.rounds + 1`` ...): admitted by
    the site's policy, its DP steps in the run's accountant and the site's ledger
    (the noise was calibrated for ``server.rounds + train.finetune_rounds`` rounds),
    refused like any round beyond a budget. The result stays at the site
    (:data:`PERSONAL_MODEL_FILE`). Returns whether every round trained.
    """
    from client.site import train_round  # noqa: PLC0415 - client.site imports this module lazily

    weights = {k: v.detach().cpu().clone() for k, v in global_weights.items()}
    for k in range(1, config.train.finetune_rounds + 1):
        outcome = train_round(config=config, settings=settings, global_weights=weights,
                              server_round=config.server.rounds + k, policy=policy, run_id=run_id)
        if outcome.weights is None:
            logger.warning("site %s: fine-tuning round %d not trained (%s)", settings.name, k, outcome.refusal)
            return False
        weights = personal_state(outcome.weights, settings) if config.train.local_norm else dict(outcome.weights)
    path = save_personal_model(weights, settings)
    logger.info("site %s fine-tuned the global model for %d rounds; kept at %s", settings.name, k, path)
    return True


def personal_metrics(model: nn.Module, *, dataset: torch.utils.data.Dataset, global_weights: Mapping[str, torch.Tensor],
                     settings: SiteSettings, device: torch.device, batch_size: int) -> dict[str, float]:
    """Loss, AUC and accuracy of the site's personalized model on its test split ({} before it has one).

    ``model`` is loaded with the personalized weights and left so (the caller releases it).
    """
    from federation.training import evaluate  # noqa: PLC0415

    state = personal_state(global_weights, settings)
    if state is None:
        return {}
    model.load_state_dict(state)
    result = evaluate(model=model, dataset=dataset, batch_size=batch_size, device=device)
    return {"personal-loss": float(result.loss), "personal-auc": float(result.auc),
            "personal-accuracy": float(result.accuracy)}


def personal_task_metrics(model: nn.Module, *, data: SiteData, config: ExperimentConfig,
                          released: Mapping[str, float], global_weights: Mapping[str, torch.Tensor],
                          settings: SiteSettings) -> dict[str, float]:
    """A task with its own site metrics (segmentation): the personalized model's loss and headline (``dice``).

    Sent as ``personal-loss`` and ``personal-<headline>`` only where the global model's
    headline was released (the same test cases, so the same case-count floor holds).
    ``model`` is loaded with the personalized weights and left so (the caller releases it).
    """
    from federation.tasks import get_task, headline_metric  # noqa: PLC0415
    from federation.training import select_device  # noqa: PLC0415

    headline = headline_metric(config.data.task)
    state = personal_state(global_weights, settings)
    if state is None or headline not in released:
        return {}
    model.load_state_dict(state)
    own = get_task(config.data.task).site_metrics(model=model, data=data, config=config,
                                                  device=select_device(config.train.device)) or {}
    return {f"personal-{name}": float(own[name]) for name in ("loss", headline) if name in own}


def release_personal(personal: Mapping[str, float], *, released: Mapping[str, float], num_examples: int,
                     min_count: int) -> dict[str, float]:
    """What of ``personal`` a real site may send: as the global metrics' rules (AUC when the labels may be
    described, accuracy when its count of correct cases is at least k from either end)."""
    from federation.metrics.disclosure import COUNT_FLOOR, count_ok  # noqa: PLC0415

    k = max(COUNT_FLOOR, int(min_count))
    out = {}
    if "personal-loss" in personal:
        out["personal-loss"] = personal["personal-loss"]
    if "personal-auc" in personal and "auc" in released:
        out["personal-auc"] = personal["personal-auc"]
    accuracy = personal.get("personal-accuracy")
    if accuracy is not None and count_ok(round(accuracy * num_examples), num_examples, k):
        out["personal-accuracy"] = accuracy
    return out
