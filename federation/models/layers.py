"""Small building helpers shared by the networks: norm and activation specs.

Every network in :mod:`federation.models` takes its normalization from
``model.norm`` (``"group"``, ``"instance"`` or ``"batch"``) through
:func:`norm_spec`, and its activation from :data:`ACT`, so that the choices that
matter for differential privacy (no BatchNorm, no in-place activations) are made in
one place.
"""

from __future__ import annotations

from typing import Any

ACT: tuple[str, dict[str, Any]] = ("relu", {"inplace": False})
"""MONAI activation spec used by every network: ReLU, never in place (Opacus hooks)."""

MAX_GROUPS = 8
"""Largest GroupNorm group count used; the actual count also divides the channels."""

NORMS = ("group", "instance", "batch")
"""The ``model.norm`` values the networks understand."""


def group_count(channels: int, *, max_groups: int = MAX_GROUPS) -> int:
    """Return the number of GroupNorm groups to use for ``channels`` channels.

    Args:
        channels: Channels of the normalized feature map (>= 1).
        max_groups: Upper bound on the group count.

    Returns:
        The largest divisor of ``channels`` that is at most ``max_groups``, so the
        group count is always valid (``channels % groups == 0``).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return max(d for d in range(1, min(max_groups, channels) + 1) if channels % d == 0)


def norm_spec(norm: str, *, channels: int | None = None, num_groups: int | None = None) -> str | tuple[str, dict]:
    """Return a MONAI norm spec (``Convolution(norm=...)`` / ``get_norm_layer``) for ``norm``.

    Args:
        norm: ``"group"``, ``"instance"`` or ``"batch"``.
        channels: Channels the layer normalizes; with ``norm="group"`` it picks the
            group count through :func:`group_count` unless ``num_groups`` is given.
        num_groups: Explicit GroupNorm group count (must divide every channel count
            the spec is used for; ``torch.nn.GroupNorm`` checks it).

    Returns:
        ``("group", {"num_groups": G})``, ``("instance", {"affine": True})`` (learnable
        scale and shift, no running statistics) or ``"batch"``.

    Raises:
        ValueError: On an unknown ``norm`` or a group norm with neither ``channels``
            nor ``num_groups``.
    """
    if norm == "group":
        if num_groups is None:
            if channels is None:
                raise ValueError("norm_spec('group') needs channels or num_groups")
            num_groups = group_count(channels)
        return ("group", {"num_groups": num_groups})
    if norm == "instance":
        return ("instance", {"affine": True, "track_running_stats": False})
    if norm == "batch":
        return "batch"
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
