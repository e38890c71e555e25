"""PNG figures of explanation maps: each image beside its overlay, with a colour bar."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OVERLAY_ALPHA = 0.45
"""Opacity of the map drawn over the image in the right-hand panel."""


@dataclass(frozen=True, eq=False)
class Overlay:
    """One row of a figure: the input, its explanation map (``[0, 1]``, the input's size) and the caption."""

    image: np.ndarray
    cam: np.ndarray
    title: str


def _display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[0] == 3:
        return np.clip(img.transpose(1, 2, 0), 0.0, 1.0), None
    return img.reshape(img.shape[-2:]), "gray"


def save_overlays(
    panels: Sequence[Overlay], path: str | os.PathLike[str], *, suptitle: str = "", label: str = "attribution"
) -> Path:
    """Save a PNG with one row per panel: the image alone, then the image with the map and a colour bar.

    Args:
        panels: The rows to draw.
        path: PNG to write (parent folders are created).
        suptitle: Figure title.
        label: Colour-bar label (e.g. the method's name).

    Returns:
        ``path``.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = max(1, len(panels))
    top = 0.55 if suptitle else 0.3  # inches kept free above the first row
    height = 2.9 * rows + top
    fig, axes = plt.subplots(rows, 2, figsize=(6.4, height), squeeze=False)
    for (left, right), panel in zip(axes, panels):
        shown, cmap = _display(panel.image)
        left.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0)
        left.set_title(panel.title, fontsize=8, y=1.0)  # a fixed y skips matplotlib's per-draw title placement
        right.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0)
        heat = right.imshow(panel.cam, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0)
        right.set_title("overlay", fontsize=8, y=1.0)
        bar = fig.colorbar(heat, ax=right, fraction=0.046, pad=0.03)
        bar.set_label(label, fontsize=7)
        bar.ax.tick_params(labelsize=6)
        left.axis("off")
        right.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    # Fixed margins instead of tight_layout(): the layout pass costs 0.1 s per figure.
    fig.subplots_adjust(left=0.02, right=0.9, bottom=0.02, top=1.0 - top / height, wspace=0.08, hspace=0.25)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
