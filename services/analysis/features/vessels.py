"""Vessel features of one vessel type: trace the mask once, then measure any region of it.

Everything here is in canonical-grid pixels; `measure` converts to the reported units. A
region (zone B or C) restricts the mask to its pixels and the centreline paths to their runs
inside it ("pieces"); the whole image is one region whose pieces are the segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from services.analysis.features.fractal import box_counting_dimension
from services.analysis.features.skeleton import (
    BoolArray,
    FloatArray,
    IntArray,
    VesselGraph,
    build_graph,
    local_radius,
)

# A piece (segment, or its run inside a zone) is measured when it has more than 15 points,
# as AutoMorph measures segments of more than 15 skeleton pixels.
MIN_POINTS = 16
# Curvature is the turning between chords reaching this many points either side: shorter
# chords see the skeleton's pixel noise (a straight line's squared curvature would be half a
# 60 px circle's), longer ones round off real bends.
CURVATURE_REACH = 8
# Turns flatter than this (1/px, a 100 px radius) have no sign for finding inflections, so
# noise on straight runs does not split them into many sub-curves.
INFLECTION_CURVATURE = 0.01
# A segment's width is measured away from its ends, where branch points and blunt tips add
# or take area: this many of its own (first-estimate) widths are left out at each end.
WIDTH_TRIM = 1.0
MIN_WIDTH_RUN = 3.0  # px of centreline needed for a width
# Arc / chord is not measured on (nearly) closed loops: a chord under this many px.
MIN_CHORD = 2.0
# Thinning bends a centreline's last pixels into a corner of a blunt end (an arc / chord of
# 1.02 for a straight vessel): tortuosity replaces this many vessel radii at each free end
# by the straight continuation of the rest.
TIP_TRIM = 1.5
_TANGENT_POINTS = 5  # the end direction is the chord over this many points
_TIP_SAMPLES = np.array([2.0, 4.0, 8.0, 16.0])  # px from the end where the radius is taken
# Branch directions: the chord from ARM_START_RADII local radii of the branch point (the
# junction bends the centreline nearer than that) to ARM_PX px further along the branch.
ARM_START_RADII = 2.0
ARM_PX = 20.0


@dataclass(frozen=True)
class TracedVessels:
    """A vessel-type mask on the canonical grid and its centreline graph, with per-point data."""

    mask: BoolArray
    graph: VesselGraph
    step: FloatArray  # (N,) edge from each point to the next of its path
    arc_from_start: FloatArray  # (N,) along its path
    extension: FloatArray  # (N,) length past a free end to the vessel's tip, 0 elsewhere
    tip: BoolArray  # (N,) near a free end: left out of tortuosity
    width_area: FloatArray | None  # (N,) pixels nearest each point, 0 at branch points
    width_core: BoolArray | None  # (N,) point counts towards its segment's width
    bifurcation_xy: FloatArray  # (B, 2)
    bifurcation_angle: FloatArray  # (B,) degrees


@dataclass(frozen=True)
class RegionFeatures:
    """Features of one vessel type in one region, canonical px; None where unmeasurable."""

    fractal_dimension: float | None
    vessel_density: float
    average_width: float | None
    distance_tortuosity: float | None
    squared_curvature_tortuosity: float | None  # 1 / px
    tortuosity_density: float | None
    vessel_count: int
    branching_angle: float | None
    piece_widths: FloatArray  # widths of the measured pieces, for CRAE / CRVE


@dataclass(frozen=True)
class _Pieces:
    """Runs of consecutive path points inside a region."""

    points: IntArray  # graph points inside, in path order
    piece: IntArray  # piece of each of them
    first: IntArray  # per piece: position in `points` of its first point
    count: IntArray
    arc: FloatArray

    @property
    def last(self) -> IntArray:
        return self.first + self.count - 1


def trace(mask: BoolArray, *, width_region: BoolArray | None = None) -> TracedVessels:
    """Build the centreline graph, with segment widths valid inside `width_region`.

    Widths cost a nearest-centreline search for every vessel pixel, so only the pixels in
    `width_region` are searched (None: no widths); a segment's width is right where the
    region holds all the pixels round its centreline.
    """
    graph = build_graph(mask)
    step = graph.step_lengths
    arc_from_start = _arc_from_start(graph, step)
    extension = np.zeros(len(step))
    ends = graph.free_end_points()
    # A free end stops about a radius short of the vessel's tip; the radius is measured to
    # the first background pixel's centre, half a pixel past the vessel's edge.
    np.add.at(extension, ends, np.maximum(local_radius(mask, graph.pixel[ends]) - 0.5, 0.0))
    tip = _tip_points(graph, mask, arc_from_start)
    area = core = None
    if width_region is not None:
        area = _voronoi_area(mask & width_region, graph)
        core = _width_core(graph, step, arc_from_start, area)
    bif_xy, bif_angle = _bifurcations(graph, mask, arc_from_start)
    return TracedVessels(
        mask, graph, step, arc_from_start, extension, tip, area, core, bif_xy, bif_angle
    )


def measure_region(traced: TracedVessels, region: BoolArray | None) -> RegionFeatures:
    """All features of `traced` inside `region` (None: the whole grid)."""
    graph = traced.graph
    mask = traced.mask if region is None else traced.mask & region
    inside = np.ones(len(graph.seg), dtype=bool) if region is None else region.flat[graph.pixel]
    pieces = _pieces(graph, traced.step, inside)
    length = pieces.arc.sum() + traced.extension[inside].sum()
    area = int(mask.sum())
    measured = pieces.count >= MIN_POINTS
    widths = _piece_widths(traced, pieces)
    # Shape measures use the pieces without the vessels' tips (see TIP_TRIM).
    shape = _pieces(graph, traced.step, inside & ~traced.tip)
    shaped = shape.count >= MIN_POINTS
    xy = graph.xy[shape.points]
    arc, chord = _tip_extended(traced, shape)
    distance = np.divide(arc, chord, out=np.full(len(chord), np.nan), where=chord >= MIN_CHORD)
    curvature = _curvature(xy, shape)
    bif = traced.bifurcation_angle
    if region is not None and len(bif):
        px = np.rint(traced.bifurcation_xy).astype(np.intp)
        bif = bif[region[px[:, 1], px[:, 0]]]
    return RegionFeatures(
        fractal_dimension=box_counting_dimension(mask),
        vessel_density=area / mask.size,
        average_width=area / length if length > 0 else None,
        distance_tortuosity=_mean(distance[shaped]),
        squared_curvature_tortuosity=_mean(_squared_curvature(xy, shape, curvature)[shaped]),
        tortuosity_density=_mean(_tortuosity_density(xy, shape, curvature)[shaped]),
        vessel_count=int(measured.sum()),
        branching_angle=_mean(bif),
        piece_widths=widths[measured & np.isfinite(widths)],
    )


def _mean(values: FloatArray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _arc_from_start(graph: VesselGraph, step: FloatArray) -> FloatArray:
    before = np.concatenate([[0.0], np.cumsum(step)[:-1]])
    return before - before[graph.start][graph.seg] if len(step) else before


def _pieces(graph: VesselGraph, step: FloatArray, inside: BoolArray) -> _Pieces:
    points = np.flatnonzero(inside)
    # A point starts a new piece unless the point before it on its path is inside too.
    continues = np.zeros(len(inside), dtype=bool)
    continues[1:] = inside[:-1] & (graph.seg[1:] == graph.seg[:-1])
    begins = ~continues[points]
    piece = np.cumsum(begins) - 1
    first = np.flatnonzero(begins)
    count = np.diff(np.append(first, len(points)))
    edge = step[points]
    edge[first + count - 1] = 0.0  # the edge leaving a piece's last point leaves the region
    arc = np.bincount(piece, weights=edge, minlength=len(first))
    return _Pieces(points, piece, first, count, arc)


def _curvature(xy: FloatArray, pieces: _Pieces) -> FloatArray:
    """Signed curvature at each piece point, NaN within CURVATURE_REACH of the piece ends.

    Pieces shorter than twice the reach use the longest reach they allow.
    """
    n = len(xy)
    pos = np.arange(n) - pieces.first[pieces.piece]
    count = pieces.count[pieces.piece]
    reach = np.minimum(CURVATURE_REACH, (count - 1) // 2)
    ok = (reach >= 1) & (pos >= reach) & (pos <= count - 1 - reach)
    kappa = np.full(n, np.nan)
    i = np.flatnonzero(ok)
    a = xy[i] - xy[i - reach[i]]
    b = xy[i + reach[i]] - xy[i]
    turn = np.arctan2(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0], (a * b).sum(axis=1))
    half = (np.hypot(*a.T) + np.hypot(*b.T)) / 2.0
    kappa[i] = np.divide(turn, half, out=np.zeros(len(i)), where=half > 0)
    return kappa


def _squared_curvature(xy: FloatArray, pieces: _Pieces, kappa: FloatArray) -> FloatArray:
    """Integral of curvature squared along each piece, in 1 / px.

    Curvature is only known away from the piece ends, so its mean square there is taken
    as the mean over the whole piece (an arc of a circle gives arc / R^2).
    """
    step = np.zeros(len(xy))
    step[:-1] = np.hypot(*np.diff(xy, axis=0).T)
    step[pieces.last] = 0.0
    ds = step.copy()
    ds[1:] += step[:-1]
    ds /= 2.0
    known = np.isfinite(kappa)
    n = len(pieces.first)
    weight = np.bincount(pieces.piece[known], weights=ds[known], minlength=n)
    total = np.bincount(pieces.piece[known], weights=(kappa[known] ** 2) * ds[known], minlength=n)
    mean = np.divide(total, weight, out=np.full(n, np.nan), where=weight > 0)
    return mean * pieces.arc


def _tortuosity_density(xy: FloatArray, pieces: _Pieces, kappa: FloatArray) -> FloatArray:
    """Grisan et al. (2003): (n - 1) / n + (1 / L) * sum over the n turns of (arc / chord - 1).

    Turns are the runs of constant curvature sign, split at inflection points; flat stretches
    (|curvature| below INFLECTION_CURVATURE) keep the sign before them.
    """
    n_pts = len(xy)
    sign = np.where(np.abs(np.nan_to_num(kappa)) >= INFLECTION_CURVATURE, np.sign(kappa), 0.0)
    idx = np.where(sign != 0, np.arange(n_pts), -1)
    idx[pieces.first] = np.maximum(idx[pieces.first], pieces.first)
    filled = sign[np.maximum.accumulate(idx)] if n_pts else sign
    flip = np.zeros(n_pts, dtype=bool)
    flip[1:] = (filled[1:] * filled[:-1]) < 0
    boundary = flip.copy()
    boundary[pieces.first] = True
    turn = np.cumsum(boundary) - 1
    turn_first = np.flatnonzero(boundary)
    # A turn ends where the next one starts, or at its piece's last point.
    turn_piece = pieces.piece[turn_first]
    turn_end = np.append(turn_first[1:], n_pts)
    last_of_piece = pieces.last[turn_piece]
    turn_end = np.where(turn_end <= last_of_piece, turn_end, last_of_piece)
    step = np.zeros(n_pts)
    step[:-1] = np.hypot(*np.diff(xy, axis=0).T)
    step[pieces.last] = 0.0
    arc = np.bincount(turn, weights=step, minlength=len(turn_first))
    chord = np.hypot(*(xy[turn_end] - xy[turn_first]).T)
    excess = np.divide(arc, chord, out=np.ones(len(arc)), where=chord > 0) - 1.0
    n_pieces = len(pieces.first)
    n_turns = np.bincount(turn_piece, minlength=n_pieces)
    summed = np.bincount(turn_piece, weights=excess, minlength=n_pieces)
    safe_arc = np.where(pieces.arc > 0, pieces.arc, np.nan)
    return (n_turns - 1) / np.maximum(n_turns, 1) + summed / safe_arc


def _voronoi_area(pixels: BoolArray, graph: VesselGraph) -> FloatArray:
    """Count of `pixels` whose nearest skeleton pixel is each point's, 0 at branch points."""
    skel = graph.skeleton_pixels
    if len(skel) == 0:
        return np.zeros(len(graph.pixel))
    width = pixels.shape[1]
    rows, cols = np.nonzero(pixels)
    _, nearest = cKDTree(np.column_stack([skel // width, skel % width])).query(
        np.column_stack([rows, cols])
    )
    per_pixel = np.bincount(nearest, minlength=len(skel)).astype(np.float64)
    area = per_pixel[np.searchsorted(skel, graph.pixel)]
    area[graph.is_joint] = 0.0
    return area


def _point_lengths(step: FloatArray) -> FloatArray:
    """Centreline length each point stands for: half of each edge it touches."""
    before = np.zeros(len(step))
    before[1:] = step[:-1]
    return (before + step) / 2.0


def _width_core(
    graph: VesselGraph, step: FloatArray, arc_from_start: FloatArray, area: FloatArray
) -> BoolArray:
    """Points at least WIDTH_TRIM first-estimate widths away from both ends of their path."""
    length = _point_lengths(step)
    own = ~graph.is_joint
    n_seg = graph.n_segments
    seg_area = np.bincount(graph.seg, weights=area, minlength=n_seg)
    seg_len = np.bincount(graph.seg[own], weights=length[own], minlength=n_seg)
    first_width = np.divide(seg_area, seg_len, out=np.zeros(n_seg), where=seg_len > 0)
    trim = (WIDTH_TRIM * first_width)[graph.seg]
    total = graph.segment_lengths[graph.seg]
    return own & (arc_from_start >= trim) & (total - arc_from_start >= trim)


def _piece_widths(traced: TracedVessels, pieces: _Pieces) -> FloatArray:
    """Area over centreline length of each piece's core points; NaN when too short."""
    n = len(pieces.first)
    if traced.width_area is None or traced.width_core is None:
        return np.full(n, np.nan)
    core = traced.width_core[pieces.points]
    length = _point_lengths(traced.step)[pieces.points]
    area = traced.width_area[pieces.points]
    run = np.bincount(pieces.piece[core], weights=length[core], minlength=n)
    total = np.bincount(pieces.piece[core], weights=area[core], minlength=n)
    return np.divide(total, run, out=np.full(n, np.nan), where=run >= MIN_WIDTH_RUN)


def _bifurcations(
    graph: VesselGraph, mask: BoolArray, arc_from_start: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Branch points where exactly three segments meet, and their branching angles (degrees).

    The branching angle is the angle between the two daughter branches, taken as the
    smallest of the three angles between the branches' directions (the parent runs roughly
    opposite to both daughters). A branch's direction is its chord from ARM_START_RADII
    radii of the branch point (where the junction no longer bends the centreline) to ARM_PX
    further on; a branch point with a shorter branch is left out.
    """
    n_clusters = len(graph.joint_xy)
    if n_clusters == 0:
        return np.empty((0, 2)), np.empty(0)
    seg_len = graph.segment_lengths
    seg, side = np.nonzero(graph.joint >= 0)
    cluster = graph.joint[seg, side]
    joint_point = np.where(side == 0, graph.start[seg], graph.stop[seg] - 1)
    near = ARM_START_RADII * local_radius(mask, graph.pixel[joint_point])
    degree = np.bincount(cluster, minlength=n_clusters)
    short = np.bincount(cluster, weights=seg_len[seg] < near + ARM_PX, minlength=n_clusters)
    keep = ((degree == 3) & (short == 0))[cluster]
    order = np.flatnonzero(keep)[np.argsort(cluster[keep], kind="stable")]
    a = _points_at(graph, arc_from_start, seg[order], side[order], near[order])
    b = _points_at(graph, arc_from_start, seg[order], side[order], near[order] + ARM_PX)
    direction = (graph.xy[b] - graph.xy[a]).reshape(-1, 3, 2)
    unit = direction / np.maximum(np.linalg.norm(direction, axis=2, keepdims=True), 1e-12)
    cosines = np.stack(
        [(unit[:, i] * unit[:, j]).sum(axis=1) for i, j in ((0, 1), (0, 2), (1, 2))], axis=1
    )
    angle = np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).min(axis=1)
    return graph.joint_xy[cluster[order][::3]], angle


def _points_at(
    graph: VesselGraph,
    arc_from_start: FloatArray,
    seg: IntArray,
    side: IntArray,
    distance: FloatArray,
) -> IntArray:
    """The point `distance` along each given segment from its start (side 0) or stop (side 1),
    or the far end of a shorter segment."""
    seg_len = graph.segment_lengths
    start, last = graph.start[seg], graph.stop[seg] - 1
    target = np.where(side == 0, distance, seg_len[seg] - distance)
    # Arc positions increase along the concatenated paths, so one sorted search finds them.
    global_arc = arc_from_start + np.concatenate([[0.0], np.cumsum(seg_len)[:-1]])[graph.seg]
    base = global_arc[start]
    from_start = np.searchsorted(global_arc, base + target, side="left")
    from_stop = np.searchsorted(global_arc, base + target, side="right") - 1
    return np.clip(np.where(side == 0, from_start, from_stop), start, last)


def _tip_points(graph: VesselGraph, mask: BoolArray, arc_from_start: FloatArray) -> BoolArray:
    """Points within TIP_TRIM vessel radii of a free end, the radius being the largest of
    those measured _TIP_SAMPLES px in from the end."""
    tip = np.zeros(len(graph.seg), dtype=bool)
    seg, side = np.nonzero(graph.joint < 0)
    if len(seg) == 0:
        return tip
    k = len(_TIP_SAMPLES)
    samples = _points_at(
        graph,
        arc_from_start,
        np.repeat(seg, k),
        np.repeat(side, k),
        np.tile(_TIP_SAMPLES, len(seg)),
    )
    trim = TIP_TRIM * local_radius(mask, graph.pixel[samples]).reshape(-1, k).max(axis=1)
    from_start = np.full(graph.n_segments, -1.0)
    from_stop = np.full(graph.n_segments, -1.0)
    from_start[seg[side == 0]] = trim[side == 0]
    from_stop[seg[side == 1]] = trim[side == 1]
    to_stop = graph.segment_lengths[graph.seg] - arc_from_start
    return (arc_from_start < from_start[graph.seg]) | (to_stop < from_stop[graph.seg])


def _tip_extended(traced: TracedVessels, pieces: _Pieces) -> tuple[FloatArray, FloatArray]:
    """Arc and chord of each piece with its trimmed tips put back as straight continuations
    of its ends: hooks gone, lengths kept."""
    graph, points = traced.graph, pieces.points
    first, last = points[pieces.first], points[pieces.last]
    seg = graph.seg[first]
    before = np.maximum(first - 1, 0)
    after = np.minimum(last + 1, len(graph.seg) - 1)
    cut_start = (first > graph.start[seg]) & traced.tip[before]
    cut_stop = (last < graph.stop[seg] - 1) & traced.tip[after]
    grow_start = np.where(cut_start, traced.arc_from_start[first], 0.0)
    grow_stop = np.where(cut_stop, graph.segment_lengths[seg] - traced.arc_from_start[last], 0.0)
    reach = np.minimum(_TANGENT_POINTS, pieces.count - 1)
    start = (
        graph.xy[first]
        + _unit(graph.xy[first] - graph.xy[points[pieces.first + reach]]) * (grow_start[:, None])
    )
    stop = (
        graph.xy[last]
        + _unit(graph.xy[last] - graph.xy[points[pieces.last - reach]]) * (grow_stop[:, None])
    )
    return pieces.arc + grow_start + grow_stop, np.hypot(*(stop - start).T)


def _unit(v: FloatArray) -> FloatArray:
    norm = np.hypot(*v.T)[:, None]
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def segment_widths(traced: TracedVessels) -> FloatArray:
    """Width of each segment of `traced.graph` (canonical px), NaN where unmeasurable."""
    inside = np.ones(len(traced.graph.seg), dtype=bool)
    return _piece_widths(traced, _pieces(traced.graph, traced.step, inside))
