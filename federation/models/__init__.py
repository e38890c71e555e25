"""Networks for medfed, selected by name from a registry (``model.name``).

Registered: ``cnn`` (default, small and fast), ``resnet10``, ``resnet18`` (CIFAR-style
stem) and ``densenet121`` (MONAI) for images and volumes, and ``logreg`` (logistic
regression) for tabular data. All are DP-compatible with ``model.norm`` set to
``"group"`` or ``"instance"``: no BatchNorm, no in-place activations, no in-place
residual adds.

Example::

    from federation.models import build_model
    model = build_model(cfg.model, in_channels=1, num_classes=2, dp=cfg.privacy.enabled)
"""

from federation.models.registry import (
    available_models,
    build_model,
    check_dp_compatible,
    count_parameters,
    dp_problems,
    min_input_size,
    register_model,
)

__all__ = [
    "available_models",
    "build_model",
    "check_dp_compatible",
    "count_parameters",
    "dp_problems",
    "min_input_size",
    "register_model",
]
