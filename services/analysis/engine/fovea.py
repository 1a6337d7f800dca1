"""Fovea localization from anatomical priors (no fovea labels exist in the training data).

The fovea lies about 2.5 disc diameters temporal to the disc centre and slightly below it
(on average 0.3 DD); temporal is the side of the disc that faces the centre of a
macula- or disc-centred photograph. Within a window around that prior, the fovea is the
darkest smooth spot of the green channel once vessels are removed: the macular pigment and
the avascular zone make it the darkest region of a normal posterior pole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from shared import findings

FOVEA_DISTANCE_DD = 2.5
FOVEA_DROP_DD = 0.3
SEARCH_RADIUS_DD = 0.8
# Darkness below the window's median, relative to its spread, at which confidence is 1.
FULL_CONFIDENCE_CONTRAST = 3.0


@dataclass(frozen=True)
class FoveaEstimate:
    x: float
    y: float
    confidence: float

    def to_model(self) -> findings.Fovea:
        return findings.Fovea(
            center=findings.Point(x=round(self.x, 1), y=round(self.y, 1)),
            confidence=round(self.confidence, 3),
            method="anatomical_prior",
        )


def prior_position(
    disc_xy: tuple[float, float], disc_diameter: float, image_center_x: float
) -> tuple[float, float]:
    """Where the fovea is expected: temporal (towards the image centre) and slightly below."""
    direction = 1.0 if disc_xy[0] < image_center_x else -1.0
    return (
        disc_xy[0] + direction * FOVEA_DISTANCE_DD * disc_diameter,
        disc_xy[1] + FOVEA_DROP_DD * disc_diameter,
    )


def _vessel_free_green(rgb: np.ndarray, vessels: np.ndarray | None, sigma: float) -> np.ndarray:
    """Green channel smoothed with vessels filled by normalized convolution."""
    green = rgb[..., 1].astype(np.float32)
    weight = np.ones_like(green) if vessels is None else (~vessels).astype(np.float32)
    blurred = ndimage.gaussian_filter(green * weight, sigma)
    norm = ndimage.gaussian_filter(weight, sigma)
    return blurred / np.maximum(norm, 1e-3)


def locate_fovea(
    rgb: np.ndarray,
    disc_xy: tuple[float, float],
    disc_diameter: float,
    vessels: np.ndarray | None = None,
) -> FoveaEstimate | None:
    """The fovea of an FOV-cropped image, or None when the expected place is off the image."""
    height, width = rgb.shape[:2]
    prior_x, prior_y = prior_position(disc_xy, disc_diameter, width / 2)
    if not (0 <= prior_x < width and 0 <= prior_y < height):
        return None
    # Work at a scale where a disc diameter is ~40 px: fast, and fine enough for the fovea.
    scale = min(1.0, 40.0 / max(disc_diameter, 1.0))
    small = ndimage.zoom(rgb, (scale, scale, 1), order=1) if scale < 1 else rgb
    small_vessels = None
    if vessels is not None:
        small_vessels = ndimage.zoom(vessels.astype(np.uint8), scale, order=0).astype(bool)
        small_vessels = small_vessels[: small.shape[0], : small.shape[1]]
    dd = disc_diameter * scale
    smooth = _vessel_free_green(small, small_vessels, sigma=0.15 * dd)

    yy, xx = np.mgrid[: smooth.shape[0], : smooth.shape[1]]
    window = (xx - prior_x * scale) ** 2 + (yy - prior_y * scale) ** 2 <= (
        SEARCH_RADIUS_DD * dd
    ) ** 2
    window &= small.max(axis=2) > 10  # inside the field of view
    if window.sum() < 10:
        return None
    values = smooth[window]
    best = int(np.argmin(np.where(window, smooth, np.inf)))
    row, col = divmod(best, smooth.shape[1])
    spread = float(np.percentile(values, 75) - np.percentile(values, 25)) + 1e-3
    contrast = (float(np.median(values)) - float(smooth[row, col])) / spread
    confidence = float(np.clip(contrast / FULL_CONFIDENCE_CONTRAST, 0.0, 1.0))
    return FoveaEstimate(x=col / scale, y=row / scale, confidence=confidence)
