"""Opacus DP-SGD plumbing: wrap training objects, noise-only steps, unwrap afterwards.

:func:`make_private` goes through :meth:`opacus.PrivacyEngine.make_private` (module
validation, per-sample-gradient wrapper, DP optimizer) with the site's long-lived
accountant, then corrects the two things Opacus derives from the loader length:
Opacus would use ``q = 1 / len(loader) = 1 / ceil(n / b)``, which differs from the
site's ``q = b / n`` whenever ``b`` does not divide ``n``. Here the Poisson loader,
the optimizer's expected batch size and the accountant hook all use exactly the
site's ``q``, so the epsilon reported is the epsilon of the sampling that happened.

Empty Poisson batches are real outcomes of the sampled Gaussian mechanism: the
released update is pure noise, and it must be both applied and accounted for
(skipping it would reveal that the batch was empty, i.e. leak the batch size).
The Poisson loader yields an :class:`EmptyBatch` marker for them, and
:func:`noise_only_step` takes that step without running the model, so it works for
every ``grad_sample_mode`` (``ew`` and ``functorch`` cannot run a zero-size batch)
and every item type.

Where the randomness comes from is the caller's explicit choice (``seed``): with no
seed (the default) the Gaussian noise and the Poisson sampling draw from generators
seeded with 64 fresh bits of the operating system's CSPRNG (:mod:`secrets`) on every
call, held only by this process, and the noise uses Opacus' ``secure_mode`` sampling
(a sum of Gaussians against floating-point attacks) - what a real site must use,
since nothing the coordinator knows can regenerate it. Opacus' own ``secure_mode``
needs ``torchcsprng``, which no longer builds for current torch, so it is not used
for the generator. A seed makes both reproducible (simulated sites only): anyone who
knows the seed can regenerate the noise and subtract it.

``grad_sample_mode="ghost"`` bypasses PrivacyEngine's model wrapping: the model is
wrapped in :class:`~federation.privacy.fast_clipping.GhostClippingModule` (mixed
ghost norms, clipped gradient in one backward pass) with
:class:`~federation.privacy.fast_clipping.GhostDPOptimizer` (Opacus'
``DPOptimizerFastGradientClipping``); its backward pass is :func:`clipped_backward`.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants import IAccountant
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, default_collate

from federation.privacy.fast_clipping import GhostClippingModule, GhostDPOptimizer, select_grad_sample_mode

logger = logging.getLogger(__name__)

MODULE_PREFIX = "_module."
"""Prefix Opacus' GradSampleModule adds to every state_dict key."""


def make_private(
    *,
    accountant: IAccountant,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    num_examples: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "hooks",
    seed: int | None = None,
) -> tuple[AbstractGradSampleModule, DPOptimizer, DataLoader]:
    """Wrap ``model``/``optimizer``/``data_loader`` for DP-SGD recorded in ``accountant``.

    Args:
        accountant: The site's run-long Opacus accountant; every noisy step is
            appended to its history as ``(noise_multiplier, sample_rate, 1)``.
        model: The model (already on its device). Wrapped, not copied.
        optimizer: Optimizer over ``model``'s parameters.
        data_loader: Loader over the training set; its dataset, collate function
            and worker settings are reused for the Poisson loader.
        num_examples: Expected ``len(data_loader.dataset)`` (checked).
        sample_rate: Poisson inclusion probability ``q``.
        noise_multiplier: Fixed noise multiplier sigma.
        max_grad_norm: Per-sample clipping bound.
        grad_sample_mode: ``ghost`` (medfed's mixed ghost clipping, one backward
            pass: :class:`~federation.privacy.fast_clipping.GhostClippingModule`;
            train with :func:`clipped_backward`), Opacus' ``hooks``, ``ew`` or
            ``functorch``, or ``auto``
            (:func:`~federation.privacy.fast_clipping.select_grad_sample_mode`).
        seed: ``None`` (default, the only choice for a real site): the Poisson
            sampler and the Gaussian noise draw from fresh secret generators
            (:func:`secure_generator`) and the noise is sampled in Opacus'
            ``secure_mode``. An int makes both reproducible from it (simulation only:
            whoever knows the seed can regenerate the noise).

    Returns:
        ``(dp_model, dp_optimizer, dp_loader)``: Opacus' GradSampleModule around
        ``model``, the DPOptimizer, and a loader with Poisson sampling at ``q`` (each
        pass yields ``int(1 / q)`` batches; iterate it again for more). It yields an
        :class:`EmptyBatch` when no example was sampled: take :func:`noise_only_step`
        for it.

    Raises:
        ValueError: On a dataset-size mismatch or a DP-incompatible model.
    """
    dataset = data_loader.dataset
    if len(dataset) != num_examples:  # type: ignore[arg-type]
        raise ValueError(
            f"dataset has {len(dataset)} examples but the privacy accountant "  # type: ignore[arg-type]
            f"was set up for {num_examples}"
        )
    engine = _engine(accountant)
    if grad_sample_mode == "auto":
        grad_sample_mode = select_grad_sample_mode(model)  # on the device the model is on
    try:
        if grad_sample_mode == "ghost":
            dp_model, dp_optimizer = _make_ghost(
                model, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, seed=seed
            )
        else:
            dp_model, dp_optimizer, _ = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=data_loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=grad_sample_mode,
                noise_generator=_noise_generator(model, seed),
            )
    except UnsupportedModuleError as error:
        raise ValueError(
            "model is not compatible with DP-SGD (Opacus); use model.norm='group' or "
            f"'instance' instead of BatchNorm: {error}"
        ) from error
    dp_optimizer.expected_batch_size = max(1, round(num_examples * sample_rate))
    dp_optimizer.secure_mode = seed is None  # Opacus' noise sampling robust to floating-point attacks
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    dp_loader = _poisson_loader(data_loader, sample_rate=sample_rate, seed=seed)
    return dp_model, dp_optimizer, dp_loader


def _make_ghost(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
    seed: int | None,
) -> tuple[GhostClippingModule, GhostDPOptimizer]:
    """Wrap for medfed's ghost clipping: what PrivacyEngine does for Opacus' "ghost", minus the loss wrapper."""
    ModuleValidator.validate(model, strict=True)
    dp_model = GhostClippingModule(model, max_grad_norm=max_grad_norm)
    dp_optimizer = GhostDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=1,  # set by the caller
        generator=_noise_generator(model, seed),
    )
    return dp_model, dp_optimizer


def uses_clipped_backward(model: nn.Module) -> bool:
    """Whether ``model`` (from :func:`make_private`) must be trained with :func:`clipped_backward`."""
    return isinstance(model, GhostClippingModule)


def clipped_backward(model: nn.Module, losses: torch.Tensor) -> None:
    """The backward pass of a DP-SGD step for any ``grad_sample_mode``.

    For ``ghost`` it leaves the clipped per-sample gradient sum in ``p.grad`` (see
    :meth:`GhostClippingModule.clipped_backward`); for the other modes it is
    ``losses.mean().backward()`` and Opacus' optimizer clips.

    Args:
        model: The wrapped model returned by :func:`make_private`.
        losses: ``(B,)`` per-sample losses.
    """
    if isinstance(model, GhostClippingModule):
        model.clipped_backward(losses)
    else:
        losses.mean().backward()


def _engine(accountant: IAccountant) -> PrivacyEngine:
    """A PrivacyEngine whose accountant is the site's run-long ``accountant``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        engine = PrivacyEngine(accountant=accountant.mechanism())
    engine.accountant = accountant
    return engine


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with 64 fresh bits from the OS CSPRNG (:mod:`secrets`).

    Its seed exists only in this process and is never logged or stored, so nothing in
    a run config or message can reproduce what it draws.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


def _noise_generator(model: nn.Module, seed: int | None) -> torch.Generator:
    """The DP noise generator on the parameters' device: secret without a seed, else from ``seed``."""
    device = next(model.parameters()).device
    if seed is None:
        return secure_generator(device)
    return torch.Generator(device=device).manual_seed(int(seed) + 1)


class EmptyBatch:
    """What the Poisson loader yields when no example was sampled (a real DP-SGD outcome)."""

    def __repr__(self) -> str:
        return "EmptyBatch()"


def is_empty_batch(batch: Any) -> bool:
    """Whether ``batch`` is the Poisson loader's :class:`EmptyBatch` marker."""
    return isinstance(batch, EmptyBatch)


class _EmptyAwareCollate:
    """Collate non-empty index lists with ``collate_fn``; return :class:`EmptyBatch` for empty ones.

    Unlike Opacus' ``DPDataLoader`` (which must guess the structure of an empty batch
    from ``dataset[0]``), this works for any item type: tuples, dicts, MONAI data.
    A class rather than a closure so that loader workers can pickle it.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self._collate_fn = collate_fn or default_collate

    def __call__(self, items: list[Any]) -> Any:
        return EmptyBatch() if len(items) == 0 else self._collate_fn(items)


def _poisson_loader(data_loader: DataLoader, *, sample_rate: float, seed: int | None) -> DataLoader:
    """A loader over ``data_loader``'s dataset with Poisson sampling at exactly ``sample_rate``.

    Each batch includes every example independently with probability ``sample_rate``
    (Opacus' ``UniformWithReplacementSampler``); one pass yields ``int(1 / q)`` batches.
    The sampler's generator is secret without a ``seed`` (see :func:`secure_generator`).
    """
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else secure_generator()
    sampler = UniformWithReplacementSampler(
        num_samples=len(data_loader.dataset),  # type: ignore[arg-type]
        sample_rate=sample_rate,
        generator=generator,
    )
    return DataLoader(
        data_loader.dataset,
        batch_sampler=sampler,
        collate_fn=_EmptyAwareCollate(data_loader.collate_fn),
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        generator=generator,
        prefetch_factor=data_loader.prefetch_factor,
        persistent_workers=data_loader.persistent_workers,
    )


def noise_only_step(optimizer: DPOptimizer) -> None:
    """Take the DP-SGD step of an empty Poisson batch: noise only, accounted as usual.

    Sets every trainable parameter's per-sample gradient to an empty ``(0, *shape)``
    tensor (``ghost`` mode: its clipped gradient sum to zeros), so Opacus clips
    nothing, adds ``N(0, (sigma * C)^2)`` noise, divides by the expected batch size,
    calls the accountant hook and steps the optimizer - exactly what it does for a
    zero-size batch, without running the model.

    Args:
        optimizer: The DPOptimizer returned by :func:`make_private`.
    """
    for param in optimizer.params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):  # ghost: p.grad is the clipped sum
            param.grad = torch.zeros_like(param)
        else:
            param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
    optimizer.step()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Remove Opacus' wrapper and hooks, returning the plain module that was wrapped.

    The wrapped module shares its parameters with the wrapper, so the returned
    object (the one originally passed to :func:`make_private`) holds the trained
    weights. Plain modules are returned unchanged.
    """
    if isinstance(model, (AbstractGradSampleModule, GradSampleModule)):
        return model.to_standard_module()
    return model


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``state`` with every leading ``_module.`` (Opacus wrapper) removed from its keys."""
    clean: dict[str, Any] = {}
    for key, value in state.items():
        while key.startswith(MODULE_PREFIX):
            key = key[len(MODULE_PREFIX):]
        clean[key] = value
    return clean
