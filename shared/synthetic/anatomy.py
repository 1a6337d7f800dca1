"""Where the landmarks go, and the disc and cup masks with their exact rasterised sizes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.findings import Laterality
from shared.synthetic.geometry import BoolArray, mask_bbox
from shared.synthetic.spec import SyntheticFundusSpec


@dataclass(frozen=True)
class Layout:
    """Landmark positions in pixels, derived from the spec."""

    size: int
    fov_center: tuple[float, float]
    fov_radius: float
    disc_center: tuple[float, float]
    disc_radius: float
    fovea_center: tuple[float, float]
    # +1 when the temporal side (towards the macula) is +x in the image, -1 when it is -x.
    temporal_sign: int

    @property
    def disc_diameter(self) -> float:
        return 2.0 * self.disc_radius


def make_layout(spec: SyntheticFundusSpec) -> Layout:
    """Place FOV, disc and fovea; the disc centre snaps to a pixel centre (see disc_and_cup)."""
    mid = (spec.size - 1) / 2.0
    temporal_sign = -1 if spec.laterality == Laterality.RIGHT else 1
    if spec.disc_center is None:
        disc_xy = (mid - temporal_sign * spec.disc_nasal_offset * spec.size, mid)
    else:
        disc_xy = spec.disc_center
    disc = (float(np.rint(disc_xy[0])), float(np.rint(disc_xy[1])))
    dd = 2.0 * spec.disc_radius_px
    fovea = (
        disc[0] + temporal_sign * spec.fovea_offset_dd[0] * dd,
        disc[1] + spec.fovea_offset_dd[1] * dd,
    )
    fov_radius = spec.fov_radius_fraction * spec.size
    layout = Layout(
        spec.size, (mid, mid), fov_radius, disc, spec.disc_radius_px, fovea, temporal_sign
    )
    if _dist(disc, layout.fov_center) + spec.disc_radius_px > 0.9 * fov_radius:
        raise ValueError("the optic disc must lie well inside the field of view")
    if _dist(fovea, layout.fov_center) > 0.8 * fov_radius:
        raise ValueError("the fovea must lie well inside the field of view")
    return layout


def _dist(a: tuple[float, float], b: tuple[float, float]) -> float:
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))


@dataclass(frozen=True)
class DiscAndCup:
    """Masks and their rasterised extents (height = rows spanned, width = columns spanned)."""

    disc_mask: BoolArray
    cup_mask: BoolArray
    cup_center: tuple[float, float]
    cup_radius_v: float
    cup_radius_h: float
    disc_height_px: int
    disc_width_px: int
    cup_height_px: int
    cup_width_px: int


def disc_and_cup(spec: SyntheticFundusSpec, layout: Layout) -> DiscAndCup:
    """Rasterise the disc (a circle) and the cup (an ellipse) so the drawn CDRs hit the spec.

    The disc is centred on a pixel, so it spans 2*floor(R)+1 rows. The cup's target span is
    round(CDR * disc span) rows; an odd span needs the cup centred on a pixel row, an even one
    half-way between two, and a semi-axis of span/2 - 1/4 then covers exactly `span` rows.
    The drawn CDR is therefore within 0.5 / disc span of the spec (<= 0.005 for R >= 50).
    """
    yy, xx = np.ogrid[0 : spec.size, 0 : spec.size]
    cx, cy = layout.disc_center
    disc_mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= layout.disc_radius**2
    dx0, dy0, dx1, dy1 = mask_bbox(disc_mask)
    disc_w, disc_h = dx1 - dx0, dy1 - dy0
    cup_h = int(np.floor(spec.cdr_vertical * disc_h + 0.5))
    cup_w = int(np.floor(spec.cdr_horizontal_value * disc_w + 0.5))
    # Offset by half a pixel for even spans, towards the bottom-right (an arbitrary choice).
    cup_center = (cx + 0.5 * (1 - cup_w % 2), cy + 0.5 * (1 - cup_h % 2))
    semi_v, semi_h = cup_h / 2.0 - 0.25, cup_w / 2.0 - 0.25
    cup_mask = (
        ((xx - cup_center[0]) / semi_h) ** 2 + ((yy - cup_center[1]) / semi_v) ** 2 <= 1.0
    ) & disc_mask
    cx0, cy0, cx1, cy1 = mask_bbox(cup_mask)
    return DiscAndCup(
        disc_mask, cup_mask, cup_center, semi_v, semi_h, disc_h, disc_w, cy1 - cy0, cx1 - cx0
    )
