"""The vessel tree: segments between bifurcations, grown from the disc round the macula.

Each segment is an ordered polyline (1 px steps) whose base curve turns at a constant rate and
wiggles sideways with a sine of the spec's tortuosity amplitude and wavelength. The polyline is
the truth: it is what gets drawn, and its length, chord and widths are what is reported.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shared.synthetic.anatomy import Layout
from shared.synthetic.geometry import FloatArray, chord_length, polyline_length
from shared.synthetic.spec import SyntheticFundusSpec

VesselKind = Literal["artery", "vein"]

_STEP_PX = 1.0
# Headings (degrees from the temporal direction, + = inferior) of the trunks in the order they
# are added, with the arcade turn sign: the first two are the superior and inferior temporal
# arcades, which bend temporally round the macula; the rest fan out nasally.
_TRUNKS: tuple[tuple[float, int], ...] = (
    (-62.0, 1),
    (62.0, -1),
    (-140.0, 0),
    (140.0, 0),
    (180.0, 0),
    (-105.0, 0),
)
_ARCADE_TURN = 0.003  # rad/px: a ~330 px radius keeps the arcades ~2 DD above/below the fovea
_NASAL_WIDTH = 0.8  # nasal trunks are thinner than the arcades
_KIND_SPLIT_DEG = 6.0  # artery and vein of a pair leave the disc a little apart
_FOVEA_CLEAR_DD = 0.5  # vessels stop this far from the foveal centre (avascular zone)
_FOV_MARGIN_PX = 3.0
_MIN_SEGMENT_PX = 6.0


@dataclass(frozen=True)
class VesselSegment:
    """One vessel segment (disc or bifurcation to bifurcation or end), with its true geometry."""

    index: int
    kind: VesselKind
    generation: int  # 0 for a trunk leaving the disc, +1 per bifurcation
    width_px: float  # constant along the segment; the drawn tube is pixels within width/2
    points: FloatArray  # (N, 2) ordered (x, y) centreline, the exact polyline drawn
    arc_length: float  # length of that polyline
    chord_length: float  # first to last point
    parent: int | None
    children: tuple[int, ...] = ()

    @property
    def distance_tortuosity(self) -> float:
        return self.arc_length / self.chord_length


@dataclass(frozen=True)
class _Sprout:
    """A segment still to be grown."""

    start: FloatArray
    heading: float  # radians from the temporal direction, + = inferior
    turn: float  # rad/px
    width: float
    length: float
    generation: int
    kind: VesselKind
    parent: int | None


@dataclass
class _Grown:
    sprout: _Sprout
    points: FloatArray
    children: list[int] = field(default_factory=list)


def grow_vessel_tree(
    spec: SyntheticFundusSpec, layout: Layout, rng: np.random.Generator
) -> list[VesselSegment]:
    """All segments, breadth first (so a parent always precedes its children)."""
    queue = deque(_trunks(spec, layout, rng))
    grown: list[_Grown] = []
    while queue:
        sprout = queue.popleft()
        points, complete = _grow(sprout, spec, layout, rng)
        if points is None:
            continue
        index = len(grown)
        grown.append(_Grown(sprout, points))
        if sprout.parent is not None:
            grown[sprout.parent].children.append(index)
        if complete and sprout.generation < spec.branching_depth:
            queue.extend(_bifurcate(sprout, index, points, spec, rng))
    return [
        VesselSegment(
            index=i,
            kind=g.sprout.kind,
            generation=g.sprout.generation,
            width_px=g.sprout.width,
            points=g.points,
            arc_length=polyline_length(g.points),
            chord_length=chord_length(g.points),
            parent=g.sprout.parent,
            children=tuple(g.children),
        )
        for i, g in enumerate(grown)
    ]


def _trunks(spec: SyntheticFundusSpec, layout: Layout, rng: np.random.Generator) -> list[_Sprout]:
    sprouts = []
    length = spec.segment_length_dd * layout.disc_diameter
    for heading_deg, arcade in _TRUNKS[: spec.vessels_per_kind]:
        scale = 1.0 if arcade else _NASAL_WIDTH
        for kind, split, root in (
            ("artery", -_KIND_SPLIT_DEG, spec.artery_root_width_px),
            ("vein", _KIND_SPLIT_DEG, spec.vein_root_width_px),
        ):
            heading = math.radians(heading_deg + split + rng.uniform(-5.0, 5.0))
            turn = arcade * _ARCADE_TURN if arcade else rng.uniform(-0.001, 0.001)
            # Vessels emerge from the central part of the disc, not its very centre.
            start = np.array(layout.disc_center) + 0.25 * layout.disc_radius * _direction(
                heading, layout.temporal_sign
            )
            sprouts.append(
                _Sprout(
                    start=start,
                    heading=heading,
                    turn=turn,
                    width=root * scale,
                    length=length * rng.uniform(0.85, 1.15),
                    generation=0,
                    kind=kind,
                    parent=None,
                )
            )
    return sprouts


def _direction(heading: float, temporal_sign: int) -> FloatArray:
    return np.array([temporal_sign * math.cos(heading), math.sin(heading)])


def _grow(
    sprout: _Sprout, spec: SyntheticFundusSpec, layout: Layout, rng: np.random.Generator
) -> tuple[FloatArray | None, bool]:
    """The segment's polyline, cut where it would leave the FOV or enter the foveal zone.

    Returns (None, False) when too little is left to draw, and complete=False when cut.
    """
    s = np.arange(0.0, sprout.length + _STEP_PX / 2, _STEP_PX)
    theta = sprout.heading + sprout.turn * s
    # Base curve: each step follows the heading at its midpoint (the chord of a constant turn).
    mid_theta = sprout.heading + sprout.turn * (s[1:] - _STEP_PX / 2)
    steps = _STEP_PX * np.column_stack(
        [layout.temporal_sign * np.cos(mid_theta), np.sin(mid_theta)]
    )
    base = sprout.start + np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    amplitude = spec.tortuosity_amplitude_px * rng.uniform(0.5, 1.5) * rng.choice([-1.0, 1.0])
    wavelength = spec.tortuosity_wavelength_px * rng.uniform(0.7, 1.3)
    # The wiggle is zero at s = 0, so a child starts exactly where its parent ended.
    offset = amplitude * np.sin(2.0 * np.pi * s / wavelength)
    normal = np.column_stack([-layout.temporal_sign * np.sin(theta), np.cos(theta)])
    points = base + offset[:, None] * normal
    allowed = _allowed(points, sprout.width, layout)
    n_ok = len(points) if allowed.all() else int(np.argmin(allowed))
    points = points[:n_ok]
    if n_ok < 2 or polyline_length(points) < _MIN_SEGMENT_PX:
        return None, False
    return points, n_ok == len(s)


def _allowed(points: FloatArray, width: float, layout: Layout) -> np.ndarray:
    """Inside the FOV (with margin) and outside the foveal avascular zone."""
    fov = np.hypot(*(points - layout.fov_center).T) <= (
        layout.fov_radius - _FOV_MARGIN_PX - width / 2
    )
    fovea = np.hypot(*(points - layout.fovea_center).T) >= (
        _FOVEA_CLEAR_DD * layout.disc_diameter + width / 2
    )
    return fov & fovea


def child_widths(width: float, spec: SyntheticFundusSpec) -> tuple[float, float]:
    """(continuing, side) widths of a bifurcation's children."""
    a = spec.branch_asymmetry
    if spec.width_rule == "murray":
        # Murray's law w^3 = w1^3 + w2^3 with w2 = a * w1.
        main = width / (1.0 + a**3) ** (1.0 / 3.0)
    else:
        main = spec.width_ratio * width
    return main, a * main


def _bifurcate(
    sprout: _Sprout,
    index: int,
    points: FloatArray,
    spec: SyntheticFundusSpec,
    rng: np.random.Generator,
) -> list[_Sprout]:
    main_w, side_w = child_widths(sprout.width, spec)
    end_heading = sprout.heading + sprout.turn * (len(points) - 1) * _STEP_PX
    side = rng.choice([-1.0, 1.0])
    # The thinner child deviates more (as flow optimality predicts).
    headings = (
        end_heading - side * math.radians(rng.uniform(5.0, 20.0)),
        end_heading + side * math.radians(rng.uniform(35.0, 70.0)),
    )
    turns = (sprout.turn, rng.uniform(-0.003, 0.003))
    children = []
    for width, heading, turn in zip((main_w, side_w), headings, turns, strict=True):
        length = sprout.length * spec.segment_length_decay * rng.uniform(0.8, 1.2)
        if width >= spec.min_width_px:
            children.append(
                _Sprout(
                    start=points[-1].copy(),
                    heading=heading,
                    turn=turn,
                    width=width,
                    length=length,
                    generation=sprout.generation + 1,
                    kind=sprout.kind,
                    parent=index,
                )
            )
    return children
