"""One round of local training at a site, with or without DP-SGD, optionally FedProx.

Framework-independent: it takes a model, a dataset and typed config and returns a
:class:`TrainResult`; exchanging weights with a server is the caller's job (see
:func:`model_state`).

Batches may be ``(image, label, ...)`` tuples/lists or mappings with ``"image"`` and
``"label"`` keys (MONAI style). Labels may be ``(N,)`` or ``(N, 1)`` integers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from federation.config.schema import TrainConfig
from federation.privacy import (
    SitePrivacy,
    clipped_backward,
    is_empty_batch,
    local_steps,
    noise_only_step,
    strip_module_prefix,
    unwrap_model,
    uses_clipped_backward,
)
from federation.tasks import get_task
from federation.tasks.base import Task
from federation.training.batches import split_batch
from federation.training.device import seed_everything, select_device, set_threads, tune_cpu_allocator, use_amp
from federation.training.results import TrainResult
from federation.training.trainable import apply_trainable

logger = logging.getLogger(__name__)

MAX_PROXIMAL_FACTOR = 1.0
"""Cap on ``lr * mu`` in the proximal update (1.0 = move exactly onto the global weights)."""

NoiseSource = Literal["secure", "seeded"]
"""Where DP-SGD's noise and Poisson sampling come from (see :func:`train_local`)."""
NOISE_SOURCES: tuple[str, ...] = get_args(NoiseSource)


def _check_noise_source(noise_source: str) -> None:
    if noise_source not in NOISE_SOURCES:
        raise ValueError(f"unknown noise_source {noise_source!r}; valid: {', '.join(NOISE_SOURCES)}")


@dataclass
class _Tally:
    """Running totals of one round."""

    steps: int = 0
    empty_steps: int = 0
    examples: int = 0
    loss_sum: torch.Tensor | float = 0.0

    @property
    def mean_loss(self) -> float:
        """Example-weighted mean loss; NaN when no example was seen."""
        if self.examples == 0:
            return math.nan
        return float(self.loss_sum) / self.examples


class _Proximal:
    """FedProx as post-processing: after each step, ``w <- w - lr * mu * (w - w_global)``.

    Applied to the parameters after ``optimizer.step()`` rather than added to the
    loss, so it never touches gradients: under DP-SGD, Opacus overwrites ``p.grad``
    with the clipped, noised per-sample sum, and a data-independent map of the
    weights is free post-processing. ``lr * mu`` is capped at 1 so a huge ``mu``
    pulls exactly onto the global weights instead of overshooting. ``anchors`` (Ditto's
    personal model: the received global weights) replace the starting values.
    """

    def __init__(self, params: list[nn.Parameter], *, lr: float, mu: float,
                 anchors: list[torch.Tensor] | None = None) -> None:
        self._params = params
        self._anchor = [p.detach().clone() for p in params] if anchors is None else anchors
        self._factor = min(lr * mu, MAX_PROXIMAL_FACTOR)
        if lr * mu > MAX_PROXIMAL_FACTOR:
            logger.debug("FedProx lr*mu=%g capped at %g", lr * mu, MAX_PROXIMAL_FACTOR)

    @torch.no_grad()
    def apply(self) -> None:
        """Pull every parameter towards its starting (global) value."""
        for param, anchor in zip(self._params, self._anchor):
            param.sub_(self._factor * (param - anchor))


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that receive gradients."""
    return [p for p in model.parameters() if p.requires_grad]


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam, with the configured lr and weight decay."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def _endless(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``loader`` again and again (fresh shuffles / Poisson draws each pass)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("data loader yielded no batches")


def _round_seed(seed: int, steps_so_far: int) -> int:
    """A 32-bit seed from the caller's seed and the site's accountant step count.

    Mixing in the steps already taken gives every DP round fresh sampling and noise
    streams even when the caller passes the same seed each round (reused noise
    across rounds would break the independence the privacy analysis assumes).
    """
    return int(np.random.SeedSequence([int(seed), int(steps_so_far)]).generate_state(1)[0])


def _train_step(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    device: torch.device,
    amp: bool,
    private: bool,
    tally: _Tally,
    task: Task,
    augment: _Augmenter | None = None,
) -> None:
    """One optimizer step; an empty Poisson batch under DP becomes a noise-only step."""
    optimizer.zero_grad(set_to_none=True)
    if is_empty_batch(batch):
        if not private:
            raise RuntimeError("empty batch outside DP training")
        noise_only_step(optimizer)  # type: ignore[arg-type]
        tally.empty_steps += 1
        tally.steps += 1
        return
    images, labels = split_batch(batch)
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if augment is not None:  # train.augment: per-sample draws, masks move with their images
        images, labels = augment(images, labels)
    ghost = private and uses_clipped_backward(model)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with autocast:
        logits = model(images)
    if ghost:  # per-sample norms, then the clipped gradient sum in p.grad (one backward pass)
        losses = task.per_sample_loss(logits, labels)
        clipped_backward(model, losses)
        loss = losses.detach().mean()
    else:
        loss = task.loss(logits, labels)
        with warnings.catch_warnings():
            # Opacus' per-sample-gradient hooks on the first layer trigger this harmless torch warning.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
    optimizer.step()
    tally.steps += 1
    tally.examples += int(labels.shape[0])
    tally.loss_sum = tally.loss_sum + loss.detach() * labels.shape[0]


def _run_steps(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Any],
    steps: int,
    device: torch.device,
    amp: bool,
    private: bool,
    proximal: _Proximal | None,
    task: Task,
    augment: _Augmenter | None = None,
) -> _Tally:
    """Take exactly ``steps`` optimizer steps over endlessly repeated ``loader`` batches."""
    tally = _Tally()
    batches = _endless(loader)
    while tally.steps < steps:
        before = tally.steps
        _train_step(model=model, optimizer=optimizer, batch=next(batches), device=device,
                    amp=amp, private=private, tally=tally, task=task, augment=augment)
        if proximal is not None and tally.steps > before:
            proximal.apply()
    return tally


class _Augmenter:
    """``train.augment`` with its generator: one per round, seeded like the round (secret at a real DP site)."""

    def __init__(self, spec: str, *, seed: int) -> None:
        from federation.data.augment import parse_augment  # noqa: PLC0415

        self._augmentation = parse_augment(spec)
        self._generator = torch.Generator().manual_seed(int(seed))

    def __bool__(self) -> bool:
        return bool(self._augmentation)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks = targets if targets.ndim > 1 else None  # segmentation: the label maps move with the images
        images, moved = self._augmentation(images, masks, generator=self._generator)
        return images, (moved if masks is not None else targets)


def _check_privacy_matches(privacy: SitePrivacy, *, num_examples: int, config: TrainConfig) -> None:
    """Raise ValueError if ``privacy`` was set up for another dataset size or schedule."""
    if privacy.num_examples != num_examples:
        raise ValueError(f"SitePrivacy was set up for {privacy.num_examples} examples, dataset has {num_examples}")
    if privacy.batch_size != config.batch_size or not math.isclose(privacy.local_epochs, config.local_epochs):
        raise ValueError(
            f"SitePrivacy was set up for batch_size={privacy.batch_size}, local_epochs={privacy.local_epochs}; "
            f"train config has batch_size={config.batch_size}, local_epochs={config.local_epochs}"
        )


def _train_private(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    config: TrainConfig,
    privacy: SitePrivacy,
    seed: int | None,
    device: torch.device,
    proximal: _Proximal | None,
    task: Task,
    augment: _Augmenter | None = None,
) -> _Tally:
    """DP-SGD for ``privacy.steps_per_round`` steps; checks the accountant saw every step.

    ``seed=None`` draws the noise and the Poisson batches from secret generators.
    """
    before = privacy.total_steps
    base_loader = DataLoader(dataset, batch_size=config.batch_size, pin_memory=device.type == "cuda")
    dp_model, dp_optimizer, dp_loader = privacy.make_private(
        model=model, optimizer=optimizer, data_loader=base_loader, seed=seed
    )
    try:
        tally = _run_steps(model=dp_model, optimizer=dp_optimizer, loader=dp_loader,
                           steps=privacy.steps_per_round, device=device, amp=False,
                           private=True, proximal=proximal, task=task, augment=augment)
    finally:
        unwrap_model(dp_model)
    recorded = privacy.total_steps - before
    if recorded != tally.steps:
        raise RuntimeError(f"privacy accountant recorded {recorded} steps but {tally.steps} noisy steps were taken")
    return tally


def _train_plain(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    proximal: _Proximal | None,
    task: Task,
    augment: _Augmenter | None = None,
) -> _Tally:
    """Non-private training: shuffled batches, bf16 autocast on CUDA when configured."""
    num_examples = len(dataset)  # type: ignore[arg-type]
    steps = local_steps(num_examples=num_examples, batch_size=config.batch_size, local_epochs=config.local_epochs)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=num_examples > config.batch_size,  # no 1-sample tail batch (BatchNorm)
        generator=torch.Generator().manual_seed(seed),
        pin_memory=device.type == "cuda",
    )
    amp = use_amp(device=device, requested=config.amp, private=False)
    return _run_steps(model=model, optimizer=optimizer, loader=loader, steps=steps, device=device,
                      amp=amp, private=False, proximal=proximal, task=task, augment=augment)


def train_local(
    *,
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    privacy: SitePrivacy | None,
    seed: int,
    proximal_mu: float = 0.0,
    device: torch.device | None = None,
    noise_source: NoiseSource = "secure",
    task: Task | str = "classification",
    proximal_anchor: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place on the site's data for one federated round.

    Steps: ``ceil(local_epochs * n / min(batch_size, n))`` (see
    :func:`federation.privacy.local_steps`). Without privacy, batches are shuffled
    (a tail batch smaller than ``batch_size`` is dropped when ``n > batch_size``) and
    bf16 autocast is used on CUDA when ``config.amp``. With privacy,
    :meth:`SitePrivacy.check_round` runs first (raising
    :class:`~federation.privacy.PrivacyBudgetExhausted` before anything is spent),
    then DP-SGD runs in fp32 with Poisson batches at ``q = b / n``; an empty Poisson
    batch is a noise-only step that counts (and is accounted) like any other.

    Args:
        model: The model, loaded with the global weights. It is trained in place and
            left on ``device`` in its original train/eval mode, free of Opacus
            wrappers and hooks; use :func:`model_state` for a clean CPU state_dict.
        dataset: The site's training set.
        config: Local training settings.
        privacy: The site's run-long privacy state, or ``None`` for non-private training.
        seed: Seeds the global RNGs and shuffling; under DP with
            ``noise_source="seeded"`` also the Poisson sampling and the noise, mixed
            with the accountant's step count so every round gets fresh streams.
        proximal_mu: FedProx ``mu`` (0 disables): after every step,
            ``w <- w - min(lr * mu, 1) * (w - w_global)``.
        proximal_anchor: The ``w_global`` of the proximal step by parameter name
            (default: the model's own starting weights). Ditto trains a site's personal
            model with the received global weights here (:mod:`client.personal`).
        device: Where to train; ``None`` selects ``config.device``.
        noise_source: Under DP, ``"secure"`` (default; the only choice for a real
            site) draws the noise, the Poisson sampling and the global RNGs from a
            secret seeded by the OS CSPRNG on every call, so nothing the caller or a
            coordinator knows reproduces them. ``"seeded"`` derives them from
            ``seed`` (bit-reproducible simulations; whoever knows ``seed`` can
            regenerate and subtract the noise). Ignored without privacy.
        task: The :class:`~federation.tasks.base.Task` (or its ``data.task`` name)
            whose loss is minimised: cross-entropy for classification, DiceCELoss
            for segmentation (one loss per sample under DP-SGD).

    Returns:
        The round's :class:`TrainResult`.

    Raises:
        PrivacyBudgetExhausted: If the round would exceed the site's epsilon budget.
        ValueError: On an empty dataset, a negative ``proximal_mu``, a privacy set up
            for another dataset size / schedule, or a DP-incompatible model.
    """
    started = time.perf_counter()
    num_examples = len(dataset)  # type: ignore[arg-type]
    if num_examples == 0:
        raise ValueError("cannot train on an empty dataset")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    _check_noise_source(noise_source)
    task = get_task(task) if isinstance(task, str) else task
    if privacy is not None:
        _check_privacy_matches(privacy, num_examples=num_examples, config=config)
        privacy.check_round()
    device = device if device is not None else select_device(config.device)
    set_threads(config.num_threads)
    if device.type == "cpu":
        tune_cpu_allocator()
    secure = privacy is not None and noise_source == "secure"
    if privacy is None:
        round_seed = seed
    elif secure:  # dropout, augmentation: nothing about a real DP round is reproducible from the config
        round_seed = secrets.randbits(63)
    else:
        round_seed = _round_seed(seed, privacy.total_steps)
    seed_everything(round_seed)

    was_training = model.training
    model.to(device)
    model.train()
    apply_trainable(model, getattr(config, "trainable", "all"))  # frozen: not optimized, clipped nor noised
    params = _trainable(model)
    optimizer = _make_optimizer(params, config)
    anchors = _anchors(model, proximal_anchor, device=device) if proximal_anchor is not None else None
    proximal = _Proximal(params, lr=config.lr, mu=proximal_mu, anchors=anchors) if proximal_mu > 0 else None
    augment = _Augmenter(getattr(config, "augment", "none"), seed=round_seed) or None
    try:
        if privacy is None:
            tally = _train_plain(model=model, optimizer=optimizer, dataset=dataset, config=config,
                                 seed=round_seed, device=device, proximal=proximal, task=task, augment=augment)
        else:
            tally = _train_private(model=model, optimizer=optimizer, dataset=dataset, config=config,
                                   privacy=privacy, seed=None if secure else round_seed, device=device,
                                   proximal=proximal, task=task, augment=augment)
    finally:
        model.train(was_training)
    return _result(tally=tally, num_examples=num_examples, privacy=privacy, started=started)


def _anchors(model: nn.Module, anchor: Mapping[str, torch.Tensor], *, device: torch.device) -> list[torch.Tensor]:
    """``anchor``'s tensors for ``model``'s trainable parameters, in their order."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, _ in named if name not in anchor]
    if missing:
        raise ValueError(f"proximal_anchor lacks the trainable parameters {missing[:5]}")
    return [anchor[name].detach().to(device, dtype=p.dtype, copy=True) for name, p in named]


def _result(*, tally: _Tally, num_examples: int, privacy: SitePrivacy | None, started: float) -> TrainResult:
    """Build and log the round's TrainResult."""
    result = TrainResult(
        num_examples=num_examples,
        loss=tally.mean_loss,
        steps=tally.steps,
        epsilon=privacy.epsilon_spent() if privacy is not None else 0.0,
        delta=privacy.delta if privacy is not None else 0.0,
        noise_multiplier=privacy.noise_multiplier if privacy is not None else 0.0,
        seconds=time.perf_counter() - started,
    )
    if privacy is None:
        logger.info("local round: %d steps, loss %.4f, no DP, %.1fs", result.steps, result.loss, result.seconds)
    else:
        logger.info(
            "local round: %d steps (%d empty), loss %.4f, epsilon %.3f of %g (delta %g, sigma %.3g), %.1fs",
            result.steps, tally.empty_steps, result.loss, result.epsilon, privacy.target_epsilon,
            result.delta, result.noise_multiplier, result.seconds,
        )
    return result


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a detached CPU copy of ``model``'s state_dict without Opacus ``_module.`` prefixes.

    Args:
        model: A plain module or an Opacus-wrapped one.

    Returns:
        Parameter and buffer names (as the unwrapped model names them) to CPU tensors
        that share no memory with the model.
    """
    state = strip_module_prefix(model.state_dict())
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}
