"""On-the-fly training augmentation at the site (``train.augment``), 2-D and 3-D, image and mask together.

``train.augment`` is ``none``, ``light``, ``strong`` or a comma-separated list of
registered transforms with parameters, e.g. ``flip(p=0.5,axis=1),noise(std=0.02)``:
names come from :data:`TRANSFORMS` and parameters are numbers checked against
each transform's own list; nothing in the config is ever executed.

The transforms work on a whole collated batch ``(N, C, *spatial)`` with per-sample
random draws (one torch generator per round, seeded from the run seed, the round
and the site, or from the site's secret at a real DP site), so a site's
augmentation is reproducible for a seed and site and costs little: MONAI's
per-sample dictionary transforms (``RandFlipd``, ``RandAffined``) take about 5 ms
and 23 ms per 28-px image on this project's CPU machine, more than a whole training
step of ``cnn`` (docs/BENCHMARKS.md, "Augmentation cost"). The geometry follows
MONAI's ``RandFlip``/``RandRotate90``/``RandAffine`` and the intensity
``RandScaleIntensity``/``RandShiftIntensity``/``RandGaussianNoise``/``RandAdjustContrast``.

Segmentation masks ``(N, *spatial)`` move with their images: the same flips,
rotations and affine grid (nearest-neighbour for the mask, so labels stay labels);
intensity transforms leave masks alone. Each sample is augmented independently of
the others, so DP-SGD's per-sample gradients and accounting are unaffected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from federation.config.loading import ConfigError

Fn = Callable[[Tensor, Tensor | None, Mapping[str, float], torch.Generator], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class _Transform:
    fn: Fn
    defaults: Mapping[str, float]
    doc: str


TRANSFORMS: dict[str, _Transform] = {}
"""Registered transforms by name (see :func:`register_transform`)."""

PRESETS = {
    "none": "",
    "light": "flip(p=0.5),intensity(p=0.5,scale=0.1,shift=0.05)",
    "strong": "flip(p=0.5),affine(p=0.8,rotate=0.26,scale=0.15,translate=0.1),intensity(p=0.8,scale=0.2,shift=0.1),"
              "gamma(p=0.3,range=0.4),noise(p=0.3,std=0.03)",
}
"""``train.augment`` presets and the transform lists they stand for."""


def register_transform(name: str, fn: Fn, *, defaults: Mapping[str, float], doc: str) -> None:
    """Register a batch transform ``fn(images, masks_or_None, params, generator) -> (images, masks)``."""
    TRANSFORMS[name] = _Transform(fn=fn, defaults=dict(defaults), doc=doc)


def _chosen(n: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Which of ``n`` samples a transform with probability ``p`` applies to."""
    return torch.rand(n, generator=generator).to(device) < p


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    return values.reshape((-1,) + (1,) * (ndim - 1))


def _flip(images: Tensor, masks: Tensor | None, params: Mapping[str, float], g: torch.Generator):
    spatial = images.ndim - 2
    axis = int(params["axis"]) if params["axis"] >= 0 else spatial - 1
    if not 0 <= axis < spatial:
        raise ConfigError([f"train.augment: flip axis={axis} but the data has {spatial} spatial axes"],
                          source="train config")
    pick = _chosen(images.shape[0], params["p"], g, images.device)
    images = torch.where(_per_sample(pick, images.ndim), images.flip(2 + axis), images)
    if masks is not None:
        masks = torch.where(_per_sample(pick, masks.ndim), masks.flip(1 + axis), masks)
    return images, masks


def _rotate90(images: Tensor, masks: Tensor | None, params: Mapping[str, float], g: torch.Generator):
    if images.shape[-1] != images.shape[-2]:
        raise ConfigError(["train.augment: rotate90 needs square images (last two sides equal)"], source="train config")
    pick = _chosen(images.shape[0], params["p"], g, images.device)
    turns = torch.randint(1, 4, (images.shape[0],), generator=g).to(images.device) * pick
    out_i, out_m = images.clone(), None if masks is None else masks.clone()
    for k in (1, 2, 3):
        sel = turns == k
        if sel.any():
            out_i[sel] = torch.rot90(images[sel], k, dims=(-2, -1))
            if masks is not None:
                out_m[sel] = torch.rot90(masks[sel], k, dims=(-2, -1))
    return out_i, out_m


def _affine(images: Tensor, masks: Tensor | None, params: Mapping[str, float], g: torch.Generator):
    n, spatial = images.shape[0], images.ndim - 2
    pick = _per_sample(_chosen(n, params["p"], g, torch.device("cpu")).float(), 2)
    angle = (torch.rand(n, generator=g) * 2 - 1) * params["rotate"] * pick[:, 0]
    scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * params["scale"] * pick[:, 0]
    shift = (torch.rand(n, spatial, generator=g) * 2 - 1) * 2 * params["translate"] * pick
    theta = torch.zeros(n, spatial, spatial + 1)
    theta[:, range(spatial), range(spatial)] = 1.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # rotate in the plane of the last two axes (affine_grid orders the axes x, y[, z]: last first)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    if spatial == 3:
        theta[:, 2, 2] = 1 / scale
    theta[:, :, spatial] = shift
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        moved = F.grid_sample(masks.unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)
        masks = moved.squeeze(1).to(masks.dtype)
    return images, masks


def _intensity(images: Tensor, masks: Tensor | None, params: Mapping[str, float], g: torch.Generator):
    n = images.shape[0]
    pick = _chosen(n, params["p"], g, images.device).float()
    factor = 1 + (torch.rand(n, generator=g).to(images.device) * 2 - 1) * params["scale"] * pick
    offset = (torch.rand(n, generator=g).to(images.device) * 2 - 1) * params["shift"] * pick
    return images * _per_sample(factor, images.ndim) + _per_sample(offset, images.ndim), masks


def _noise(images: Tensor, masks: Tensor | None, params: Mapping[str, float], g: torch.Generator):
    pick = _chosen(images.shape[0], params["p"], g, images.device).float()
    noise = torch.randn(images.shape, generator=g).to(images.device) * params["std"]
    return images + noise * _per_sample(pick, images.ndim), masks


def _gamma(images: Tensor, masks: Tensor | None, params: Mapping[str, float], g: torch.Generator):
    n = images.shape[0]
    pick = _chosen(n, params["p"], g, images.device).float()
    log_gamma = (torch.rand(n, generator=g).to(images.device) * 2 - 1) * math.log1p(params["range"]) * pick
    return images.clamp(min=0) ** _per_sample(torch.exp(log_gamma), images.ndim), masks


register_transform("flip", _flip, defaults={"p": 0.5, "axis": -1.0},
                   doc="mirror along spatial axis `axis` (-1 = the last), as RandFlip")
register_transform("rotate90", _rotate90, defaults={"p": 0.5},
                   doc="rotate by 90, 180 or 270 degrees in the last two axes, as RandRotate90")
register_transform("affine", _affine, defaults={"p": 0.5, "rotate": 0.26, "scale": 0.1, "translate": 0.1},
                   doc="rotation (radians), zoom and shift (fraction of the side), bilinear / nearest for masks")
register_transform("intensity", _intensity, defaults={"p": 0.5, "scale": 0.1, "shift": 0.1},
                   doc="x * (1 + u*scale) + v*shift, as RandScaleIntensity + RandShiftIntensity")
register_transform("noise", _noise, defaults={"p": 0.5, "std": 0.02}, doc="additive Gaussian noise")
register_transform("gamma", _gamma, defaults={"p": 0.5, "range": 0.3},
                   doc="x ** gamma, gamma in [1/(1+range), 1+range], as RandAdjustContrast")

_ITEM = re.compile(r"\s*([a-z][a-z0-9_]*)\s*(?:\(([^()]*)\))?\s*(?:,|$)")


@dataclass(frozen=True)
class Augmentation:
    """A parsed ``train.augment``: transforms with their parameters, applied in order."""

    steps: tuple[tuple[str, Mapping[str, float]], ...]

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, images: Tensor, masks: Tensor | None, *, generator: torch.Generator):
        """Augment a batch (and its masks); returns ``(images, masks)``."""
        for name, params in self.steps:
            images, masks = TRANSFORMS[name].fn(images, masks, params, generator)
        return images, masks


def _error(spec: str, detail: str) -> ConfigError:
    valid = ", ".join(f"{n}({', '.join(f'{k}={v:g}' for k, v in t.defaults.items())})" for n, t in TRANSFORMS.items())
    return ConfigError([f"train.augment: {spec!r}: {detail}; use none, light, strong or a list of: {valid}"],
                       source="train config")


def parse_augment(spec: str) -> Augmentation:
    """Parse ``train.augment`` into an :class:`Augmentation` (never evaluates anything).

    Raises:
        ConfigError: Unknown transform or parameter, or a value that is not a number.
    """
    text = PRESETS.get(spec.strip().lower(), spec)
    steps: list[tuple[str, Mapping[str, float]]] = []
    pos = 0
    while pos < len(text.strip()):
        match = _ITEM.match(text, pos)
        if match is None or match.end() == pos:
            raise _error(spec, f"cannot read {text[pos:]!r}")
        pos = match.end()
        name, args = match[1], match[2] or ""
        if name not in TRANSFORMS:
            raise _error(spec, f"unknown transform {name!r}")
        params = dict(TRANSFORMS[name].defaults)
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in params:
                raise _error(spec, f"{name} has no parameter {key!r}")
            try:
                params[key] = float(value)
            except ValueError:
                raise _error(spec, f"{name}({key}=...) must be a number, got {value.strip()!r}") from None
            if not math.isfinite(params[key]):
                raise _error(spec, f"{name}({key}=...) must be finite")
        if not 0.0 <= params["p"] <= 1.0:
            raise _error(spec, f"{name}(p={params['p']:g}) must be a probability")
        steps.append((name, params))
    return Augmentation(tuple(steps))
