"""Model registry: name -> builder, plus DP checks and small helpers.

A *builder* is any callable ``builder(*, config, in_channels, num_classes,
spatial_dims) -> nn.Module`` that returns a network producing ``num_classes``
logits. :func:`build_model` looks the builder up by ``model.name``, refuses
BatchNorm under differential privacy, and, when ``dp=True``, checks the result
with Opacus' :class:`~opacus.validators.ModuleValidator` and for in-place
activations before handing it back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from federation.config.loading import ConfigError
from federation.config.schema import ModelConfig
from federation.models import basic_unet, cnn, densenet, logreg, resnet, segresnet, unet
from federation.models.convert import convert_batchnorm
from federation.registries import check_new_name, unknown_name

logger = logging.getLogger(__name__)

Builder = Callable[..., nn.Module]
"""``builder(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module``."""

SPATIAL_DIMS = (2, 3)
"""Spatial dimensionalities of image networks (the default of :func:`register_model`)."""
TABULAR = (0,)
"""``spatial_dims`` of networks for tabular feature vectors (``in_channels`` = features)."""


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    min_input_size: Mapping[str, int]
    spatial_dims: tuple[int, ...] = SPATIAL_DIMS
    tasks: tuple[str, ...] = ("classification",)


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str,
    builder: Builder,
    *,
    min_input_size: int | Mapping[str, int] = 8,
    spatial_dims: tuple[int, ...] = SPATIAL_DIMS,
    tasks: tuple[str, ...] = ("classification",),
    replace: bool = False,
) -> None:
    """Register a network under ``name`` (the rule of :mod:`federation.registries`).

    Args:
        name: The ``model.name`` value that selects it.
        builder: ``builder(*, config, in_channels, num_classes, spatial_dims) -> nn.Module``.
        min_input_size: Smallest input side length the network accepts, either one
            number or a mapping ``{"group": .., "instance": .., "batch": ..}`` when it
            depends on ``model.norm`` (a missing norm falls back to the largest value).
            Defaults to 8, the smallest ``data.image_size``.
        spatial_dims: The input kinds it accepts: 2 images, 3 volumes, 0 tabular
            feature vectors (:data:`TABULAR`).
        tasks: The ``data.task`` values its output serves (``segmentation``: one
            logit map per class, ``(N, num_classes, *spatial)``).
        replace: Allow replacing an existing registration.

    Raises:
        ValueError: If ``name`` is malformed or already registered (and ``replace`` is false).
        TypeError: If ``builder`` is not callable.
    """
    check_new_name("model", name, _REGISTRY, replace=replace)
    if not callable(builder):
        raise TypeError(f"builder for model {name!r} must be callable, got {type(builder).__name__}")
    sizes = {"*": int(min_input_size)} if isinstance(min_input_size, int) else dict(min_input_size)
    if name in _REGISTRY:
        logger.debug("Replacing registered model %r", name)
    _REGISTRY[name] = _Entry(builder=builder, min_input_size=sizes, spatial_dims=tuple(spatial_dims),
                             tasks=tuple(tasks))


def model_tasks(name: str) -> tuple[str, ...]:
    """The ``data.task`` values model ``name`` serves.

    Raises:
        ConfigError: (a ``ValueError``) if ``name`` is not registered (the message lists the valid names).
    """
    return _entry(name).tasks


def available_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name("model", key="model.name", name=name, valid=available_models()) from None


def min_input_size(name: str, *, norm: str = "group") -> int:
    """Return the smallest input side (pixels/voxels) model ``name`` accepts with ``norm``.

    Callers that know ``data.image_size`` should check ``image_size >=
    min_input_size(...)`` and report a clear error; smaller inputs make the network
    fail inside its forward pass (empty feature maps, or instance norm over a single
    pixel).

    Args:
        name: A registered model name.
        norm: The ``model.norm`` value (instance norm needs more than one pixel in the
            last stage, so it can need larger inputs).

    Returns:
        The minimum side length, never below 8 (the smallest ``data.image_size``):
        ``cnn`` 8, ``resnet18``/``resnet10`` 8 (9 with instance norm),
        ``densenet121`` 29 (61 with instance norm).

    Raises:
        ConfigError: (a ``ValueError``) if ``name`` is not registered.
    """
    sizes = _entry(name).min_input_size
    if norm in sizes:
        return sizes[norm]
    return sizes.get("*", max(sizes.values()))


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Return the number of parameters (elements) of ``model``.

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.

    Returns:
        The total element count.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def dp_problems(model: nn.Module, *, max_names: int = 5) -> list[str]:
    """List why ``model`` cannot be trained with Opacus DP-SGD (empty list: it can).

    Runs :meth:`opacus.validators.ModuleValidator.validate` (BatchNorm, running
    statistics, unsupported layers, eval mode, ...) and adds a check for in-place
    activations, which Opacus' validator does not catch but which break its
    backward hooks. Identical Opacus messages are merged into one line naming the
    offending submodules.

    Args:
        model: The network to check.
        max_names: How many offending submodule names to print per problem.

    Returns:
        One human-readable line per distinct problem.
    """
    # Opacus (~1 s to import) only where DP is checked: evaluation and inference never need it.
    from opacus.utils.module_utils import trainable_modules  # noqa: PLC0415
    from opacus.validators import ModuleValidator  # noqa: PLC0415

    problems: list[str] = []
    if ModuleValidator.validate(model, strict=False):
        by_message: dict[str, list[str]] = {}
        if not model.training:
            by_message["Model needs to be in training mode"] = ["<root>"]
        for mod_name, module in trainable_modules(model):
            validator = ModuleValidator.VALIDATORS.get(type(module))
            for err in validator(module) if validator is not None else []:
                by_message.setdefault(str(err), []).append(mod_name or "<root>")
        for message, names in by_message.items():
            shown = ", ".join(names[:max_names]) + (f", ... ({len(names)} modules)" if len(names) > max_names else "")
            problems.append(f"{message} [in: {shown}]")
    inplace = [name or "<root>" for name, m in model.named_modules() if getattr(m, "inplace", False) is True]
    if inplace:
        shown = ", ".join(inplace[:max_names]) + (f", ... ({len(inplace)} modules)" if len(inplace) > max_names else "")
        problems.append(f"in-place activations break Opacus' per-sample gradient hooks [in: {shown}]")
    return problems


_BATCH_NORM_UNDER_DP = (
    "model.norm: 'batch' cannot be used with differential privacy (BatchNorm mixes samples "
    "within a batch, so per-sample gradients are undefined); use 'group' or 'instance', or keep pretrained "
    "BatchNorm statistics with model.batchnorm=frozen (or group)"
)


def _batchnorm_under_dp(config: ModelConfig) -> bool:
    """Whether ``config`` trains real BatchNorm layers (refused under DP; model.batchnorm converts them)."""
    return config.norm == "batch" and getattr(config, "batchnorm", "keep") == "keep"


def check_dp_compatible(model: nn.Module, config: ModelConfig) -> None:
    """Raise if ``model`` (built from ``config``) cannot be trained with Opacus DP-SGD.

    What ``build_model(..., dp=True)`` checks, for a network built without it (a
    site builds one network for evaluation and training and checks it before its
    first DP round; evaluation does not load Opacus).

    Raises:
        ConfigError: (a ``ValueError``) listing every problem (see :func:`dp_problems`).
    """
    if _batchnorm_under_dp(config):
        raise ConfigError([_BATCH_NORM_UNDER_DP], source="model config")
    errors = dp_problems(model)
    if errors:
        raise ConfigError(
            [f"model.name: {config.name!r} is not compatible with differential privacy: {p}" for p in errors],
            source="model config",
        )


def build_model(
    config: ModelConfig,
    *,
    in_channels: int,
    num_classes: int,
    spatial_dims: int = 2,
    dp: bool,
    task: str | None = None,
) -> nn.Module:
    """Build the network named by ``config.name``.

    Initialization uses torch's global RNG, so seed it (``torch.manual_seed``) first
    for identical weights across calls and processes.

    Args:
        config: The ``model`` config section (``name``, ``norm``, ``width``, ``dropout``).
        in_channels: Input image channels (1 for grey-scale, 3 for RGB); for tabular
            data the number of features.
        num_classes: Output logits; binary tasks use 2 (trained with cross-entropy).
        spatial_dims: 2 for images, 3 for volumes, 0 for tabular data (``logreg``).
        dp: Whether the model will be trained with Opacus DP-SGD. Then
            ``config.norm="batch"`` is refused and the built network is validated.
        task: The run's ``data.task``: a network that does not serve it is refused
            (``None``: not checked).

    Returns:
        A freshly initialized ``nn.Module`` mapping ``(N, in_channels, *spatial)`` to
        ``(N, num_classes)`` logits, in training mode.

    Raises:
        ConfigError: (a ``ValueError``) for an unknown ``model.name`` (the message
            lists the valid names), ``model.norm="batch"`` with ``dp=True``, bad
            ``in_channels``/``num_classes``/``spatial_dims``, or a network that fails
            the DP validation (each problem listed).
    """
    entry = _entry(config.name)
    problems: list[str] = []
    if dp and _batchnorm_under_dp(config):
        problems.append(_BATCH_NORM_UNDER_DP)
    if spatial_dims not in entry.spatial_dims:
        kinds = {0: "tabular features", 2: "2-D images", 3: "3-D volumes"}
        takes = ", ".join(kinds.get(d, str(d)) for d in entry.spatial_dims)
        compatible = [n for n in available_models() if spatial_dims in _REGISTRY[n].spatial_dims]
        problems.append(
            f"model.name: {config.name!r} takes {takes}, but the data is {kinds.get(spatial_dims, spatial_dims)} "
            f"(spatial_dims={spatial_dims}); models that fit: {', '.join(compatible) or 'none'}"
        )
    if task is not None and task not in entry.tasks:
        fits = [n for n in available_models() if task in _REGISTRY[n].tasks]
        problems.append(f"model.name: {config.name!r} does not serve data.task={task!r}; "
                        f"models that do: {', '.join(fits) or 'none'}")
    if in_channels < 1:
        problems.append(f"in_channels: must be >= 1, got {in_channels}")
    if num_classes < 2:
        problems.append(f"num_classes: must be >= 2 (binary tasks use 2 logits), got {num_classes}")
    if problems:
        raise ConfigError(problems, source="model config")

    model = entry.builder(config=config, in_channels=in_channels, num_classes=num_classes, spatial_dims=spatial_dims)
    if config.norm == "batch":  # model.batchnorm: frozen / group make BatchNorm DP-compatible (models.convert)
        model = convert_batchnorm(model, mode=getattr(config, "batchnorm", "keep"))
    if dp:
        check_dp_compatible(model, config)
    logger.debug(
        "Built model %s (norm=%s, in_channels=%d, num_classes=%d, spatial_dims=%d, dp=%s): %d parameters",
        config.name,
        config.norm,
        in_channels,
        num_classes,
        spatial_dims,
        dp,
        count_parameters(model),
    )
    return model


register_model("cnn", cnn.build_cnn, min_input_size=cnn.MIN_INPUT_SIZE)
register_model("densenet121", densenet.build_densenet121, min_input_size=densenet.MIN_INPUT_SIZE)
register_model("resnet18", resnet.build_resnet18, min_input_size=resnet.MIN_INPUT_SIZE)
register_model("resnet10", resnet.build_resnet10, min_input_size=resnet.MIN_INPUT_SIZE)
register_model("logreg", logreg.build_logreg, spatial_dims=TABULAR)
register_model("unet", unet.build_unet, min_input_size=unet.MIN_INPUT_SIZE, tasks=("segmentation",))
register_model("basic_unet", basic_unet.build_basic_unet, min_input_size=basic_unet.MIN_INPUT_SIZE,
               tasks=("segmentation",))
register_model("segresnet", segresnet.build_segresnet, min_input_size=segresnet.MIN_INPUT_SIZE,
               tasks=("segmentation",))
