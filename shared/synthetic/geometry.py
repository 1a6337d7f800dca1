"""Exact rasterisation of polylines, shared by the fundus generator and the isolated shapes.

Coordinates are (x, y) = (column, row) with pixel centres on integers: pixel [r, c] is the
point (c, r). A pixel belongs to a tube of width w round a polyline when its centre lies within
w/2 of the polyline (Euclidean distance to the nearest point of any of its edges), so the
drawn width is exact up to sampling by the pixel grid and no anti-aliasing blurs the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]
BoolArray = NDArray[np.bool_]

# Pixel-edge pairs evaluated per chunk: caps each temporary array at ~4 MB.
_PAIRS_PER_CHUNK = 500_000
# Seeds for the candidate search are spaced 0.5 px, so every point of the polyline is within
# 0.25 px of a seed and every seed within 0.71 px of its pixel: 0.96 px < this margin.
_SEED_STEP = 0.5
_SEED_MARGIN = 1.0


@dataclass(frozen=True)
class PixelDistances:
    """Pixels near a polyline and their exact distance to it."""

    rows: IntArray
    cols: IntArray
    dist: FloatArray


def polyline_length(points: FloatArray) -> float:
    """Sum of the edge lengths of an (N, 2) polyline."""
    return float(np.hypot(*np.diff(points, axis=0).T).sum())


def chord_length(points: FloatArray) -> float:
    """Straight-line distance between the first and the last point."""
    return float(np.hypot(*(points[-1] - points[0])))


def densify(points: FloatArray, max_step: float) -> FloatArray:
    """The same polyline with extra vertices so no edge is longer than max_step."""
    if len(points) < 2:
        return points.copy()
    edges = np.diff(points, axis=0)
    pieces = np.maximum(np.ceil(np.hypot(*edges.T) / max_step).astype(int), 1)
    starts = np.repeat(points[:-1], pieces, axis=0)
    steps = np.repeat(edges / pieces[:, None], pieces, axis=0)
    # Fraction along each edge: 0, 1/n, ..., (n-1)/n for an edge cut into n pieces.
    offsets = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    return np.vstack([starts + steps * offsets[:, None], points[-1:]])


def polyline_pixels(points: FloatArray, max_dist: float, shape: tuple[int, int]) -> PixelDistances:
    """Pixels of an image of `shape` whose centre lies within max_dist of the polyline."""
    empty = PixelDistances(np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0))
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 1:
        pts = np.vstack([pts, pts])
    height, width = shape
    pad = max_dist + _SEED_MARGIN
    x_lo = max(int(np.floor(pts[:, 0].min() - pad)), 0)
    x_hi = min(int(np.ceil(pts[:, 0].max() + pad)), width - 1)
    y_lo = max(int(np.floor(pts[:, 1].min() - pad)), 0)
    y_hi = min(int(np.ceil(pts[:, 1].max() + pad)), height - 1)
    if x_lo > x_hi or y_lo > y_hi:
        return empty
    rows, cols = _candidates(pts, max_dist, (x_lo, y_lo, x_hi, y_hi))
    centres = np.column_stack([cols, rows]).astype(np.float64)
    dist = _distance_to_polyline(centres, pts)
    keep = dist <= max_dist
    return PixelDistances(rows[keep], cols[keep], dist[keep])


def _candidates(
    pts: FloatArray, max_dist: float, box: tuple[int, int, int, int]
) -> tuple[IntArray, IntArray]:
    """A superset of the tube's pixels, found cheaply by a distance transform from seeds."""
    x_lo, y_lo, x_hi, y_hi = box
    seeds = densify(pts, _SEED_STEP)
    # Clipping a seed into the box can only bring it closer to the pixels inside the box.
    sx = np.clip(np.rint(seeds[:, 0]).astype(int), x_lo, x_hi) - x_lo
    sy = np.clip(np.rint(seeds[:, 1]).astype(int), y_lo, y_hi) - y_lo
    free = np.ones((y_hi - y_lo + 1, x_hi - x_lo + 1), dtype=bool)
    free[sy, sx] = False
    near = ndimage.distance_transform_edt(free) <= max_dist + _SEED_MARGIN
    rows, cols = np.nonzero(near)
    return rows + y_lo, cols + x_lo


def _distance_to_polyline(centres: FloatArray, pts: FloatArray) -> FloatArray:
    """Exact distance from each point to the nearest edge of the polyline."""
    starts = pts[:-1]
    edges = pts[1:] - starts
    edge_len2 = np.maximum((edges**2).sum(axis=1), 1e-18)
    out = np.empty(len(centres))
    chunk = max(_PAIRS_PER_CHUNK // len(starts), 1)
    for lo in range(0, len(centres), chunk):
        rel = centres[lo : lo + chunk, None, :] - starts[None, :, :]
        t = np.clip((rel * edges).sum(axis=2) / edge_len2, 0.0, 1.0)
        diff = rel - t[..., None] * edges
        out[lo : lo + chunk] = np.sqrt((diff**2).sum(axis=2).min(axis=1))
    return out


def disc_grid(
    center: tuple[float, float], radius: float, shape: tuple[int, int]
) -> tuple[int, int, FloatArray, FloatArray]:
    """Offsets (dx, dy) of the pixel centres in the clipped box round a circle, with its origin."""
    height, width = shape
    x0 = max(int(np.floor(center[0] - radius)), 0)
    x1 = min(int(np.ceil(center[0] + radius)) + 1, width)
    y0 = max(int(np.floor(center[1] - radius)), 0)
    y1 = min(int(np.ceil(center[1] + radius)) + 1, height)
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    return x0, y0, dx - center[0], dy - center[1]


def mask_bbox(mask: BoolArray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the True pixels, inclusive-exclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        raise ValueError("empty mask has no bounding box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
