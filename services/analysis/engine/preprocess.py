"""The canonical grid the vessel network sees, used identically by training and serving.

A fundus photograph is cut to the square box around its field-of-view circle and resized so
the FOV diameter is `CANONICAL_SIDE` pixels (576: DRIVE's ~536 px FOV stays at about its
native scale, the resolution its labels were drawn at, and a 2000-px photograph costs the same
as a DRIVE one). Parts of the box outside the photograph are black and outside the FOV mask.
Each RGB channel is then standardised with the mean and standard deviation of the FOV pixels,
which removes most of the camera-to-camera differences in exposure and white balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from shared.imaging.fov import FovEstimate

CANONICAL_SIDE = 576
_MIN_STD = 1e-3  # a flat channel (e.g. a red-free photo's blue) is not amplified to noise


@dataclass(frozen=True)
class CanonicalGrid:
    """Where the canonical square lies in the original image (pixels, box may overhang)."""

    x0: int
    y0: int
    box: int  # side of the square box in original pixels
    width: int  # original image size
    height: int
    side: int = CANONICAL_SIDE

    @property
    def scale(self) -> float:
        """Canonical pixels per original pixel."""
        return self.side / self.box

    @classmethod
    def around(
        cls, fov: FovEstimate, width: int, height: int, side: int = CANONICAL_SIDE
    ) -> CanonicalGrid:
        box = max(8, round(2 * fov.radius))
        x0 = round(fov.center_x - box / 2)
        y0 = round(fov.center_y - box / 2)
        return cls(x0=x0, y0=y0, box=box, width=width, height=height, side=side)

    def overlap(self) -> tuple[slice, slice, slice, slice]:
        """(rows, cols) of the image inside the box, then (rows, cols) of the box they fill."""
        ix0, iy0 = max(0, self.x0), max(0, self.y0)
        ix1 = min(self.width, self.x0 + self.box)
        iy1 = min(self.height, self.y0 + self.box)
        return (
            slice(iy0, iy1),
            slice(ix0, ix1),
            slice(iy0 - self.y0, iy1 - self.y0),
            slice(ix0 - self.x0, ix1 - self.x0),
        )

    def fov_mask(self) -> torch.Tensor:
        """Boolean side x side mask: inside the inscribed FOV circle and inside the photo."""
        centres = (torch.arange(self.side, dtype=torch.float32) + 0.5) / self.scale
        xs = centres + self.x0  # original coordinates of canonical pixel centres
        ys = centres + self.y0
        radius = self.box / 2
        circle = (xs[None, :] - self.x0 - radius) ** 2 + (ys[:, None] - self.y0 - radius) ** 2
        inside = circle <= radius**2
        in_photo = ((ys >= 0) & (ys < self.height))[:, None] & ((xs >= 0) & (xs < self.width))
        return inside & in_photo


def to_canonical(image: np.ndarray, grid: CanonicalGrid) -> torch.Tensor:
    """H x W x C array (uint8 RGB, or float label planes) -> C x side x side float32.

    uint8 input is scaled to 0-1. Downscaling is antialiased (a thin vessel becomes a faint
    line rather than disappearing between samples).
    """
    planes = torch.from_numpy(np.array(image))  # a writable copy: decoded images are read-only
    if planes.ndim == 2:
        planes = planes[:, :, None]
    scale = 255.0 if planes.dtype == torch.uint8 else 1.0
    rows, cols, box_rows, box_cols = grid.overlap()
    boxed = torch.zeros((planes.shape[2], grid.box, grid.box), dtype=torch.float32)
    boxed[:, box_rows, box_cols] = planes[rows, cols].permute(2, 0, 1).float() / scale
    return resize(boxed, grid.side)


def from_canonical(maps: torch.Tensor, grid: CanonicalGrid) -> torch.Tensor:
    """C x side x side -> C x height x width in the original image (0 outside the box)."""
    boxed = resize(maps.float(), grid.box)
    rows, cols, box_rows, box_cols = grid.overlap()
    full = torch.zeros((maps.shape[0], grid.height, grid.width), dtype=torch.float32)
    full[:, rows, cols] = boxed[:, box_rows, box_cols]
    return full


def resize(planes: torch.Tensor, side: int) -> torch.Tensor:
    """C x n x n -> C x side x side, bilinear (antialiased when shrinking)."""
    if planes.shape[-1] == side:
        return planes
    shrink = side < planes.shape[-1]
    return F.interpolate(
        planes[None], size=(side, side), mode="bilinear", align_corners=False, antialias=shrink
    )[0]


def fov_statistics(rgb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (3 x 1 x 1) of the pixels of rgb (3 x H x W) under mask."""
    pixels = rgb[:, mask]
    if pixels.shape[1] < 2:
        raise ValueError("the field of view holds no pixels")
    mean = pixels.mean(dim=1)
    std = pixels.std(dim=1).clamp_min(_MIN_STD)
    return mean[:, None, None], std[:, None, None]


def normalize(
    rgb: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Standardised channels, zero outside the field of view (the network's input)."""
    return (rgb - mean) / std * mask.to(rgb.dtype)


def network_input(image: np.ndarray, fov: FovEstimate) -> tuple[torch.Tensor, CanonicalGrid]:
    """uint8 RGB photograph + its FOV -> (3 x side x side network input, its grid)."""
    height, width = image.shape[:2]
    grid = CanonicalGrid.around(fov, width, height)
    rgb = to_canonical(image, grid)
    mask = grid.fov_mask()
    mean, std = fov_statistics(rgb, mask)
    return normalize(rgb, mask, mean, std), grid
