"""Isolated shapes with known measurements, for the measurement code's unit tests.

Vessels: a straight one of exact width at any angle, a sinusoidal one of known arc/chord, a
circular arc of known curvature. Fractals for box counting: a filled square (D = 2), a line
(D = 1), the Sierpinski carpet (log 8 / log 3) and triangle (log 3 / log 2), the Koch curve
(log 4 / log 3). Masks are exact (no anti-aliasing); (x, y) = (column, row), pixel centres on
integers; angles are counter-clockwise as seen on screen (y points down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from shared.synthetic.geometry import BoolArray, FloatArray, densify, polyline_pixels

SQUARE_DIMENSION = 2.0
LINE_DIMENSION = 1.0
SIERPINSKI_CARPET_DIMENSION = math.log(8) / math.log(3)
SIERPINSKI_TRIANGLE_DIMENSION = math.log(3) / math.log(2)
KOCH_DIMENSION = math.log(4) / math.log(3)

_CURVE_STEP_PX = 0.25  # centreline sampling of curved shapes: far finer than a pixel
_SNAP_DECIMALS = 9  # rounds away float noise so grid-aligned edges give exact counts


@dataclass(frozen=True)
class VesselShape:
    """A drawn vessel and its truth. arc_length is of the ideal curve (not the sampling)."""

    mask: BoolArray
    centreline: FloatArray  # (N, 2) ordered (x, y)
    width_px: float
    arc_length: float
    chord_length: float

    @property
    def distance_tortuosity(self) -> float:
        return self.arc_length / self.chord_length


@dataclass(frozen=True)
class ArcShape:
    """A circular arc drawn as a tube; its curvature is 1 / radius everywhere."""

    mask: BoolArray
    centreline: FloatArray
    center: tuple[float, float]
    radius_px: float
    width_px: float
    arc_length: float

    @property
    def curvature(self) -> float:
        return 1.0 / self.radius_px


@dataclass(frozen=True)
class KnownFractal:
    name: str
    mask: BoolArray
    dimension: float


def _unit(angle_deg: float) -> FloatArray:
    """Direction of `angle_deg` on screen (y down), snapped so 0/90/180/270 are exact."""
    a = math.radians(angle_deg)
    return np.round(np.array([math.cos(a), -math.sin(a)]), 15)


def straight_vessel(
    width_px: float,
    angle_deg: float,
    *,
    size: int = 256,
    length_px: float | None = None,
    center: tuple[float, float] | None = None,
) -> VesselShape:
    """A flat-ended straight vessel: pixels with -w/2 <= across < w/2 and -L/2 <= along < L/2.

    The half-open bands hold exactly w pixels per column (integer w, horizontal vessel)
    wherever the centre falls, and about w * L pixels at a generic angle. At a slope of
    small integers (45 degrees, atan 1/2) the pixel centres sit on few parallel lines and the
    drawn width is quantised (multiples of 0.71 px at 45 degrees): a property of any raster.
    """
    length = float(round(0.6 * size)) if length_px is None else length_px
    cx, cy = ((size - 1) / 2.0, (size - 1) / 2.0) if center is None else center
    u = _unit(angle_deg)
    n = np.array([-u[1], u[0]])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    along = np.round((xx - cx) * u[0] + (yy - cy) * u[1], _SNAP_DECIMALS)
    across = np.round((xx - cx) * n[0] + (yy - cy) * n[1], _SNAP_DECIMALS)
    mask = (-width_px / 2 <= across) & (across < width_px / 2)
    mask &= (-length / 2 <= along) & (along < length / 2)
    ends = np.array([[cx, cy]]) + np.outer([-length / 2, length / 2], u)
    return VesselShape(mask, ends, width_px, length, length)


def sinusoid_arc_length(amplitude: float, wavelength: float, run: float) -> float:
    """Exact length of y = A sin(2 pi x / wavelength) for x in [0, run].

    With k = 2 pi / wavelength and c = A k: the integrand sqrt(1 + c^2 cos^2 kx) equals
    sqrt(1 + c^2) sqrt(1 - m sin^2 kx), m = c^2 / (1 + c^2): an incomplete elliptic integral.
    """
    k = 2.0 * math.pi / wavelength
    c2 = (amplitude * k) ** 2
    return math.sqrt(1.0 + c2) / k * float(special.ellipeinc(k * run, c2 / (1.0 + c2)))


def sinusoidal_vessel(
    width_px: float,
    amplitude_px: float,
    wavelength_px: float,
    *,
    periods: float = 3.0,
    angle_deg: float = 0.0,
    size: int | None = None,
) -> VesselShape:
    """A vessel along y = A sin(2 pi x / wavelength) over `periods`, rotated, canvas-centred."""
    run = periods * wavelength_px
    if size is None:
        size = math.ceil(run + 2 * amplitude_px + width_px) + 16
    x = np.linspace(0.0, run, math.ceil(run / _CURVE_STEP_PX) + 1)
    y = amplitude_px * np.sin(2.0 * math.pi * x / wavelength_px)
    u = _unit(angle_deg)
    n = np.array([-u[1], u[0]])
    # Centre the run on the canvas; "up" on screen is -y, so the wave's y maps onto -n.
    local = np.column_stack([x - run / 2.0, y])
    centre = np.array([(size - 1) / 2.0, (size - 1) / 2.0])
    points = centre + local[:, :1] * u - local[:, 1:] * n
    mask = _tube_mask(points, width_px, size)
    chord = float(np.hypot(run, y[-1]))
    return VesselShape(
        mask, points, width_px, sinusoid_arc_length(amplitude_px, wavelength_px, run), chord
    )


def circle_arc(
    radius_px: float,
    *,
    width_px: float = 1.0,
    start_deg: float = 0.0,
    end_deg: float = 360.0,
    size: int | None = None,
) -> ArcShape:
    """A tube of width_px along a circle of radius_px from start_deg to end_deg, canvas-centred."""
    if size is None:
        size = math.ceil(2 * radius_px + width_px) + 16
    sweep = math.radians(end_deg - start_deg)
    n = math.ceil(abs(sweep) * radius_px / _CURVE_STEP_PX) + 1
    angles = math.radians(start_deg) + np.linspace(0.0, sweep, n)
    c = ((size - 1) / 2.0, (size - 1) / 2.0)
    points = np.column_stack([c[0] + radius_px * np.cos(angles), c[1] - radius_px * np.sin(angles)])
    mask = _tube_mask(points, width_px, size)
    return ArcShape(mask, points, c, radius_px, width_px, abs(sweep) * radius_px)


def _tube_mask(points: FloatArray, width_px: float, size: int) -> BoolArray:
    mask = np.zeros((size, size), dtype=bool)
    px = polyline_pixels(points, width_px / 2.0, (size, size))
    mask[px.rows, px.cols] = True
    return mask


def filled_square(size: int = 512) -> KnownFractal:
    return KnownFractal("filled_square", np.ones((size, size), dtype=bool), SQUARE_DIMENSION)


def straight_line(size: int = 512) -> KnownFractal:
    """A one-pixel horizontal line across the middle of the canvas."""
    mask = np.zeros((size, size), dtype=bool)
    mask[size // 2, :] = True
    return KnownFractal("straight_line", mask, LINE_DIMENSION)


def sierpinski_carpet(level: int = 6) -> KnownFractal:
    """3**level px square; a pixel is empty when some base-3 digit pair of (row, col) is (1, 1).

    Filled pixels: 8**level.
    """
    idx = np.arange(3**level)
    rows, cols = idx[:, None], idx[None, :]
    hole = np.zeros((3**level, 3**level), dtype=bool)
    for digit in range(level):
        scale = 3**digit
        hole |= ((rows // scale) % 3 == 1) & ((cols // scale) % 3 == 1)
    return KnownFractal(f"sierpinski_carpet_{level}", ~hole, SIERPINSKI_CARPET_DIMENSION)


def sierpinski_triangle(level: int = 9) -> KnownFractal:
    """2**level px square: Pascal's triangle mod 2 (C(r, c) odd iff c's bits are in r's).

    Filled pixels: 3**level.
    """
    idx = np.arange(2**level)
    mask = (idx[:, None] & idx[None, :]) == idx[None, :]
    return KnownFractal(f"sierpinski_triangle_{level}", mask, SIERPINSKI_TRIANGLE_DIMENSION)


def koch_curve(level: int = 5, size: int = 729) -> KnownFractal:
    """The Koch curve spanning the canvas width, rasterised one pixel thick (8-connected)."""
    points = np.array([[0.0, 0.0], [1.0, 0.0]])
    # Rotation by -60 degrees: with y pointing down, the bumps point up the screen.
    turn = np.array([[0.5, math.sqrt(3) / 2], [-math.sqrt(3) / 2, 0.5]])
    for _ in range(level):
        a, d = points[:-1], np.diff(points, axis=0) / 3.0
        peak = a + d + d @ turn.T
        points = np.vstack(
            [np.stack([a, a + d, peak, a + 2 * d], axis=1).reshape(-1, 2), points[-1:]]
        )
    scale = size - 1
    xy = points * scale + np.array([0.0, (size - 1) / 2.0 + scale * math.sqrt(3) / 12])
    dense = densify(xy, _CURVE_STEP_PX)
    mask = np.zeros((size, size), dtype=bool)
    mask[np.rint(dense[:, 1]).astype(int), np.rint(dense[:, 0]).astype(int)] = True
    return KnownFractal(f"koch_curve_{level}", mask, KOCH_DIMENSION)
