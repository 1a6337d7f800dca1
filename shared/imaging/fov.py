"""Field-of-view (FOV) detection: the bright, roughly circular retinal disc of a fundus photo.

Pure numpy/scipy and vectorised; it works on a copy of about 512 px on the long side, so a
4288x2848 photograph takes a few milliseconds.

Algorithm:
1. Brightness = max(R, G, B) (the red channel for fundus photos, still meaningful for
   greyscale or red-free images), sampled every `step` pixels and smoothed (Gaussian, 1 px).
2. Levels: the retina level is the median of pixels clearly above the darkest corner; corners
   darker than half of it are background (corners lie outside the circle unless the photo
   is already cropped). Nothing above black -> refused. No dark corner (an already-cropped
   or flat image) -> the FOV is the whole image.
3. Mask = brightness above 12 % of the way from background to retina (and above the
   background's 95th percentile + 4: STARE's backgrounds are noisy grey, not black); the
   largest connected component with its holes filled. Below 5 % of the frame -> refused.
   The low threshold keeps a vignetted, nearly black periphery inside the FOV.
4. Circle: least-squares (Kasa) fit to the mask's sub-pixel edge points, refitted after
   trimming outliers (the camera's notch, labels). Then refined: along 720 rays across that
   circle the edge is put half-way between the levels just inside and just outside (a dim
   halo outside the FOV or a dark periphery inside no longer moves it), and the circle is
   fitted again. Edges on the image border are never edge points and rays leaving the image
   are dropped, so a circle clipped at the top and bottom is fitted from its side arcs: the
   horizontal extent decides the radius.
5. Crop = the circle's bounding box united with the mask's (never cut retina), clamped to
   the image; coverage = fraction of the crop inside the mask.

Coordinates are continuous pixel coordinates of the full image: pixel (i, j) spans
[j, j+1) x [i, i+1), so a circle filling a W-wide image has centre_x = W/2 and radius = W/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from shared.findings import FieldOfView
from shared.imaging.errors import ImageRejected, RejectCode

WORK_SIDE = 512  # long side of the working copy
DARK_PEAK = 20.0  # 99.5th-percentile brightness below this: the image is black
MIN_CONTRAST = 12.0  # retina pixels are at least this much brighter than the background
BORDER_RATIO = 0.5  # background below this fraction of the retina level: a dark border exists
THRESHOLD_FRACTION = 0.12  # where between background and retina the FOV edge is put
NOISE_MARGIN = 4.0  # above the 95th percentile of the background
MIN_FOV_FRACTION = 0.05  # a smaller bright area is not a fundus photograph
MIN_EDGE_POINTS = 12
RAY_COUNT = 720  # rays for the local edge refinement
RAY_WINDOW = 0.1  # each ray spans the first radius ±10 %
RAY_SAMPLES = 41
_TRIM_ROUNDS = 4


@dataclass(frozen=True)
class FovEstimate:
    """The detected field of view, in original-image pixels."""

    center_x: float
    center_y: float
    radius: float
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 (end exclusive)
    coverage: float  # fraction of the crop box inside the FOV

    def to_model(self) -> FieldOfView:
        x0, y0, x1, y1 = self.crop
        return FieldOfView(
            center_x=round(self.center_x, 2),
            center_y=round(self.center_y, 2),
            radius=round(self.radius, 2),
            crop_x0=x0,
            crop_y0=y0,
            crop_x1=x1,
            crop_y1=y1,
            coverage=round(self.coverage, 4),
        )


@dataclass(frozen=True)
class _Grid:
    """Maps working-copy indices to full-image coordinates (sample centres)."""

    step: int
    offset: int
    width: int
    height: int

    def to_full(self, index: np.ndarray | float) -> np.ndarray | float:
        return index * self.step + self.offset + 0.5


def detect_field_of_view(rgb: np.ndarray) -> FovEstimate:
    """Locate the FOV of an H x W x 3 uint8 image or raise ImageRejected("no_field_of_view")."""
    height, width = rgb.shape[:2]
    step = max(1, math.ceil(max(height, width) / WORK_SIDE))
    grid = _Grid(step=step, offset=step // 2, width=width, height=height)
    brightness = _brightness(rgb, grid)
    threshold = _threshold(brightness)
    if threshold is None:
        return whole_image_fov(width, height)
    mask = _fov_mask(brightness, threshold)
    cx, cy, radius = _fit_circle(brightness, mask, threshold)
    cx, cy, radius = float(grid.to_full(cx)), float(grid.to_full(cy)), radius * grid.step
    crop = _crop_box(cx, cy, radius, mask, grid)
    return FovEstimate(cx, cy, radius, crop, _coverage(mask, crop, grid))


def whole_image_fov(width: int, height: int) -> FovEstimate:
    """No dark border: everything is retina, the FOV circle is at least the circumscribed one."""
    return FovEstimate(
        width / 2, height / 2, math.hypot(width, height) / 2, (0, 0, width, height), 1.0
    )


def _brightness(rgb: np.ndarray, grid: _Grid) -> np.ndarray:
    # Strided sampling is a view: only the ~512 px copy is ever materialised.
    sampled = rgb[grid.offset :: grid.step, grid.offset :: grid.step].max(axis=2)
    return ndimage.gaussian_filter(sampled.astype(np.float32), sigma=1.0)


def _threshold(brightness: np.ndarray) -> float | None:
    """Brightness separating the FOV from its dark border; None when there is no border."""
    if float(np.percentile(brightness, 99.5)) < DARK_PEAK:
        raise ImageRejected(
            RejectCode.NO_FIELD_OF_VIEW, "the image is black: no retinal field of view"
        )
    corners = _corners(brightness)
    darkest = min(float(np.median(corner)) for corner in corners)
    bright = brightness[brightness > darkest + MIN_CONTRAST]
    if bright.size < MIN_FOV_FRACTION * brightness.size:
        if darkest < DARK_PEAK:
            raise ImageRejected(
                RejectCode.NO_FIELD_OF_VIEW,
                f"the bright area covers under {MIN_FOV_FRACTION:.0%} of the image: "
                "no retinal field of view",
            )
        return None  # uniformly bright: no border to find
    retina = float(np.median(bright))
    # Corners inside the retina (an already-cropped photo) say nothing about the background.
    dark = [corner.ravel() for corner in corners if np.median(corner) < BORDER_RATIO * retina]
    if not dark:
        return None
    background = np.concatenate(dark)
    level = float(np.median(background))
    noise_ceiling = float(np.percentile(background, 95)) + NOISE_MARGIN
    threshold = max(noise_ceiling, level + THRESHOLD_FRACTION * (retina - level))
    return min(threshold, (level + retina) / 2)


def _corners(brightness: np.ndarray) -> tuple[np.ndarray, ...]:
    # 1/16 of the short side: outside even a circle that touches all four sides.
    size = max(2, min(brightness.shape) // 16)
    return (
        brightness[:size, :size],
        brightness[:size, -size:],
        brightness[-size:, :size],
        brightness[-size:, -size:],
    )


def _fov_mask(brightness: np.ndarray, threshold: float) -> np.ndarray:
    """Largest bright connected component, holes (dark vessels, lesions) filled."""
    labels, count = ndimage.label(brightness > threshold)
    if count == 0:
        raise ImageRejected(RejectCode.NO_FIELD_OF_VIEW, "no bright region: no field of view")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = ndimage.binary_fill_holes(labels == int(sizes.argmax()))
    if mask.mean() < MIN_FOV_FRACTION:
        raise ImageRejected(
            RejectCode.NO_FIELD_OF_VIEW,
            f"the largest bright region covers {mask.mean():.1%} of the image: "
            "no retinal field of view",
        )
    return mask


def _fit_circle(
    brightness: np.ndarray, mask: np.ndarray, threshold: float
) -> tuple[float, float, float]:
    """Circle (cx, cy, r) in working-copy index coordinates."""
    initial = _robust_fit(*_mask_edges(brightness, mask, threshold))
    if initial is None or not _plausible(initial, brightness.shape):
        return _bbox_circle(mask)
    refined = _robust_fit(*_ray_edges(brightness, initial))
    if refined is None or abs(refined[2] - initial[2]) > RAY_WINDOW * initial[2]:
        return initial
    return refined


def _mask_edges(
    brightness: np.ndarray, mask: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel threshold crossings between neighbours on the mask's edge.

    Only pairs of pixels inside the image count, so where the frame clips the circle there
    are no edge points.
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for axis in (1, 0):
        first = [slice(None), slice(None)]
        second = [slice(None), slice(None)]
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        rows, cols = np.nonzero(mask[tuple(first)] != mask[tuple(second)])
        a = brightness[tuple(first)][rows, cols]
        b = brightness[tuple(second)][rows, cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.clip(np.nan_to_num((threshold - a) / (b - a), nan=0.5), 0.0, 1.0)
        xs.append(cols + frac if axis == 1 else cols.astype(np.float64))
        ys.append(rows.astype(np.float64) if axis == 1 else rows + frac)
    return np.concatenate(xs), np.concatenate(ys)


def _ray_edges(
    brightness: np.ndarray, circle: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Edge points at the local half-way level along rays across the first circle.

    A global threshold sits too low for a halo just outside the FOV and too high for a
    vignetted periphery; half-way between the levels just inside and just outside, ray by
    ray, is at the step itself. Rays that leave the image (a clipped circle) or cross no
    step are skipped.
    """
    cx, cy, radius = circle
    angles = np.linspace(0.0, 2 * np.pi, RAY_COUNT, endpoint=False)
    radii = radius * (1.0 + np.linspace(-RAY_WINDOW, RAY_WINDOW, RAY_SAMPLES))
    xs = cx + np.cos(angles)[:, np.newaxis] * radii
    ys = cy + np.sin(angles)[:, np.newaxis] * radii
    height, width = brightness.shape
    on_image = ((xs >= 0) & (xs <= width - 1) & (ys >= 0) & (ys <= height - 1)).all(axis=1)
    profiles = ndimage.map_coordinates(brightness, [ys, xs], order=1)
    band = RAY_SAMPLES // 3
    inside = np.median(profiles[:, :band], axis=1)
    outside = np.median(profiles[:, -band:], axis=1)
    half = (inside + outside) / 2
    above = profiles >= half[:, np.newaxis]
    # Outermost sample still above half-way: the step lies between it and the next one.
    last = RAY_SAMPLES - 1 - np.argmax(above[:, ::-1], axis=1)
    usable = on_image & (inside - outside > MIN_CONTRAST) & above.any(axis=1)
    usable &= last < RAY_SAMPLES - 1
    rows = np.flatnonzero(usable)
    index = last[rows]
    high, low = profiles[rows, index], profiles[rows, index + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.clip(np.nan_to_num((high - half[rows]) / (high - low), nan=0.5), 0.0, 1.0)
    edge = radii[index] + frac * (radii[index + 1] - radii[index])
    return cx + np.cos(angles[rows]) * edge, cy + np.sin(angles[rows]) * edge


def _robust_fit(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float] | None:
    """Kasa fit, refitted without outliers (notch, straight cuts, labels touching the FOV)."""
    keep = np.ones(xs.size, dtype=bool)
    circle = None
    for _ in range(_TRIM_ROUNDS):
        if keep.sum() < MIN_EDGE_POINTS:
            return circle
        circle = _kasa_fit(xs[keep], ys[keep])
        if circle is None:
            return None
        residual = np.abs(np.hypot(xs - circle[0], ys - circle[1]) - circle[2])
        spread = 1.4826 * float(np.median(residual[keep]))
        keep = residual <= max(3.0 * spread, 1.5)
    return circle


def _kasa_fit(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float] | None:
    """Algebraic circle fit: x² + y² = 2a·x + 2b·y + c, solved by least squares."""
    mx, my = float(xs.mean()), float(ys.mean())  # centre the data for conditioning
    u, v = xs - mx, ys - my
    design = np.column_stack([2 * u, 2 * v, np.ones_like(u)])
    solution, *_ = np.linalg.lstsq(design, u * u + v * v, rcond=None)
    a, b, c = (float(value) for value in solution)
    r_squared = c + a * a + b * b
    if not math.isfinite(r_squared) or r_squared <= 0:
        return None
    return a + mx, b + my, math.sqrt(r_squared)


def _plausible(circle: tuple[float, float, float], shape: tuple[int, ...]) -> bool:
    """Reject fits to a nearly straight edge (huge radius) or far outside the frame."""
    cx, cy, radius = circle
    height, width = shape[:2]
    longest = max(height, width)
    inside = -0.5 * longest <= cx <= 1.5 * width and -0.5 * longest <= cy <= 1.5 * height
    return inside and 0.05 * longest <= radius <= 2.0 * longest


def _bbox_circle(mask: np.ndarray) -> tuple[float, float, float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    width, height = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
    return (cols[0] + cols[-1]) / 2, (rows[0] + rows[-1]) / 2, max(width, height) / 2


def _mask_box(mask: np.ndarray, grid: _Grid) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0 = max(0, cols[0] * grid.step)
    y0 = max(0, rows[0] * grid.step)
    x1 = min(grid.width, (cols[-1] + 1) * grid.step)
    y1 = min(grid.height, (rows[-1] + 1) * grid.step)
    return int(x0), int(y0), int(x1), int(y1)


def _crop_box(
    cx: float, cy: float, radius: float, mask: np.ndarray, grid: _Grid
) -> tuple[int, int, int, int]:
    """Circle box united with the mask box (never cut retina), clamped to the image."""
    mx0, my0, mx1, my1 = _mask_box(mask, grid)
    x0 = max(0, min(mx0, math.floor(cx - radius)))
    y0 = max(0, min(my0, math.floor(cy - radius)))
    x1 = min(grid.width, max(mx1, math.ceil(cx + radius)))
    y1 = min(grid.height, max(my1, math.ceil(cy + radius)))
    return x0, y0, x1, y1


def _coverage(mask: np.ndarray, crop: tuple[int, int, int, int], grid: _Grid) -> float:
    x0, y0, x1, y1 = crop
    # Working-copy samples whose centres fall inside the crop box.
    c0 = max(0, math.ceil((x0 - grid.offset - 0.5) / grid.step))
    c1 = max(c0 + 1, math.floor((x1 - grid.offset - 0.5) / grid.step) + 1)
    r0 = max(0, math.ceil((y0 - grid.offset - 0.5) / grid.step))
    r1 = max(r0 + 1, math.floor((y1 - grid.offset - 0.5) / grid.step) + 1)
    window = mask[r0:r1, c0:c1]
    return float(window.mean()) if window.size else 0.0
