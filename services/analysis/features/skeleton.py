"""Centreline graph of a binary vessel mask: segments with their pixels in vessel order.

The skeleton (scikit-image's thinning) is broken at branch points into segments, and each
segment's pixels are ordered along the vessel by one breadth-first walk over all segments at
once (`scipy.sparse.csgraph`), with no per-pixel Python loop. Thinning artefacts (short spurs
into the corners of blunt vessel ends) are pruned. Each segment's path runs from the branch
point or free end at one side to the one at the other and is smoothed, so that lengths and
curvatures are those of the vessel rather than of its pixel staircase.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from skimage.morphology import skeletonize

BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]

# Half-width (points) of the moving average along a path: wide enough to iron out the pixel
# staircase at any angle (arc / chord of straight vessels within 0.3 % of 1), narrow enough
# to keep real bends (a 100 px wavelength sinusoid's within 0.2 %).
SMOOTH_HALF_WIDTH = 3
# A terminal branch shorter than this many local radii of its branch point is a spur: the
# thinning's fork into the corners of a blunt end reaches about 1.4 radii.
SPUR_RADII = 2.0
# Largest vessel radius looked for around a pixel, canonical px (veins are ~20 px wide at 912).
MAX_RADIUS = 24
_RADIUS_CHUNK = 4096  # pixels per vectorised look-up: caps the temporaries at ~10 MB
_NEAR_RADIUS = 8  # first pass of the look-up: most vessels are narrower than 16 px

_dy, _dx = np.mgrid[-MAX_RADIUS : MAX_RADIUS + 1, -MAX_RADIUS : MAX_RADIUS + 1]
_dist = np.hypot(_dy, _dx).ravel()
_by_distance = np.argsort(_dist, kind="stable")[1:]  # nearest first, the pixel itself skipped
_OFFSETS = np.column_stack([_dy.ravel(), _dx.ravel()])[_by_distance]
_OFFSET_DIST = _dist[_by_distance]
_NEAR_OFFSETS = int(np.searchsorted(_OFFSET_DIST, _NEAR_RADIUS, side="right"))
# 8-neighbour offsets looked at from each pixel so that every pair is seen once.
_FORWARD = ((0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True)
class VesselGraph:
    """Segments as ordered, smoothed point paths, concatenated.

    Point i belongs to segment `seg[i]`; segment s is points `start[s]:stop[s]`. A path's end
    point is its branch point's pixel when the segment meets one (`joint[s, 0|1]`, the id of
    that branch-point cluster), otherwise the segment's last pixel, a free end (-1).
    """

    shape: tuple[int, int]
    skeleton: BoolArray
    skeleton_pixels: IntArray  # flat indices of its pixels, ascending
    xy: FloatArray  # (N, 2) smoothed (x, y) of every path point, canonical px
    pixel: IntArray  # (N,) flat index of the skeleton pixel behind each point
    is_joint: BoolArray  # (N,) the point is a branch-point pixel (shared by segments)
    seg: IntArray  # (N,)
    start: IntArray  # (S,)
    stop: IntArray  # (S,)
    joint: IntArray  # (S, 2)
    joint_xy: FloatArray  # (J, 2) centroid of each branch-point cluster

    @property
    def n_segments(self) -> int:
        return len(self.start)

    @cached_property
    def step_lengths(self) -> FloatArray:
        """Length of the edge from each point to the next one of its path (0 at a path end)."""
        step = np.zeros(len(self.xy))
        if len(self.xy) > 1:
            step[:-1] = np.hypot(*np.diff(self.xy, axis=0).T)
            step[self.stop - 1] = 0.0
        return step

    @cached_property
    def segment_lengths(self) -> FloatArray:
        if self.n_segments == 0:
            return np.empty(0)
        return np.add.reduceat(self.step_lengths, self.start)

    def free_end_points(self) -> IntArray:
        """Points that end a path without a branch point (a one-point path counts twice)."""
        return np.concatenate(
            [self.start[self.joint[:, 0] < 0], self.stop[self.joint[:, 1] < 0] - 1]
        )


def build_graph(mask: BoolArray) -> VesselGraph:
    """Skeletonize `mask`, prune its spurs and split it into ordered segments."""
    skeleton = skeletonize(mask)
    rows, cols = np.nonzero(skeleton)
    graph = _graph_of(skeleton, rows, cols)
    spurs = _spur_pixels(graph, mask)
    if len(spurs) == 0:
        return graph
    skeleton.flat[spurs] = False
    keep = skeleton[rows, cols]
    return _graph_of(skeleton, rows[keep], cols[keep])


def local_radius(mask: BoolArray, flat_pixels: IntArray) -> FloatArray:
    """Distance from each pixel centre to the nearest background pixel centre (capped).

    Looked up in a window of offsets sorted by distance, the near ones first for all pixels
    and the far ones only for those still inside a vessel: far cheaper than a whole-image
    distance transform for the few hundred branch points and vessel ends asked about.
    Outside the image counts as background.
    """
    height, width = mask.shape
    rows, cols = flat_pixels // width, flat_pixels % width
    out = np.full(len(flat_pixels), float(MAX_RADIUS))
    todo = np.arange(len(flat_pixels))
    for ring in (slice(0, _NEAR_OFFSETS), slice(_NEAR_OFFSETS, None)):
        offsets, dist = _OFFSETS[ring], _OFFSET_DIST[ring]
        for lo in range(0, len(todo), _RADIUS_CHUNK):
            chunk = todo[lo : lo + _RADIUS_CHUNK]
            r = rows[chunk, None] + offsets[:, 0]
            c = cols[chunk, None] + offsets[:, 1]
            inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            vessel = mask[np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)] & inside
            hit = ~vessel
            found = hit.any(axis=1)
            out[chunk[found]] = dist[hit.argmax(axis=1)[found]]
        todo = todo[out[todo] == MAX_RADIUS]
    return out


def _spur_pixels(graph: VesselGraph, mask: BoolArray) -> IntArray:
    """Pixels of terminal branches ending within SPUR_RADII local radii of their branch point."""
    free = graph.joint < 0
    terminal = np.flatnonzero(free[:, 0] != free[:, 1])
    if len(terminal) == 0:
        return np.empty(0, dtype=np.intp)
    joint_end = np.where(free[terminal, 0], graph.stop[terminal] - 1, graph.start[terminal])
    radius = local_radius(mask, graph.pixel[joint_end])
    spur = terminal[graph.segment_lengths[terminal] < SPUR_RADII * radius]
    points = np.isin(graph.seg, spur) & ~graph.is_joint
    return graph.pixel[points]


def _graph_of(skeleton: BoolArray, rows: IntArray, cols: IntArray) -> VesselGraph:
    """The graph of `skeleton`, whose pixels are (rows, cols) in row-major order."""
    n = len(rows)
    a, b = _edges(skeleton, rows, cols)
    joint_px = np.bincount(np.concatenate([a, b]), minlength=n) >= 3
    if joint_px.all():
        return _empty_graph(skeleton, rows * skeleton.shape[1] + cols)
    order, seg_of_node = _ordered_nodes(n, a, b, joint_px)
    cluster = _joint_clusters(n, a, b, joint_px)
    head_joint, tail_joint = _end_joints(n, a, b, joint_px, order, seg_of_node)
    # Each path: [branch pixel at its head?] its own pixels [branch pixel at its tail?].
    has_head, has_tail = head_joint >= 0, tail_joint >= 0
    counts = np.bincount(seg_of_node)
    sizes = counts + has_head + has_tail
    stop = np.cumsum(sizes)
    start = stop - sizes
    node = np.empty(int(stop[-1]), dtype=np.intp)
    within = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    node[np.repeat(start + has_head, counts) + within] = order
    node[start[has_head]] = head_joint[has_head]
    node[stop[has_tail] - 1] = tail_joint[has_tail]
    raw = np.column_stack([cols[node], rows[node]]).astype(np.float64)
    joint = np.column_stack(
        [np.where(has_head, cluster[head_joint], -1), np.where(has_tail, cluster[tail_joint], -1)]
    )
    return VesselGraph(
        shape=skeleton.shape,
        skeleton=skeleton,
        skeleton_pixels=rows * skeleton.shape[1] + cols,
        xy=smooth_paths(raw, start, stop),
        pixel=rows[node] * skeleton.shape[1] + cols[node],
        is_joint=joint_px[node],
        seg=np.repeat(np.arange(len(counts)), sizes),
        start=start,
        stop=stop,
        joint=joint,
        joint_xy=_cluster_centroids(rows, cols, cluster, joint_px),
    )


def _empty_graph(skeleton: BoolArray, pixels: IntArray) -> VesselGraph:
    none = np.empty(0, dtype=np.intp)
    return VesselGraph(
        skeleton.shape,
        skeleton,
        pixels,
        np.empty((0, 2)),
        none,
        np.empty(0, dtype=bool),
        none,
        none,
        none,
        np.empty((0, 2), dtype=np.intp),
        np.empty((0, 2)),
    )


def _edges(skeleton: BoolArray, rows: IntArray, cols: IntArray) -> tuple[IntArray, IntArray]:
    """8-connected pairs of skeleton pixels (numbered in row-major order), minus diagonals
    that a 4-connected corner already joins.

    Without that pruning every staircase corner of a thin skeleton would have three
    neighbours and pass for a branch point.
    """
    height, width = skeleton.shape
    flat = rows * width + cols
    src, dst = [], []

    def present(dr: int, dc: int) -> BoolArray:
        r, c = rows + dr, cols + dc
        ok = (r < height) & (c >= 0) & (c < width)
        out = np.zeros(len(rows), dtype=bool)
        out[ok] = skeleton[r[ok], c[ok]]
        return out

    for dr, dc in _FORWARD:
        keep = present(dr, dc)
        if dr and dc:
            keep &= ~present(0, dc) & ~present(dr, 0)
        here = np.flatnonzero(keep)
        src.append(here)
        dst.append(np.searchsorted(flat, flat[here] + dr * width + dc))
    return np.concatenate(src), np.concatenate(dst)


def _ordered_nodes(
    n: int, a: IntArray, b: IntArray, joint_px: BoolArray
) -> tuple[IntArray, IntArray]:
    """Non-branch pixels in path order, segment after segment, and their segment numbers.

    Segments are the connected pieces of the skeleton once branch pixels are taken out; each
    is a simple path (every pixel has at most two neighbours), so a breadth-first walk from
    one of its ends visits it in order. A virtual root joined to one end of every segment
    makes that a single walk.
    """
    inner = ~joint_px[a] & ~joint_px[b]
    sa, sb = a[inner], b[inner]
    _, label = csgraph.connected_components(_adjacency(n, sa, sb), directed=False)
    sa, sb = _cut_loops(n, sa, sb, label, joint_px)
    degree = np.bincount(np.concatenate([sa, sb]), minlength=n)
    nodes = np.flatnonzero(~joint_px)
    ends = nodes[degree[nodes] <= 1]
    _, first = np.unique(label[ends], return_index=True)
    root = n
    walk_graph = _adjacency(
        n + 1, np.concatenate([sa, np.full(len(first), root)]), np.concatenate([sb, ends[first]])
    )
    walk = csgraph.breadth_first_order(walk_graph, root, directed=False)[0][1:]
    walk = walk[np.argsort(label[walk], kind="stable")]
    _, seg_of_node = np.unique(label[walk], return_inverse=True)
    return walk, seg_of_node


def _adjacency(n: int, a: IntArray, b: IntArray) -> sparse.csr_matrix:
    return sparse.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)).tocsr()


def _cut_loops(
    n: int, sa: IntArray, sb: IntArray, label: IntArray, joint_px: BoolArray
) -> tuple[IntArray, IntArray]:
    """Open each closed loop (a segment without an end) at its lowest-numbered pixel."""
    degree = np.bincount(np.concatenate([sa, sb]), minlength=n)
    nodes = np.flatnonzero(~joint_px)
    has_end = np.zeros(label.max() + 1, dtype=bool)
    has_end[label[nodes[degree[nodes] <= 1]]] = True
    loop_nodes = nodes[~has_end[label[nodes]]]
    if len(loop_nodes) == 0:
        return sa, sb
    _, first = np.unique(label[loop_nodes], return_index=True)
    lowest = loop_nodes[first]
    owner = np.where(np.isin(sa, lowest), sa, sb)
    touching = np.flatnonzero(np.isin(owner, lowest))
    _, first_edge = np.unique(owner[touching], return_index=True)
    keep = np.ones(len(sa), dtype=bool)
    keep[touching[first_edge]] = False
    return sa[keep], sb[keep]


def _joint_clusters(n: int, a: IntArray, b: IntArray, joint_px: BoolArray) -> IntArray:
    """Cluster id of each branch pixel (touching branch pixels are one branch point), else -1."""
    both = joint_px[a] & joint_px[b]
    _, label = csgraph.connected_components(_adjacency(n, a[both], b[both]), directed=False)
    out = np.full(n, -1, dtype=np.intp)
    jp = np.flatnonzero(joint_px)
    _, out[jp] = np.unique(label[jp], return_inverse=True)
    return out


def _cluster_centroids(
    rows: IntArray, cols: IntArray, cluster: IntArray, joint_px: BoolArray
) -> FloatArray:
    jp = np.flatnonzero(joint_px)
    if len(jp) == 0:
        return np.empty((0, 2))
    index = np.arange(int(cluster[jp].max()) + 1)
    return np.column_stack(
        [ndimage.mean(cols[jp], cluster[jp], index), ndimage.mean(rows[jp], cluster[jp], index)]
    )


def _end_joints(
    n: int, a: IntArray, b: IntArray, joint_px: BoolArray, order: IntArray, seg: IntArray
) -> tuple[IntArray, IntArray]:
    """The branch pixel next to each segment's first and last pixel, or -1."""
    counts = np.bincount(seg)
    first = np.cumsum(counts) - counts
    head, tail = order[first], order[first + counts - 1]
    mixed = joint_px[a] != joint_px[b]
    j = np.where(joint_px[a], a, b)[mixed]
    s = np.where(joint_px[a], b, a)[mixed]
    # First- and last-written neighbour: a one-pixel segment between two branch points
    # gets one at each end.
    first_written = np.full(n, -1, dtype=np.intp)
    first_written[s[::-1]] = j[::-1]
    last_written = np.full(n, -1, dtype=np.intp)
    last_written[s] = j
    return first_written[head], last_written[tail]


def smooth_paths(xy: FloatArray, start: IntArray, stop: IntArray) -> FloatArray:
    """Centred moving average along each path; the window shrinks at the ends, which stay put."""
    if len(xy) == 0:
        return xy
    idx = np.arange(len(xy))
    seg = np.repeat(np.arange(len(start)), stop - start)
    k = np.minimum(np.minimum(idx - start[seg], stop[seg] - 1 - idx), SMOOTH_HALF_WIDTH)
    csum = np.vstack([np.zeros((1, 2)), np.cumsum(xy, axis=0)])
    return (csum[idx + k + 1] - csum[idx - k]) / (2 * k + 1)[:, None]
