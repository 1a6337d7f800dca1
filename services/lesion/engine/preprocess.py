"""The working grid of the lesion network, used identically by training and serving.

The photograph is cut to its field of view's bounding box and resized so the FOV diameter is
`WORK_FOV_DIAMETER` pixels (about half of IDRiD's 4288-px resolution: a microaneurysm of
5-15 px at full size stays 3-8 px wide, where a global resize to 512 would erase it). The
network then runs on that grid in tiles. Its input has six channels:
- each RGB channel standardised with the mean and standard deviation of the FOV pixels, which
  removes most camera exposure differences;
- each RGB channel minus its local background (a Gaussian of sigma FOV radius / 30, computed
  inside the FOV only), standardised the same way: the "Graham" contrast that DR lesion detectors
  commonly use, so small dark and bright spots stand out whatever the illumination gradient
  across the photograph, and the small network need not learn that from 20 images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy import ndimage

from shared.imaging.fov import FovEstimate

WORK_FOV_DIAMETER = 1792
MAX_UPSCALE = 2.0  # small photos are enlarged at most this much (more only costs time)
INPUT_CHANNELS = 6
_MIN_STD = 1e-3
_BACKGROUND_SIGMA_PER_RADIUS = 1 / 30
_BACKGROUND_STEP = 4  # the background is smooth: computed on a grid this many times coarser


@dataclass(frozen=True)
class WorkGrid:
    """Where the working image lies in the input: crop box (input px) and scale."""

    x0: int
    y0: int
    x1: int
    y1: int
    scale: float  # working px per input px
    fov_x: float  # FOV centre and radius in working px
    fov_y: float
    fov_radius: float

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the working image."""
        return (
            max(1, round((self.y1 - self.y0) * self.scale)),
            max(1, round((self.x1 - self.x0) * self.scale)),
        )

    @classmethod
    def around(cls, fov: FovEstimate, width: int, height: int) -> WorkGrid:
        x0 = max(0, math.floor(fov.center_x - fov.radius))
        y0 = max(0, math.floor(fov.center_y - fov.radius))
        x1 = min(width, math.ceil(fov.center_x + fov.radius))
        y1 = min(height, math.ceil(fov.center_y + fov.radius))
        scale = min(MAX_UPSCALE, WORK_FOV_DIAMETER / max(1.0, 2.0 * fov.radius))
        return cls(
            x0=x0,
            y0=y0,
            x1=max(x1, x0 + 1),
            y1=max(y1, y0 + 1),
            scale=scale,
            fov_x=(fov.center_x - x0) * scale,
            fov_y=(fov.center_y - y0) * scale,
            fov_radius=fov.radius * scale,
        )

    def rescaled(self, factor: float) -> WorkGrid:
        """The same crop on a grid `factor` times as fine (a coarser grid gives each network
        tile more of the photograph's context)."""
        return replace(
            self,
            scale=self.scale * factor,
            fov_x=self.fov_x * factor,
            fov_y=self.fov_y * factor,
            fov_radius=self.fov_radius * factor,
        )

    def fov_mask(self) -> np.ndarray:
        """bool H x W of the working grid: inside the FOV circle."""
        height, width = self.shape
        ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(width, dtype=np.float32)[None, :] + 0.5
        return (xs - self.fov_x) ** 2 + (ys - self.fov_y) ** 2 <= self.fov_radius**2

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """A working-grid point (pixel-edge coordinates) in input pixels."""
        return self.x0 + x / self.scale, self.y0 + y / self.scale


def resample(plane: np.ndarray, grid: WorkGrid) -> np.ndarray:
    """Crop an input-size uint8 image (H x W or H x W x 3) and resize it onto the grid.

    Pillow's antialiased bilinear filter averages on a downscale, so a lesion mask becomes
    its area fraction and a microaneurysm a small dark blob rather than a missed sample.
    """
    crop = np.ascontiguousarray(plane[grid.y0 : grid.y1, grid.x0 : grid.x1])
    height, width = grid.shape
    return np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.BILINEAR))


def local_backgrounds(planes: np.ndarray, fov: np.ndarray, sigma: float) -> np.ndarray:
    """C x H x W float32 -> each plane's Gaussian-smoothed background, averaged over FOV pixels
    only (normalised convolution), so the black surround does not darken the rim."""
    height, width = fov.shape
    small = (max(1, width // _BACKGROUND_STEP), max(1, height // _BACKGROUND_STEP))

    def smooth(values: np.ndarray) -> np.ndarray:
        coarse = Image.fromarray(values, mode="F").resize(small, Image.Resampling.BOX)
        return ndimage.gaussian_filter(np.asarray(coarse), sigma / _BACKGROUND_STEP)

    weight = np.maximum(smooth(fov.astype(np.float32)), 1e-6)  # the same for every plane
    backgrounds = np.empty_like(planes)
    for c, plane in enumerate(planes):
        background = Image.fromarray(smooth(plane * fov) / weight, mode="F")
        backgrounds[c] = np.asarray(background.resize((width, height), Image.Resampling.BILINEAR))
    return backgrounds


def _z_scores(plane: np.ndarray, fov: np.ndarray, out: np.ndarray) -> None:
    """`plane` standardised with its FOV pixels' mean and deviation, into `out`."""
    values = plane[fov] if fov.any() else plane.ravel()
    np.subtract(plane, values.mean(), out=out)
    out /= max(float(values.std()), _MIN_STD)


def standardise(rgb: np.ndarray, fov: np.ndarray, fov_radius: float) -> np.ndarray:
    """uint8 H x W x 3 on the grid -> float32 6 x H x W network input, 0 outside the FOV:
    per-channel FOV z-scores, then the z-scores of the same channels' departures from their
    local background."""
    colours = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    departures = colours - local_backgrounds(
        colours, fov, fov_radius * _BACKGROUND_SIGMA_PER_RADIUS
    )
    out = np.empty((INPUT_CHANNELS, *fov.shape), dtype=np.float32)
    for c, plane in enumerate((*colours, *departures)):
        _z_scores(plane, fov, out[c])
    out[:, ~fov] = 0
    return out
