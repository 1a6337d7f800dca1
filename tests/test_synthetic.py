"""The synthetic fundus and shapes: their ground truth is checked against the drawn pixels
with measurements written here independently of the generator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from shared.findings import LesionType
from shared.synthetic import (
    LesionSpec,
    SyntheticFundus,
    SyntheticFundusSpec,
    VesselSegment,
    generate_fundus,
    shapes,
)
from shared.synthetic.__main__ import DEMO_LESION_COUNTS, main
from shared.synthetic.vessels import child_widths

# Specs without vessels draw in a fraction of the time: used where vessels are irrelevant.
NO_VESSELS = {"vessels_per_kind": 0}


@pytest.fixture(scope="module")
def fundus() -> SyntheticFundus:
    return generate_fundus(SyntheticFundusSpec(lesion_counts=DEMO_LESION_COUNTS), seed=3)


def span(mask: np.ndarray, axis: int) -> int:
    """Rows (axis=1) or columns (axis=0) from the first to the last that hold a True pixel."""
    hits = np.flatnonzero(mask.any(axis=axis))
    return int(hits[-1] - hits[0] + 1)


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --- isolated vessels -------------------------------------------------------------------------


@pytest.mark.parametrize("angle", [0.0, 37.0, 90.0, 123.0])
@pytest.mark.parametrize("width", [1.0, 2.0, 3.0, 4.5, 5.0, 8.0])
def test_straight_vessel_width_is_exact(width: float, angle: float) -> None:
    vessel = shapes.straight_vessel(width, angle, size=256, length_px=160)
    rows, cols = np.nonzero(vessel.mask)
    a = math.radians(angle)
    # Position along the axis, measured here from the angle (y points down, angles CCW).
    along = (cols - 127.5) * math.cos(a) - (rows - 127.5) * math.sin(a)
    middle = np.abs(along) < 40.0  # the middle half, well away from the ends
    assert abs(middle.sum() / 80.0 - width) <= 0.5
    if angle in (0.0, 90.0) and width.is_integer():
        # Grid-aligned: every cross-section holds exactly `width` pixels.
        counts = vessel.mask.sum(axis=0 if angle == 0.0 else 1)
        assert set(counts[counts > 0].tolist()) == {int(width)}
        assert (counts > 0).sum() == 160
    assert vessel.distance_tortuosity == 1.0


@pytest.mark.parametrize(
    ("amplitude", "wavelength", "periods", "angle"),
    [
        (2.0, 80.0, 3.0, 0.0),
        (10.0, 80.0, 3.0, 30.0),
        (5.0, 40.0, 2.5, 90.0),
        (0.5, 100.0, 2.0, 0.0),
    ],
)
def test_sinusoid_tortuosity_matches_a_dense_integral(
    amplitude: float, wavelength: float, periods: float, angle: float
) -> None:
    vessel = shapes.sinusoidal_vessel(3.0, amplitude, wavelength, periods=periods, angle_deg=angle)
    run = periods * wavelength
    k = 2 * math.pi / wavelength
    x = np.linspace(0.0, run, 2_000_001)
    arc = float(np.trapezoid(np.sqrt(1.0 + (amplitude * k * np.cos(k * x)) ** 2), x))
    chord = math.hypot(run, amplitude * math.sin(k * run))
    assert vessel.distance_tortuosity == pytest.approx(arc / chord, rel=1e-3)
    assert vessel.arc_length == pytest.approx(arc, rel=1e-6)
    # The drawn centreline agrees with the ideal curve too.
    pts = vessel.centreline
    assert np.hypot(*np.diff(pts, axis=0).T).sum() == pytest.approx(arc, rel=1e-3)
    assert math.hypot(*(pts[-1] - pts[0])) == pytest.approx(chord, rel=1e-6)
    # The tube is 3 px wide round the whole curve (Steiner: area = w L + pi (w/2)^2 with the
    # round caps; the pixel lattice adds up to ~0.1 px where the curve runs along the grid).
    assert (vessel.mask.sum() - math.pi * 1.5**2) / arc == pytest.approx(3.0, abs=0.15)


def test_circle_arc_has_known_curvature_and_width() -> None:
    arc = shapes.circle_arc(60.0, width_px=4.0, start_deg=0.0, end_deg=270.0)
    assert arc.curvature == pytest.approx(1 / 60)
    assert arc.arc_length == pytest.approx(1.5 * math.pi * 60)
    rows, cols = np.nonzero(arc.mask)
    r = np.hypot(cols - arc.center[0], rows - arc.center[1])
    # Away from the round caps every pixel is within 2 px of the circle.
    assert np.all(np.abs(r - 60.0) <= 2.0 + 1e-9)
    assert arc.mask.sum() / arc.arc_length == pytest.approx(4.0, abs=0.15)
    assert np.allclose(np.hypot(*(arc.centreline - arc.center).T), 60.0)


# --- fractals ---------------------------------------------------------------------------------


def box_counting_slope(mask: np.ndarray, sizes: list[int]) -> float:
    counts = []
    for b in sizes:
        n = mask.shape[0] // b * b
        boxes = mask[:n, :n].reshape(n // b, b, n // b, b).any(axis=(1, 3))
        counts.append(boxes.sum())
    return float(-np.polyfit(np.log(sizes), np.log(counts), 1)[0])


@pytest.mark.parametrize("level", [1, 2, 4, 6])
def test_sierpinski_carpet_pixel_count(level: int) -> None:
    carpet = shapes.sierpinski_carpet(level)
    assert carpet.mask.shape == (3**level, 3**level)
    assert carpet.mask.sum() == 8**level


def test_fractals_have_their_dimension() -> None:
    carpet = shapes.sierpinski_carpet(6)
    assert box_counting_slope(carpet.mask, [3**k for k in range(6)]) == pytest.approx(
        carpet.dimension, abs=1e-9
    )
    assert carpet.dimension == pytest.approx(1.8928, abs=1e-4)
    triangle = shapes.sierpinski_triangle(9)
    assert triangle.mask.shape == (512, 512)
    assert triangle.mask.sum() == 3**9
    assert box_counting_slope(triangle.mask, [2**k for k in range(9)]) == pytest.approx(
        triangle.dimension, abs=1e-9
    )
    square = shapes.filled_square(512)
    assert box_counting_slope(square.mask, [2**k for k in range(9)]) == pytest.approx(2.0)
    line = shapes.straight_line(512)
    assert box_counting_slope(line.mask, [2**k for k in range(9)]) == pytest.approx(1.0)
    koch = shapes.koch_curve(5, 729)
    assert box_counting_slope(koch.mask, [3, 9, 27, 81]) == pytest.approx(koch.dimension, abs=0.03)


# --- the fundus: image ------------------------------------------------------------------------


def test_shapes_and_dtypes(fundus: SyntheticFundus) -> None:
    size = fundus.spec.size
    assert fundus.rgb.shape == (size, size, 3)
    assert fundus.rgb.dtype == np.uint8
    for mask in (
        fundus.fov_mask,
        fundus.vessel_mask,
        fundus.artery_mask,
        fundus.vein_mask,
        fundus.disc_mask,
        fundus.cup_mask,
    ):
        assert mask.shape == (size, size)
        assert mask.dtype == bool
    assert fundus.vessel_width_map.dtype == np.float32
    assert fundus.segment_index_map.dtype == np.int32
    assert np.array_equal(fundus.vessel_mask, fundus.artery_mask | fundus.vein_mask)
    assert np.array_equal(fundus.vessel_mask, fundus.vessel_width_map > 0)
    assert np.array_equal(fundus.vessel_mask, fundus.segment_index_map >= 0)
    for seg in fundus.centrelines:
        assert seg.points.dtype == np.float64
        assert seg.points.shape[1] == 2
    json.dumps(fundus.truth())


def test_dark_border_bright_disc_dark_vessels(fundus: SyntheticFundus) -> None:
    rgb = fundus.rgb.astype(float)
    assert fundus.rgb[~fundus.fov_mask].max() == 0
    assert rgb[fundus.fov_mask].mean() > 60
    luma = rgb.mean(axis=2)
    yy, xx = np.mgrid[: fundus.spec.size, : fundus.spec.size]
    dist_disc = np.hypot(xx - fundus.disc_center[0], yy - fundus.disc_center[1])
    near_vessel = ndimage.binary_dilation(fundus.vessel_mask, iterations=3)
    ring = (dist_disc > 1.5 * fundus.disc_radius_px) & (dist_disc < 3 * fundus.disc_radius_px)
    ring &= ~near_vessel & fundus.fov_mask
    assert luma[fundus.disc_mask & ~near_vessel].mean() > luma[ring].mean() + 40
    green = rgb[..., 1]
    background = fundus.fov_mask & ~near_vessel & ~fundus.disc_mask
    core = ndimage.binary_erosion(fundus.vessel_mask) & ~fundus.disc_mask
    assert green[core].mean() < green[background].mean() - 30
    # Locally too: each wide segment is darker than the band just outside it.
    for seg in fundus.centrelines:
        own = (fundus.segment_index_map == seg.index) & ~fundus.disc_mask
        if seg.width_px >= 5 and own.sum() > 200:
            band = ndimage.binary_dilation(own, iterations=4) & ~near_vessel
            assert green[own].mean() < green[band].mean() - 20


def test_same_seed_same_bytes_other_seed_other_image(fundus: SyntheticFundus) -> None:
    again = generate_fundus(fundus.spec, seed=fundus.seed)
    assert again.rgb.tobytes() == fundus.rgb.tobytes()
    assert np.array_equal(again.vessel_mask, fundus.vessel_mask)
    assert [les.box_px for les in again.lesions] == [les.box_px for les in fundus.lesions]
    other = generate_fundus(fundus.spec, seed=fundus.seed + 1)
    assert other.rgb.tobytes() != fundus.rgb.tobytes()
    assert not np.array_equal(other.vessel_mask, fundus.vessel_mask)


def test_lesions_do_not_change_the_vessels(fundus: SyntheticFundus) -> None:
    clean = generate_fundus(fundus.spec.model_copy(update={"lesion_counts": {}}), seed=fundus.seed)
    assert clean.lesions == []
    assert np.array_equal(clean.vessel_mask, fundus.vessel_mask)


# --- the fundus: anatomy ----------------------------------------------------------------------


@pytest.mark.parametrize("cdr", [0.3, 0.5, 0.7, 0.85])
@pytest.mark.parametrize("disc_radius", [50.0, 60.0, 72.5])
def test_drawn_cdr_matches_the_spec(cdr: float, disc_radius: float) -> None:
    spec = SyntheticFundusSpec(
        cdr_vertical=cdr, cdr_horizontal=cdr - 0.05, disc_radius_px=disc_radius, **NO_VESSELS
    )
    f = generate_fundus(spec, seed=1)
    disc_h, disc_w = span(f.disc_mask, 1), span(f.disc_mask, 0)
    cup_h, cup_w = span(f.cup_mask, 1), span(f.cup_mask, 0)
    assert not np.any(f.cup_mask & ~f.disc_mask)
    assert (disc_h, disc_w, cup_h, cup_w) == (
        f.disc_height_px,
        f.disc_width_px,
        f.cup_height_px,
        f.cup_width_px,
    )
    assert abs(cup_h / disc_h - cdr) <= 0.01
    assert abs(cup_w / disc_w - (cdr - 0.05)) <= 0.01
    assert f.cdr_vertical == cdr
    assert f.cdr_horizontal == cdr - 0.05
    assert f.cdr_vertical_drawn == cup_h / disc_h
    assert f.cdr_horizontal_drawn == cup_w / disc_w
    # The disc is the circle it says it is.
    assert disc_h == 2 * math.floor(disc_radius) + 1
    assert f.disc_mask.sum() == pytest.approx(math.pi * disc_radius**2, rel=0.02)


@pytest.mark.parametrize("laterality", ["right", "left"])
def test_laterality_places_disc_nasally_and_fovea_temporally(laterality: str) -> None:
    f = generate_fundus(SyntheticFundusSpec(laterality=laterality, **NO_VESSELS), seed=0)
    middle = (f.spec.size - 1) / 2
    nasal = 1 if laterality == "right" else -1  # OD: disc on the viewer's right
    assert nasal * (f.disc_center[0] - middle) > 100
    temporal_dd = -nasal * (f.fovea_center[0] - f.disc_center[0]) / f.disc_diameter_px
    assert temporal_dd == pytest.approx(2.5)
    assert 0 < f.fovea_center[1] - f.disc_center[1] < f.disc_diameter_px
    assert f.fov_mask[round(f.fovea_center[1]), round(f.fovea_center[0])]


# --- the fundus: vessels ----------------------------------------------------------------------


def middle_width(f: SyntheticFundus, seg: VesselSegment) -> float | None:
    """Vessel area / centreline length over the middle 40 % of a segment, or None when another
    vessel comes near that stretch. Pixels are assigned to the nearest point of a 0.05 px
    resampling of the centreline; by the tube formula that stretch's area is width x length."""
    pts = seg.points
    seglen = np.r_[0.0, np.cumsum(np.hypot(*np.diff(pts, axis=0).T))]
    s = np.linspace(0.0, seglen[-1], int(seglen[-1] / 0.05) + 1)
    dense = np.column_stack([np.interp(s, seglen, pts[:, 0]), np.interp(s, seglen, pts[:, 1])])
    s0, s1 = 0.3 * seglen[-1], 0.7 * seglen[-1]
    reach = seg.width_px / 2 + 2.0
    stretch = dense[(s >= s0) & (s <= s1)]
    x0, y0 = np.floor(stretch.min(axis=0) - reach).astype(int)
    x1, y1 = np.ceil(stretch.max(axis=0) + reach).astype(int) + 1
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dist, nearest = cKDTree(dense).query(np.column_stack([xx.ravel(), yy.ravel()]))
    region = (dist <= reach) & (s[nearest] >= s0) & (s[nearest] <= s1)
    owners = f.segment_index_map[yy.ravel()[region], xx.ravel()[region]]
    if np.any((owners != -1) & (owners != seg.index)):
        return None
    return float((owners == seg.index).sum() / (s1 - s0))


def test_segment_widths_are_exact_in_the_fundus(fundus: SyntheticFundus) -> None:
    checked = 0
    for seg in fundus.centrelines:
        if seg.arc_length < 30:
            continue
        measured = middle_width(fundus, seg)
        if measured is None:
            continue
        assert abs(measured - seg.width_px) <= 0.5, (seg.index, seg.width_px, measured)
        checked += 1
    assert checked >= 30


def test_segment_truth_is_consistent(fundus: SyntheticFundus) -> None:
    segments = fundus.centrelines
    assert {s.kind for s in segments} == {"artery", "vein"}
    assert [s.index for s in segments] == list(range(len(segments)))
    for seg in segments:
        pts = seg.points
        assert seg.arc_length == pytest.approx(np.hypot(*np.diff(pts, axis=0).T).sum())
        assert seg.chord_length == pytest.approx(math.hypot(*(pts[-1] - pts[0])))
        assert seg.distance_tortuosity == pytest.approx(seg.arc_length / seg.chord_length)
        assert seg.distance_tortuosity >= 1.0
        # The owning segment's width is reported at its pixels.
        own = fundus.segment_index_map == seg.index
        if own.any():
            assert np.all(fundus.vessel_width_map[own] == np.float32(seg.width_px))
            kind_mask = fundus.artery_mask if seg.kind == "artery" else fundus.vein_mask
            assert kind_mask[own].all()
        if seg.parent is None:
            assert seg.generation == 0
            r = math.hypot(pts[0][0] - fundus.disc_center[0], pts[0][1] - fundus.disc_center[1])
            assert r < fundus.disc_radius_px
            continue
        parent = segments[seg.parent]
        assert seg.index in parent.children
        assert seg.generation == parent.generation + 1
        assert seg.kind == parent.kind
        assert np.array_equal(seg.points[0], parent.points[-1])  # children start at the fork


def test_bifurcations_follow_murrays_law(fundus: SyntheticFundus) -> None:
    pairs = [s for s in fundus.centrelines if len(s.children) == 2]
    assert len(pairs) >= 20
    for parent in pairs:
        w1, w2 = (fundus.centrelines[i].width_px for i in parent.children)
        assert parent.width_px**3 == pytest.approx(w1**3 + w2**3, rel=1e-9)
        assert min(w1, w2) == pytest.approx(fundus.spec.branch_asymmetry * max(w1, w2))
    ratio_spec = SyntheticFundusSpec(width_rule="ratio", width_ratio=0.8)
    assert child_widths(10.0, ratio_spec) == pytest.approx((8.0, 8.0 * 0.75))


def test_vessels_avoid_the_fovea_and_stay_in_the_fov(fundus: SyntheticFundus) -> None:
    yy, xx = np.nonzero(fundus.vessel_mask)
    to_fovea = np.hypot(xx - fundus.fovea_center[0], yy - fundus.fovea_center[1])
    assert to_fovea.min() >= 0.5 * fundus.disc_diameter_px - 1
    assert not np.any(fundus.vessel_mask & ~fundus.fov_mask)


# --- the fundus: lesions ----------------------------------------------------------------------


def test_lesion_boxes_are_exact(fundus: SyntheticFundus) -> None:
    size = fundus.spec.size
    counts = {t: sum(les.type == t for les in fundus.lesions) for t in LesionType}
    assert counts == DEMO_LESION_COUNTS
    union = np.zeros((size, size), dtype=int)
    for les in fundus.lesions:
        full = les.full_mask((size, size))
        assert les.box_px == bbox(full)
        assert les.box_norm == tuple(round(v / size, 4) for v in les.box_px)
        assert les.area_px == full.sum() > 0
        assert not np.any(full & fundus.disc_mask)
        assert not np.any(full & ~fundus.fov_mask)
        x, y = les.center
        assert full[round(y), round(x)]
        if les.type == LesionType.MICROANEURYSM:
            assert 2 <= les.radius <= 4
        union += full
    assert union.max() == 1  # lesions never overlap


def test_explicit_lesions_are_drawn_and_checked() -> None:
    base = SyntheticFundusSpec(**NO_VESSELS)
    hx, hy = 300.0, 300.0
    spec = base.model_copy(
        update={"lesions": (LesionSpec(type=LesionType.HAEMORRHAGE, center=(hx, hy), radius=10.0),)}
    )
    f = generate_fundus(spec, seed=0)
    (les,) = f.lesions
    x0, y0, x1, y1 = les.box_px
    assert x0 <= hx < x1 and y0 <= hy < y1
    # A haemorrhage is dark: red channel well below the fundus around it.
    red = f.rgb[..., 0].astype(float)
    assert red[les.full_mask(red.shape)].mean() < red[y0 - 20 : y0 - 10, x0:x1].mean() - 40
    on_disc = base.model_copy(
        update={
            "lesions": (LesionSpec(type=LesionType.HARD_EXUDATE, center=f.disc_center, radius=5.0),)
        }
    )
    with pytest.raises(ValueError, match="optic disc"):
        generate_fundus(on_disc, seed=0)


# --- CLI --------------------------------------------------------------------------------------


def test_cli_writes_image_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "demo" / "fundus.png"
    assert main([str(out), "--seed", "5", "--lesions"]) == 0
    with Image.open(out) as image:
        assert image.size == (912, 912)
        assert image.mode == "RGB"
    truth = json.loads(out.with_suffix(".json").read_text())
    assert truth["seed"] == 5
    assert len(truth["lesions"]) == sum(DEMO_LESION_COUNTS.values())
    assert truth["disc"]["cdr_vertical"] == pytest.approx(
        truth["disc"]["cdr_vertical_drawn"], abs=0.01
    )
    assert truth["vessels"]["segments"][0]["points"]
