"""Per-site acquisition profiles for any image dataset, built from MONAI transforms.

A *profile* imitates one hospital's scanner and protocol: Gaussian blur (focus /
reconstruction kernel), down-sampling (lower resolution: shrink, then enlarge
back), a gamma curve, a contrast change, an intensity bias and sensor noise. Its
parameters are drawn once per ``(seed, site)`` from ``data.shift_strength``, so a
site's train and test images share one scanner, and the whole shift is a pure
function of the config: the same seed always gives the same images.

Every transform acts on each image on its own (blur, resizing and noise run on a
batch whose "channels" are the images; the gamma curve is MONAI's
``AdjustContrast`` per image, vectorised), so
shifting a subset gives the same images as shifting everything and subsetting.
Works for 2-D images ``(N, C, H, W)`` and 3-D volumes ``(N, C, D, H, W)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

SHIFT_COMPONENTS = ("blur", "downsample", "gamma", "contrast", "bias", "noise")
"""Components of an acquisition profile, in the order they are applied."""

_PROFILE_STREAM = 7101
_NOISE_STREAM = 7102


@dataclass(frozen=True)
class AcquisitionProfile:
    """One site's scanner: the parameters :func:`apply_acquisition_shift` uses.

    Attributes:
        blur_sigma: Gaussian blur in pixels (0 = none).
        downsample: Resolution factor >= 1 (2 = half the resolution, then back up).
        gamma: Gamma curve exponent (1 = none).
        contrast: Contrast around mid-grey 0.5 (1 = none).
        bias: Intensity offset added to every pixel.
        noise_std: Standard deviation of additive Gaussian noise.
    """

    blur_sigma: float = 0.0
    downsample: float = 1.0
    gamma: float = 1.0
    contrast: float = 1.0
    bias: float = 0.0
    noise_std: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The parameters as a plain dict (for reports)."""
        return {k: float(v) for k, v in asdict(self).items()}


def parse_components(text: str) -> tuple[str, ...]:
    """Parse ``data.shift_components`` (comma separated, or ``all``) into known component names.

    Raises:
        ValueError: Naming the unknown component(s) and the allowed ones.
    """
    names = tuple(part.strip().lower() for part in str(text).split(",") if part.strip())
    if names == ("all",):
        return SHIFT_COMPONENTS
    unknown = [n for n in names if n not in SHIFT_COMPONENTS]
    if unknown:
        raise ValueError(
            f"data.shift_components: unknown component(s) {unknown}; allowed: {', '.join(SHIFT_COMPONENTS)} or 'all'"
        )
    return tuple(n for n in SHIFT_COMPONENTS if n in names)


def acquisition_profile(
    *, site_index: int, seed: int, strength: float, components: tuple[str, ...] = SHIFT_COMPONENTS
) -> AcquisitionProfile:
    """Draw one site's acquisition profile.

    At ``strength=1`` a site may get up to 1.5 px blur, 3x lower resolution, gamma in
    ``[0.55, 1.8]``, contrast in ``[0.6, 1.4]``, a bias of up to +-0.12 and noise up to
    0.06; ``0.5`` halves every deviation; 0 is the identity.

    Args:
        site_index: Zero-based site number.
        seed: Experiment seed.
        strength: Shift strength, ``>= 0``.
        components: Which components are active (the others stay neutral).

    Returns:
        The site's :class:`AcquisitionProfile`.
    """
    if strength < 0:
        raise ValueError(f"data.shift_strength must be >= 0, got {strength}")
    if site_index < 0:
        raise ValueError(f"site_index must be >= 0, got {site_index}")
    rng = np.random.default_rng([int(seed), int(site_index), _PROFILE_STREAM])
    u = rng.uniform(-1.0, 1.0, 4)
    r = rng.random(2)
    drawn = {
        "blur_sigma": strength * 1.5 * r[0],
        "downsample": 1.0 + strength * 2.0 * r[1],
        "gamma": math.exp(strength * 0.6 * u[0]),
        "contrast": 1.0 + strength * 0.4 * u[1],
        "bias": strength * 0.12 * u[2],
        "noise_std": strength * 0.06 * (0.5 + 0.5 * u[3]),
    }
    field = {"blur": "blur_sigma", "downsample": "downsample", "gamma": "gamma", "contrast": "contrast",
             "bias": "bias", "noise": "noise_std"}
    return AcquisitionProfile(**{field[c]: float(drawn[field[c]]) for c in components})


def _as_channels(images: np.ndarray) -> torch.Tensor:
    """(N, C, *S) -> (N*C, *S): MONAI treats the images as channels of one batch."""
    n, c = images.shape[:2]
    return torch.from_numpy(np.array(images, dtype=np.float32)).reshape(n * c, *images.shape[2:])


def adjust_contrast_per_image(images: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """MONAI's :class:`~monai.transforms.AdjustContrast` applied to every row of ``images`` on its own.

    ``x -> ((x - min) / (range + 1e-7)) ** gamma * range + min`` with each image's own
    minimum and range, vectorised (one MONAI call per image is ~100x slower).

    Args:
        images: ``(N, ...)`` float tensor, one image per row.
        gamma: The gamma exponent.
    """
    flat = images.reshape(images.shape[0], -1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    out = ((flat - low) / (span + 1e-7)) ** gamma * span + low
    return out.reshape(images.shape)


def apply_acquisition_shift(
    images: np.ndarray, *, profile: AcquisitionProfile, noise_seed: int
) -> np.ndarray:
    """Apply an acquisition profile to images or volumes.

    Args:
        images: Float ``(N, C, H, W)`` or ``(N, C, D, H, W)`` in ``[0, 1]``; not modified.
        profile: The site's profile (:func:`acquisition_profile`).
        noise_seed: Seed of the pixel noise (use different ones for a site's train and test).

    Returns:
        A new float32 array of the same shape, clipped to ``[0, 1]``.

    Raises:
        ValueError: For tabular (2-D) or otherwise shaped input.
    """
    if images.ndim not in (4, 5):
        raise ValueError(
            f"acquisition shifts need images (N, C, H, W) or volumes (N, C, D, H, W), got shape {images.shape}; "
            "tabular datasets take data.site_shift=none"
        )
    # Imported here: monai.transforms takes seconds to import, and only shifted runs need it.
    from monai.transforms import GaussianSmooth, RandGaussianNoise, Resize, ScaleIntensityRange, ShiftIntensity

    shape = images.shape
    if images.shape[0] == 0:
        return np.array(images, dtype=np.float32, copy=True)
    x = _as_channels(images)
    spatial = tuple(shape[2:])
    if profile.blur_sigma >= 0.1:
        x = GaussianSmooth(sigma=profile.blur_sigma)(x)
    if profile.downsample > 1.0 + 1e-6:
        small = tuple(max(2, round(s / profile.downsample)) for s in spatial)
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        x = Resize(spatial_size=small, mode=mode, anti_aliasing=True)(x)
        x = Resize(spatial_size=spatial, mode=mode)(x)
    x = torch.as_tensor(x).clamp(0.0, 1.0)
    if abs(profile.gamma - 1.0) > 1e-9:
        x = adjust_contrast_per_image(x.reshape(shape[0], -1), gamma=profile.gamma).reshape(x.shape)
    if abs(profile.contrast - 1.0) > 1e-9:
        half = 0.5 * profile.contrast
        x = ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.5 - half, b_max=0.5 + half)(x)
    if profile.bias:
        x = ShiftIntensity(offset=profile.bias)(x)
    if profile.noise_std > 0:
        noise = RandGaussianNoise(prob=1.0, mean=0.0, std=profile.noise_std, sample_std=False)
        noise.set_random_state(seed=int(noise_seed) % (2**32))
        x = noise(x)
    out = torch.as_tensor(x).clamp(0.0, 1.0).reshape(shape)
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def shift_site_images(
    images: np.ndarray,
    *,
    site_index: int,
    seed: int,
    strength: float,
    components: tuple[str, ...] = SHIFT_COMPONENTS,
    noise_stream: int = 0,
) -> np.ndarray:
    """Shift one site's images with its own profile (train: ``noise_stream=0``, test: 1).

    Args:
        images: The site's images or volumes.
        site_index: Zero-based site number.
        seed: Experiment seed.
        strength: ``data.shift_strength``.
        components: Active components (``data.shift_components``).
        noise_stream: Separates the noise of a site's splits.

    Returns:
        The shifted copy.
    """
    profile = acquisition_profile(site_index=site_index, seed=seed, strength=strength, components=components)
    noise_seed = int(np.random.SeedSequence([int(seed), int(site_index), _NOISE_STREAM, int(noise_stream)])
                     .generate_state(1)[0])
    logger.debug("site %d acquisition profile %s", site_index, profile.as_dict())
    return apply_acquisition_shift(images, profile=profile, noise_seed=noise_seed)
