"""DR lesions: irregular blobs with exact masks and boxes, kept off the disc and apart.

A lesion's outline is a circle of `radius` whose radius varies with angle by a few random
harmonics, r(theta) = radius * (1 + sum_k a_k cos(k theta + phi_k)); its mask is the pixels
whose centre lies inside that outline, so it never reaches beyond radius * (1 + sum a_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.findings import LesionType
from shared.synthetic.anatomy import Layout
from shared.synthetic.geometry import BoolArray, FloatArray, disc_grid, mask_bbox
from shared.synthetic.spec import LesionSpec, SyntheticFundusSpec

# Radius ranges (px at 912) and outline irregularity (sum of harmonic amplitudes) per type.
_RADIUS = {
    LesionType.MICROANEURYSM: (2.0, 4.0),
    LesionType.HAEMORRHAGE: (6.0, 15.0),
    LesionType.HARD_EXUDATE: (3.0, 9.0),
    LesionType.SOFT_EXUDATE: (10.0, 20.0),
}
_IRREGULARITY = {
    LesionType.MICROANEURYSM: 0.0,
    LesionType.HAEMORRHAGE: 0.2,
    LesionType.HARD_EXUDATE: 0.4,
    LesionType.SOFT_EXUDATE: 0.25,
}
_HARMONICS = 4  # k = 2..5
_DISC_GAP_PX = 3.0
_LESION_GAP_PX = 2.0
_FOV_FRACTION = 0.85  # lesions stay inside this part of the FOV radius
_PLACEMENT_TRIES = 500


@dataclass(frozen=True)
class SyntheticLesion:
    """A drawn lesion. `mask` covers only `box_px`: mask[y - y0, x - x0]."""

    type: LesionType
    center: tuple[float, float]
    radius: float
    box_px: tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive-exclusive
    box_norm: tuple[float, float, float, float]  # [x_min, y_min, x_max, y_max] / size, 4 dp
    mask: BoolArray
    # Distance from the centre over the outline's radius at each box pixel (<= 1 in the mask);
    # the renderer shades with it.
    norm_radius: FloatArray

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    def full_mask(self, shape: tuple[int, int]) -> BoolArray:
        out = np.zeros(shape, dtype=bool)
        x0, y0, x1, y1 = self.box_px
        out[y0:y1, x0:x1] = self.mask
        return out


@dataclass(frozen=True)
class _Outline:
    type: LesionType
    center: tuple[float, float]
    radius: float
    harmonics: FloatArray  # (K, 2): amplitude, phase for k = 2..K+1

    @property
    def reach(self) -> float:
        return self.radius * (1.0 + float(self.harmonics[:, 0].sum()))


def place_lesions(
    spec: SyntheticFundusSpec, layout: Layout, rng: np.random.Generator
) -> list[SyntheticLesion]:
    """The spec's explicit lesions, then `lesion_counts` more at random, all rasterised."""
    outlines: list[_Outline] = []
    for given in spec.lesions:
        outline = _outline(given, rng)
        problem = _conflict(outline, outlines, layout)
        if problem:
            raise ValueError(f"lesion {given.type.value} at {given.center}: {problem}")
        outlines.append(outline)
    for lesion_type in LesionType:  # fixed order keeps the draws reproducible
        for _ in range(spec.lesion_counts.get(lesion_type, 0)):
            outlines.append(_random_outline(lesion_type, outlines, layout, rng))
    return [_rasterise(o, spec.size) for o in outlines]


def _outline(given: LesionSpec, rng: np.random.Generator) -> _Outline:
    return _Outline(given.type, given.center, given.radius, _harmonics(given.type, rng))


def _harmonics(lesion_type: LesionType, rng: np.random.Generator) -> FloatArray:
    weights = rng.uniform(0.2, 1.0, _HARMONICS)
    amplitudes = _IRREGULARITY[lesion_type] * weights / weights.sum()
    phases = rng.uniform(0.0, 2.0 * np.pi, _HARMONICS)
    return np.column_stack([amplitudes, phases])


def _random_outline(
    lesion_type: LesionType, placed: list[_Outline], layout: Layout, rng: np.random.Generator
) -> _Outline:
    for _ in range(_PLACEMENT_TRIES):
        # Uniform over the usable disc of the FOV.
        r = _FOV_FRACTION * layout.fov_radius * np.sqrt(rng.uniform())
        angle = rng.uniform(0.0, 2.0 * np.pi)
        cx, cy = layout.fov_center
        center = (float(cx + r * np.cos(angle)), float(cy + r * np.sin(angle)))
        radius = float(rng.uniform(*_RADIUS[lesion_type]))
        outline = _Outline(lesion_type, center, radius, _harmonics(lesion_type, rng))
        if not _conflict(outline, placed, layout):
            return outline
    raise ValueError(f"no room left for another {lesion_type.value}; ask for fewer lesions")


def _conflict(outline: _Outline, placed: list[_Outline], layout: Layout) -> str:
    """Why the lesion cannot go there ('' if it can): the checks use its outline's reach."""
    x, y = outline.center
    if np.hypot(x - layout.fov_center[0], y - layout.fov_center[1]) + outline.reach > (
        _FOV_FRACTION * layout.fov_radius
    ):
        return "outside the usable field of view"
    if np.hypot(x - layout.disc_center[0], y - layout.disc_center[1]) < (
        layout.disc_radius + outline.reach + _DISC_GAP_PX
    ):
        return "overlaps the optic disc"
    for other in placed:
        gap = np.hypot(x - other.center[0], y - other.center[1])
        if gap < outline.reach + other.reach + _LESION_GAP_PX:
            return "overlaps another lesion"
    return ""


def _rasterise(outline: _Outline, size: int) -> SyntheticLesion:
    x0, y0, dx, dy = disc_grid(outline.center, outline.reach + 1.0, (size, size))
    theta = np.arctan2(dy, dx)
    k = np.arange(2, 2 + _HARMONICS)
    amp, phase = outline.harmonics[:, 0], outline.harmonics[:, 1]
    limit = outline.radius * (1.0 + (amp * np.cos(k * theta[..., None] + phase)).sum(axis=-1))
    norm_radius = np.hypot(dx, dy) / limit
    mask = norm_radius <= 1.0
    bx0, by0, bx1, by1 = mask_bbox(mask)
    box = (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)
    box_norm = (
        round(box[0] / size, 4),
        round(box[1] / size, 4),
        round(box[2] / size, 4),
        round(box[3] / size, 4),
    )
    return SyntheticLesion(
        type=outline.type,
        center=outline.center,
        radius=outline.radius,
        box_px=box,
        box_norm=box_norm,
        mask=mask[by0:by1, bx0:bx1],
        norm_radius=norm_radius[by0:by1, bx0:bx1],
    )
