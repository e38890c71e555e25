"""Which parameters train (``train.trainable``): all, the head, the last N stages, or name patterns.

Frozen parameters get ``requires_grad=False``: they are left out of the optimizer,
of FedProx's pull, and under DP-SGD of clipping and noise (Opacus and medfed's ghost
clipping compute per-sample gradients of trainable parameters only), so the noise
is spread over fewer, useful dimensions; the accounting (noise multiplier, sampling
rate, steps) is unchanged. The site still sends the whole model (frozen tensors as
they came), so the guard's exact-names rule and every strategy work as before.

*Stages* are the network's top-level children that hold parameters, in order, but
the one holding the head; a
network with a single body container (``cnn``'s ``features``, DenseNet's
``features``, MONAI UNet's ``model``) is looked into. The *head* is the last module
that holds parameters (the classifier, or the UNet's output convolution).
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from federation.config.loading import ConfigError

_LAST = re.compile(r"^last-(\d+)$")


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def head_module(model: nn.Module) -> str:
    """Name of the last module (in registration order) that holds parameters of its own."""
    names = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not names:
        raise ValueError("the model has no parameters")
    return names[-1]


def stages(model: nn.Module) -> list[str]:
    """Module names of the network's stages before its head, first to last (see the module docstring)."""
    children = [(n, c) for n, c in model.named_children() if _has_params(c)]
    if 1 <= len(children) <= 2 and sum(1 for c in children[0][1].children() if _has_params(c)) > 1:
        body, module = children[0]  # one body container (and the head): its children are the stages
        found = [f"{body}.{n}" for n, c in module.named_children() if _has_params(c)] + [n for n, _ in children[1:]]
    else:
        found = [n for n, _ in children]
    head = head_module(model)
    return [s for s in found if not (head == s or head.startswith(f"{s}."))]


def trainable_names(model: nn.Module, spec: str) -> list[str]:
    """Names of the parameters ``train.trainable`` = ``spec`` lets train.

    Raises:
        ConfigError: An unknown form, ``last-N`` beyond the stages, or patterns that match no parameter.
    """
    names = [n for n, _ in model.named_parameters()]
    spec = spec.strip() or "all"
    if spec == "all":
        return names
    if spec == "head":
        head = head_module(model)
        return [n for n in names if n.startswith(f"{head}.")]
    match = _LAST.match(spec)
    if match:
        count, parts = int(match[1]), stages(model)
        if not 1 <= count <= len(parts):
            raise ConfigError([f"train.trainable: {spec!r}: this model has {len(parts)} stages "
                               f"({', '.join(parts)}); use last-1 .. last-{len(parts)}"], source="train config")
        keep = [*parts[-count:], head_module(model)]
        return [n for n in names if any(n.startswith(f"{p}.") for p in keep)]
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ConfigError([f"train.trainable: {spec!r} matches no parameter; use all, head, last-N or fnmatch "
                           f"patterns of parameter names such as {names[0]!r}"], source="train config")
    return chosen


def apply_trainable(model: nn.Module, spec: str) -> list[str]:
    """Set ``requires_grad`` of every parameter of ``model`` from ``spec``; return the trainable names."""
    chosen = set(trainable_names(model, spec))
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return sorted(chosen)
