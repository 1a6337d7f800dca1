"""Optic disc and cup extents, CDRs, and the disc-centred measurement zones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from services.analysis.features.skeleton import BoolArray

# Zone radii in disc radii from the disc centre: B is 0.5-1 disc diameter from the disc
# margin, C is 0.5-2 (AutoMorph's 2r..3r and 2r..5r).
ZONE_B = (2.0, 3.0)
ZONE_C = (2.0, 5.0)


@dataclass(frozen=True)
class DiscGeometry:
    """Extents in pixels of the mask's image: rows or columns spanned (max - min + 1)."""

    center: tuple[float, float]  # (x, y) centroid of the disc
    height: int
    width: int
    cup_height: int | None
    cup_width: int | None

    @property
    def diameter(self) -> float:
        """The larger extent: the zones' disc radius is half of it."""
        return float(max(self.height, self.width))

    @property
    def cdr_vertical(self) -> float | None:
        return None if self.cup_height is None else self.cup_height / self.height

    @property
    def cdr_horizontal(self) -> float | None:
        return None if self.cup_width is None else self.cup_width / self.width


def disc_geometry(disc: BoolArray | None, cup: BoolArray | None) -> DiscGeometry | None:
    """Measure the largest connected piece of each mask; None without a disc."""
    disc = _largest_component(disc)
    if disc is None:
        return None
    rows, cols = np.nonzero(disc)
    cup = _largest_component(cup)
    cup_height = cup_width = None
    if cup is not None:
        cup_rows, cup_cols = np.nonzero(cup)
        cup_height = int(np.ptp(cup_rows)) + 1
        cup_width = int(np.ptp(cup_cols)) + 1
    return DiscGeometry(
        center=(float(cols.mean()), float(rows.mean())),
        height=int(np.ptp(rows)) + 1,
        width=int(np.ptp(cols)) + 1,
        cup_height=cup_height,
        cup_width=cup_width,
    )


def _largest_component(mask: BoolArray | None) -> BoolArray | None:
    if mask is None or not mask.any():
        return None
    labels, count = ndimage.label(mask)
    if count == 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def centre_distance(shape: tuple[int, int], center: tuple[float, float]) -> NDArray[np.float32]:
    """Distance of every pixel centre from `center` (x, y)."""
    yy, xx = np.ogrid[0 : shape[0], 0 : shape[1]]
    dx = (xx - center[0]).astype(np.float32)
    dy = (yy - center[1]).astype(np.float32)
    return np.sqrt(dx * dx + dy * dy)


def annulus(distance: NDArray[np.float32], radius: float, radii: tuple[float, float]) -> BoolArray:
    """Pixels between radii[0] and radii[1] disc radii from the centre `distance` is from."""
    return (distance >= radii[0] * radius) & (distance <= radii[1] * radius)
