"""How well explanation maps point at known lesions: pointing game and mass inside lesions.

Used by ``bench/explain_pointing.py`` and the tests on the ``synthetic`` dataset,
whose lesion masks are known (:func:`federation.data.synthetic.synthetic_lesion_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PointingScore:
    """Agreement of maps with lesion masks over a set of lesion-bearing images.

    Attributes:
        n: Images scored.
        hit_rate: Pointing game: share of images whose hottest pixel lies in a lesion
            (ties at the maximum count as the share of tied pixels inside, i.e. a
            random tie-break; an all-equal map scores the lesion's area fraction).
        mass_inside: Mean share of the map's (non-negative) mass inside the lesions.
        area_fraction: Mean share of the image the lesions cover (what a uniform map's
            ``mass_inside`` and a random pixel's hit rate would be).
    """

    n: int
    hit_rate: float
    mass_inside: float
    area_fraction: float

    @property
    def mass_ratio(self) -> float:
        """``mass_inside / area_fraction`` (1 = no better than a uniform map)."""
        return self.mass_inside / self.area_fraction if self.area_fraction > 0 else float("nan")


def pointing_score(maps: np.ndarray, masks: np.ndarray) -> PointingScore:
    """Score ``maps`` ``(N, *spatial)`` against boolean/0-1 ``masks`` of the same shape (or ``(N, 1, *spatial)``).

    Raises:
        ValueError: If the shapes differ or an image has an empty mask.
    """
    m = np.asarray(masks)
    if m.ndim == np.ndim(maps) + 1 and m.shape[1] == 1:
        m = m[:, 0]
    if m.shape != np.shape(maps):
        raise ValueError(f"maps {np.shape(maps)} and masks {m.shape} must have the same shape")
    n = len(m)
    if n == 0:
        return PointingScore(n=0, hit_rate=float("nan"), mass_inside=float("nan"), area_fraction=float("nan"))
    inside = m.reshape(n, -1).astype(bool)
    if not inside.any(axis=1).all():
        raise ValueError("every scored image needs a lesion (non-empty mask)")
    flat = np.asarray(maps, dtype=np.float64).reshape(n, -1)
    top = flat >= flat.max(axis=1, keepdims=True)
    hits = (top & inside).sum(axis=1) / top.sum(axis=1)
    positive = np.clip(flat, 0.0, None)
    total = positive.sum(axis=1)
    uniform = inside.mean(axis=1)
    mass = np.where(total > 0, (positive * inside).sum(axis=1) / np.where(total > 0, total, 1.0), uniform)
    return PointingScore(
        n=n, hit_rate=float(hits.mean()), mass_inside=float(mass.mean()), area_fraction=float(uniform.mean())
    )
