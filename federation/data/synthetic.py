"""The offline default dataset ``synthetic`` and per-site acquisition shifts.

``synthetic`` is a small, learnable lesion-detection task. Every image is a
grayscale ``image_size`` x ``image_size`` picture of smooth, textured "tissue"
(low-frequency sinusoids, smoothed noise and a few broad structures) with thin
line distractors (vessels) and pixel noise. Label 1 images additionally contain
one to three small lesion-like blobs (bright Gaussians, or bright cores with a
dark rim) at random places, sizes and contrasts; label 0 images contain none.
The mean image intensity is nearly uninformative, so a model has to find local,
blob-shaped structure; faint lesions keep the task short of trivial.

:func:`generate_synthetic_lesions` also returns every image's lesion mask, and
:func:`synthetic_lesion_masks` gives the masks aligned with ``load_dataset``'s
train and test splits (for explanation and segmentation checks).

:func:`apply_site_shift` imitates different scanners: each site gets its own
deterministic blur, gamma, contrast, intensity bias and noise level.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from federation.config.schema import DataConfig
from federation.data.registry import (
    DatasetInfo,
    DatasetSplits,
    _derive_seed,
    register_dataset,
    stratified_subset,
)

logger = logging.getLogger(__name__)

SYNTHETIC_SITE_SHIFT = 0.5
"""Default per-site acquisition-shift strength of the ``synthetic`` dataset."""

SYNTHETIC_TEST_FRACTION = 0.2
"""Share of the generated images put into the test split (stratified)."""

LESION_MASK_RADIUS = 2.0
"""Lesion masks cover the pixels within this many blob sigmas of a lesion centre."""

_MAX_BLOBS = 3
_MAX_LINES = 2
_NUM_SINES = 4
_NUM_STRUCTURES = 2
_CHUNK_PIXELS = 1 << 22  # pixels per vectorised chunk (bounds temporary memory)


def _separable(amp: np.ndarray, cx: np.ndarray, cy: np.ndarray, sigma: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Sum of isotropic Gaussians ``amp * exp(-|p-c|^2 / 2 sigma^2)``; inputs (n, t) -> (n, S, S)."""
    gx = np.exp(-((grid[None, None, :] - cx[..., None]) ** 2) / (2.0 * sigma[..., None] ** 2))
    gy = np.exp(-((grid[None, None, :] - cy[..., None]) ** 2) / (2.0 * sigma[..., None] ** 2))
    return np.einsum("nti,ntj->nij", (amp[..., None] * gy).astype(np.float32), gx.astype(np.float32))


def _lines(amp: np.ndarray, ends: np.ndarray, width: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Thin line segments; amp/width (n, L), ends (n, L, 4) as x0, y0, x1, y1 -> (n, S, S).

    Only segments with a non-zero amplitude are rendered.
    """
    n, size = amp.shape[0], grid.shape[0]
    out = torch.zeros((n, size, size), dtype=torch.float32)
    image, line = np.nonzero(amp)
    if image.size == 0:
        return out.numpy()
    g = torch.from_numpy(grid.astype(np.float32))
    px, py = g.view(1, 1, -1), g.view(1, -1, 1)  # columns, rows
    e = torch.from_numpy(ends[image, line].astype(np.float32))[:, :, None, None]
    x0, y0, x1, y1 = e[:, 0], e[:, 1], e[:, 2], e[:, 3]
    dx, dy = x1 - x0, y1 - y0
    t = (((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy + 1e-12)).clamp_(0.0, 1.0)
    dist2 = (px - x0 - t * dx).square_() + (py - y0 - t * dy).square_()
    w = torch.from_numpy(width[image, line].astype(np.float32))[:, None, None]
    a = torch.from_numpy(amp[image, line].astype(np.float32))[:, None, None]
    # exp in NumPy, on one thread: torch splits an exp across its threads, and where a split falls decides which
    # elements its vectorised or its scalar exp computes (they differ by up to 3e-5 here), so the same seed gave
    # different images in about one process in five.
    gauss = torch.from_numpy(np.exp(dist2.numpy() / (-2.0 * w.numpy() * w.numpy())))
    out.index_add_(0, torch.from_numpy(image), a * gauss)
    return out.numpy()


class SyntheticLesions(NamedTuple):
    """Synthetic images with their labels and lesion masks (see :func:`generate_synthetic_lesions`).

    Attributes:
        images: float32 ``(N, 1, S, S)`` in ``[0, 1]``.
        labels: int64 ``(N,)``; 1 = at least one lesion.
        masks: uint8 ``(N, 1, S, S)``; 1 inside a lesion, 0 elsewhere (all 0 for label 0).
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


def generate_synthetic(*, num_samples: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate the synthetic lesion images and labels.

    Args:
        num_samples: Number of images (half of them, rounded down, are positive).
        image_size: Side length in pixels.
        seed: Seed; the same arguments always give the same arrays.

    Returns:
        ``(images, labels)``: float32 ``(N, 1, S, S)`` in ``[0, 1]`` and int64 ``(N,)``.
    """
    images, labels, _ = _generate(num_samples=num_samples, image_size=image_size, seed=seed, with_masks=False)
    return images, labels


def generate_synthetic_lesions(*, num_samples: int, image_size: int, seed: int) -> SyntheticLesions:
    """Generate the synthetic images and labels together with each image's lesion mask.

    The images and labels are exactly those of :func:`generate_synthetic` with the
    same arguments. A pixel belongs to a lesion when its centre lies within
    :data:`LESION_MASK_RADIUS` blob sigmas of a lesion centre (the bright core has
    fallen to ``exp(-2)`` of its peak there); lesions may overlap and may touch the
    image border (the disc is cut off there).

    Args:
        num_samples: Number of images (half of them, rounded down, are positive).
        image_size: Side length in pixels.
        seed: Seed; the same arguments always give the same arrays.

    Returns:
        :class:`SyntheticLesions` ``(images, labels, masks)``; ``masks`` is uint8
        ``(N, 1, S, S)``, the images' shape, 1 inside a lesion and 0 elsewhere, all 0
        for every image with label 0.
    """
    images, labels, masks = _generate(num_samples=num_samples, image_size=image_size, seed=seed, with_masks=True)
    assert masks is not None
    return SyntheticLesions(images=images, labels=labels, masks=masks)


def _lesion_masks(cx: np.ndarray, cy: np.ndarray, sigma: np.ndarray, amp: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Discs of radius ``LESION_MASK_RADIUS * sigma`` around every drawn blob (amp != 0); (n, t) -> (n, S, S) uint8."""
    r2 = (LESION_MASK_RADIUS * sigma) ** 2
    dx2 = (grid[None, None, :] - cx[..., None]) ** 2  # (n, t, S) columns
    dy2 = (grid[None, None, :] - cy[..., None]) ** 2  # (n, t, S) rows
    inside = dy2[..., :, None] + dx2[..., None, :] <= r2[..., None, None]  # (n, t, S, S)
    inside &= (amp != 0)[..., None, None]
    return inside.any(axis=1).astype(np.uint8)


def _generate(
    *, num_samples: int, image_size: int, seed: int, with_masks: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The generator behind :func:`generate_synthetic` (masks only when asked for)."""
    if num_samples < 1 or image_size < 4:
        raise ValueError(f"need num_samples >= 1 and image_size >= 4, got {num_samples}, {image_size}")
    n, size = num_samples, image_size
    rng = np.random.default_rng(_derive_seed(seed, 101))
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    grid = ((np.arange(size) + 0.5) / size).astype(np.float64)

    # Per-image parameters are drawn up front; pixel noise per chunk (chunk size depends only on size).
    base = rng.uniform(0.25, 0.55, n)
    sine_amp = rng.uniform(0.01, 0.06, (n, _NUM_SINES))
    sine_f = rng.uniform(-3.0, 3.0, (n, _NUM_SINES, 2))
    sine_phase = rng.uniform(0.0, 2 * math.pi, (n, _NUM_SINES))
    struct_amp = rng.uniform(-0.12, 0.12, (n, _NUM_STRUCTURES))
    struct_c = rng.uniform(0.1, 0.9, (n, _NUM_STRUCTURES, 2))
    struct_sigma = rng.uniform(0.15, 0.3, (n, _NUM_STRUCTURES))
    n_lines = rng.integers(0, _MAX_LINES + 1, n)
    line_amp = rng.uniform(0.1, 0.35, (n, _MAX_LINES)) * rng.choice([-1.0, 1.0], (n, _MAX_LINES), p=[0.3, 0.7])
    line_amp *= np.arange(_MAX_LINES)[None, :] < n_lines[:, None]
    line_ends = rng.uniform(0.0, 1.0, (n, _MAX_LINES, 4))
    line_width = np.maximum(rng.uniform(0.012, 0.022, (n, _MAX_LINES)), 0.35 / size)
    n_blobs = np.where(labels == 1, rng.choice([1, 2, 3], n, p=[0.6, 0.3, 0.1]), 0)
    blob_amp = rng.uniform(0.25, 0.55, (n, _MAX_BLOBS))
    blob_amp *= np.arange(_MAX_BLOBS)[None, :] < n_blobs[:, None]
    blob_c = rng.uniform(0.15, 0.85, (n, _MAX_BLOBS, 2))
    blob_sigma = np.maximum(rng.uniform(0.06, 0.11, (n, _MAX_BLOBS)), 0.6 / size)
    rimmed = rng.random((n, _MAX_BLOBS)) < 0.3
    noise_std = rng.uniform(0.015, 0.04, n)
    coarse = max(3, size // 7)

    images = np.empty((n, 1, size, size), dtype=np.float32)
    masks = np.zeros((n, 1, size, size), dtype=np.uint8) if with_masks else None
    step = max(1, _CHUNK_PIXELS // (size * size * max(_MAX_LINES, 1)))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        sl = slice(lo, hi)
        # Low-frequency sinusoids, written separably: sin(a + b) = sin a cos b + cos a sin b.
        ax = 2 * math.pi * sine_f[sl, :, 0, None] * grid + sine_phase[sl, :, None]
        by = 2 * math.pi * sine_f[sl, :, 1, None] * grid
        amp = sine_amp[sl, :, None]
        img = np.einsum("nki,nkj->nij", amp * np.cos(by), np.sin(ax)) + np.einsum(
            "nki,nkj->nij", amp * np.sin(by), np.cos(ax)
        )
        img = img.astype(np.float32) + base[sl, None, None].astype(np.float32)
        # Smoothed noise texture.
        texture = torch.from_numpy(rng.normal(0.0, 0.025, (hi - lo, 1, coarse, coarse)).astype(np.float32))
        img += F.interpolate(texture, size=(size, size), mode="bicubic", align_corners=False)[:, 0].numpy()
        # Broad structures and thin lines (both classes).
        img += _separable(struct_amp[sl], struct_c[sl, :, 0], struct_c[sl, :, 1], struct_sigma[sl], grid)
        img += _lines(line_amp[sl], line_ends[sl], line_width[sl], grid)
        # Lesions (positives only): bright core, optionally minus a wider dark rim of equal mass.
        a, cx, cy, s = blob_amp[sl], blob_c[sl, :, 0], blob_c[sl, :, 1], blob_sigma[sl]
        img += _separable(a, cx, cy, s, grid)
        k = 1.8
        img -= _separable(a * rimmed[sl] / (k * k), cx, cy, s * k, grid)
        img += rng.normal(0.0, 1.0, (hi - lo, size, size)).astype(np.float32) * noise_std[sl, None, None].astype(
            np.float32
        )
        images[sl, 0] = np.clip(img, 0.0, 1.0)
        if masks is not None:
            masks[sl, 0] = _lesion_masks(cx, cy, s, a, grid)
    return images, labels, masks


def _stratified_split(labels: np.ndarray, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: int(round(test_fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def load_synthetic(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits:
    """Registry loader of ``synthetic``: ``data.num_samples`` images, 80/20 train/test.

    Args:
        config: The ``data`` section (``num_samples`` and ``image_size`` are used).
        data_dir: Unused (nothing is read from disk).
        seed: Generation seed.

    Returns:
        The generated dataset (1 channel, 2 classes, no val split).
    """
    del data_dir
    images, labels = generate_synthetic(num_samples=config.num_samples, image_size=config.image_size, seed=seed)
    train_idx, test_idx = _stratified_split(
        labels, test_fraction=SYNTHETIC_TEST_FRACTION, seed=_derive_seed(seed, 102)
    )
    return DatasetSplits(
        name="synthetic",
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        test_images=images[test_idx],
        test_labels=labels[test_idx],
        num_classes=2,
        in_channels=1,
        md5=None,
        label_names=("no lesion", "lesion"),
    )


def synthetic_lesion_masks(config: DataConfig, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesion masks aligned with ``load_dataset(config, seed=seed)`` of the ``synthetic`` dataset.

    Row ``i`` of the returned train (test) masks belongs to row ``i`` of that
    dataset's ``train_images`` (``test_images``): the same 80/20 split and the same
    ``data.max_train_samples`` / ``data.max_test_samples`` subsets are taken. Site
    shifts (:func:`apply_site_shift`) do not move lesions, so the masks also fit
    every site's shifted images.

    Args:
        config: The ``data`` section; ``dataset`` must be ``synthetic``.
        seed: The experiment seed given to ``load_dataset``.

    Returns:
        ``(train_masks, test_masks)``: uint8 ``(N, 1, S, S)`` and ``(M, 1, S, S)``,
        1 inside a lesion, 0 elsewhere.

    Raises:
        ValueError: If ``config.dataset`` is not ``synthetic``.
    """
    if config.dataset != "synthetic":
        raise ValueError(f"lesion masks exist only for data.dataset=synthetic, got data.dataset={config.dataset!r}")
    data = generate_synthetic_lesions(num_samples=config.num_samples, image_size=config.image_size, seed=seed)
    train_idx, test_idx = _stratified_split(
        data.labels, test_fraction=SYNTHETIC_TEST_FRACTION, seed=_derive_seed(seed, 102)
    )
    # Same subsets as federation.data.registry._load_cached.
    if 0 < config.max_train_samples < len(train_idx):
        keep = stratified_subset(data.labels[train_idx], n=config.max_train_samples, seed=_derive_seed(seed, 11))
        train_idx = train_idx[keep]
    if 0 < config.max_test_samples < len(test_idx):
        keep = stratified_subset(data.labels[test_idx], n=config.max_test_samples, seed=_derive_seed(seed, 12))
        test_idx = test_idx[keep]
    return data.masks[train_idx], data.masks[test_idx]


def _gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, C, H, W) float32 images with reflect padding."""
    radius = min(int(math.ceil(3.0 * sigma)), (min(images.shape[2:]) - 1))
    if sigma < 0.1 or radius < 1:
        return images
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    n, c, h, w = images.shape
    t = torch.from_numpy(np.array(images, dtype=np.float32)).reshape(n * c, 1, h, w)
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return t.reshape(n, c, h, w).numpy()


def site_shift_params(*, site_index: int, seed: int, strength: float) -> dict[str, float]:
    """The scanner parameters :func:`apply_site_shift` uses for one site.

    Args:
        site_index: Zero-based site number.
        seed: Experiment seed.
        strength: Shift strength; 0 gives the identity.

    Returns:
        ``blur_sigma`` (pixels), ``gamma``, ``contrast``, ``bias`` and ``noise_std``.
    """
    if strength < 0:
        raise ValueError(f"site shift strength must be >= 0, got {strength}")
    if site_index < 0:
        raise ValueError(f"site_index must be >= 0, got {site_index}")
    rng = np.random.default_rng([int(seed), int(site_index), 7001])
    u = rng.uniform(-1.0, 1.0, 4)
    return {
        "blur_sigma": float(strength * 1.5 * rng.random()),
        "gamma": float(math.exp(strength * 0.6 * u[0])),
        "contrast": float(1.0 + strength * 0.4 * u[1]),
        "bias": float(strength * 0.12 * u[2]),
        "noise_std": float(strength * 0.06 * (0.5 + 0.5 * u[3])),
    }


def apply_site_shift(
    images: np.ndarray, *, site_index: int, seed: int, strength: float, noise_stream: int = 0
) -> np.ndarray:
    """Imitate one site's scanner: blur, gamma, contrast, intensity bias and noise.

    The scanner parameters depend only on ``(site_index, seed, strength)``, so the
    train and test images of a site share one "scanner". The pixel noise also
    depends on ``noise_stream`` (pass different values for a site's train and test
    images so they do not share a noise pattern).

    Args:
        images: Float images ``(N, C, H, W)`` in ``[0, 1]``; not modified.
        site_index: Zero-based site number.
        seed: Experiment seed.
        strength: 0 = no change (a copy is returned); 0.5 = clearly visible; 1 = strong.
        noise_stream: Extra seed of the pixel noise.

    Returns:
        A new float32 array of the same shape, clipped to ``[0, 1]``.

    Raises:
        ValueError: If the images are not 4-D or the strength or index is negative.
    """
    if images.ndim != 4:
        raise ValueError(f"apply_site_shift expects (N, C, H, W) images, got shape {images.shape}")
    params = site_shift_params(site_index=site_index, seed=seed, strength=strength)
    out = np.array(images, dtype=np.float32, copy=True)
    if strength == 0 or out.size == 0:
        return out
    out = _gaussian_blur(out, params["blur_sigma"])
    np.clip(out, 0.0, 1.0, out=out)
    out = np.power(out, np.float32(params["gamma"]), dtype=np.float32)
    out = (out - 0.5) * np.float32(params["contrast"]) + np.float32(0.5 + params["bias"])
    noise_rng = np.random.default_rng([int(seed), int(site_index), 7002, int(noise_stream)])
    out += noise_rng.normal(0.0, params["noise_std"], out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def _register() -> None:
    register_dataset(
        "synthetic",
        load_synthetic,
        site_shift_strength=SYNTHETIC_SITE_SHIFT,
        info=DatasetInfo(in_channels=1, num_classes=2),
        replace=True,
    )
