"""The measurement engine against shapes and a fundus whose truth is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from services.analysis.features import (
    AUTOMORPH_COLUMNS,
    EXTRA_COLUMNS,
    CanonicalGrid,
    MaskSet,
    measure,
)
from services.analysis.features.caliber import hubbard, knudtson
from services.analysis.features.fractal import box_counting_dimension
from services.analysis.features.vessels import segment_widths, trace
from shared.findings import LengthUnit, Region, VesselType
from shared.synthetic import SyntheticFundus, SyntheticFundusSpec, generate_fundus, shapes
from shared.synthetic.anatomy import disc_and_cup, make_layout
from shared.synthetic.geometry import polyline_pixels


@pytest.fixture(scope="module")
def fundus() -> SyntheticFundus:
    return generate_fundus(seed=0)


def fundus_masks(f: SyntheticFundus) -> MaskSet:
    return MaskSet(
        vessel=f.vessel_mask,
        artery=f.artery_mask,
        vein=f.vein_mask,
        disc=f.disc_mask,
        cup=f.cup_mask,
        fovea=f.fovea_center,
    )


def tubes(size: int, lines: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """A mask of polylines drawn as tubes of the given widths."""
    mask = np.zeros((size, size), dtype=bool)
    for points, width in lines:
        px = polyline_pixels(points, width / 2.0, (size, size))
        mask[px.rows, px.cols] = True
    return mask


def circle(size: int, center: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.ogrid[0:size, 0:size]
    return (xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2


# --- column names ------------------------------------------------------------------------

_TYPES = ("", "Artery_", "Vein_")
_FEATURES = (
    "Fractal_dimension",
    "Vessel_density",
    "Average_width",
    "Distance_tortuosity",
    "Squared_curvature_tortuosity",
    "Tortuosity_density",
)
_CALIBERS = (
    "CRAE_Hubbard",
    "CRVE_Hubbard",
    "AVR_Hubbard",
    "CRAE_Knudtson",
    "CRVE_Knudtson",
    "AVR_Knudtson",
)
_DISC = ("Disc_height", "Disc_width", "Cup_height", "Cup_width", "CDR_vertical", "CDR_horizontal")


def test_column_names_are_automorphs() -> None:
    """AutoMorph's merged Disc_Features.csv: disc columns, whole-image features, then each
    zone table's features and calibres with the _zone_b / _zone_c suffixes of csv_merge.py."""
    whole = [t + f for t in _TYPES for f in _FEATURES]
    zone = [*whole, *_CALIBERS]
    expected = [*_DISC, *whole]
    expected += [c + "_zone_b" for c in zone] + [c + "_zone_c" for c in zone]
    assert list(AUTOMORPH_COLUMNS) == expected
    assert len(AUTOMORPH_COLUMNS) == 72
    assert "Artery_Squared_curvature_tortuosity_zone_c" in AUTOMORPH_COLUMNS
    assert {"Vessel_count", "Artery_Branching_angle_zone_b", "Fovea_x"} <= set(EXTRA_COLUMNS)
    assert not set(AUTOMORPH_COLUMNS) & set(EXTRA_COLUMNS)


def test_columns_follow_the_findings(fundus: SyntheticFundus) -> None:
    result = measure(fundus_masks(fundus))
    columns = result.columns()
    assert list(columns) == [*AUTOMORPH_COLUMNS, *EXTRA_COLUMNS]
    features = {(f.vessel_type, f.region): f for f in result.vessels.features}
    assert len(features) == 9
    assert (
        columns["Vein_Average_width_zone_c"]
        == features[(VesselType.VEIN, Region.ZONE_C)].average_width
    )
    assert columns["Disc_height"] == result.disc.disc_height
    assert all(v is None or math.isfinite(v) for v in columns.values())
    assert columns["Fovea_x"] == fundus.fovea_center[0]
    assert columns["Disc_center_x"] == pytest.approx(fundus.disc_center[0], abs=0.5)
    assert columns["Disc_center_y"] == pytest.approx(fundus.disc_center[1], abs=0.5)


# --- widths ----------------------------------------------------------------------------


@pytest.mark.parametrize("width", [3.0, 4.5, 7.0, 10.0])
@pytest.mark.parametrize("angle", [13.0, 38.0, 61.0, 104.0, 151.0])
def test_straight_vessel_width(width: float, angle: float) -> None:
    vessel = shapes.straight_vessel(width, angle, size=256)
    columns = measure(MaskSet(vessel=vessel.mask), canonical_size=256).columns()
    assert columns["Average_width"] == pytest.approx(width, abs=0.5)
    assert columns["Distance_tortuosity"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(("width", "angle"), [(3.0, 23.0), (6.0, 77.0), (9.0, 142.0)])
def test_width_survives_the_canonical_grid(width: float, angle: float) -> None:
    """Resampled to 912 from a non-square image; reported in the image's own pixels."""
    vessel = shapes.straight_vessel(width, angle, size=300)
    mask = vessel.mask[60:240]  # 180 x 300: padded to a square, then scaled x 3.04
    result = measure(MaskSet(vessel=mask))
    assert result.vessels.length_unit == LengthUnit.PIXEL
    assert result.canonical_scale == pytest.approx(912 / 300)
    assert result.columns()["Average_width"] == pytest.approx(width, abs=0.5)


def test_synthetic_fundus_segment_widths(fundus: SyntheticFundus) -> None:
    """Each measured segment lying on one drawn segment, 15 px or more from any A/V crossing,
    has its drawn width within half a pixel."""
    near_crossing = ndimage.distance_transform_edt(~(fundus.artery_mask & fundus.vein_mask)) < 15
    checked = 0
    for mask in (fundus.artery_mask, fundus.vein_mask):
        traced = trace(mask, width_region=np.ones_like(mask))
        assert traced.width_core is not None
        widths = segment_widths(traced)
        graph = traced.graph
        for s in np.flatnonzero(np.isfinite(widths)):
            points = np.arange(graph.start[s], graph.stop[s])
            pixels = graph.pixel[points[traced.width_core[points]]]
            owners = fundus.segment_index_map.flat[pixels]
            if len(pixels) < 10 or near_crossing.flat[pixels].any() or owners.min() < 0:
                continue
            if (owners != owners[0]).any():
                continue
            assert widths[s] == pytest.approx(fundus.centrelines[owners[0]].width_px, abs=0.5)
            checked += 1
    assert checked >= 40


def test_calibration_scales_lengths() -> None:
    arc = shapes.circle_arc(80.0, width_px=5.0, end_deg=120.0)
    masks = MaskSet(vessel=arc.mask, disc=circle(arc.mask.shape[0], (20, 20), 8))
    plain = measure(masks)
    calibrated = measure(masks, pixel_size_um=7.0)
    a, b = plain.columns(), calibrated.columns()
    assert plain.vessels.length_unit == LengthUnit.PIXEL
    assert calibrated.vessels.length_unit == LengthUnit.MICROMETER
    assert calibrated.disc.length_unit == LengthUnit.MICROMETER
    assert b["Average_width"] == pytest.approx(7.0 * a["Average_width"])
    assert b["Disc_height"] == pytest.approx(7.0 * a["Disc_height"])
    assert b["Squared_curvature_tortuosity"] == pytest.approx(a["Squared_curvature_tortuosity"] / 7)
    for name in ("Vessel_density", "Fractal_dimension", "Distance_tortuosity"):
        assert b[name] == a[name]
    assert b["Pixel_size_um"] == 7.0 and a["Pixel_size_um"] is None
    with pytest.raises(ValueError):
        measure(masks, pixel_size_um=0.0)


# --- disc and zones ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cdr_v", "cdr_h"), [(0.2, 0.25), (0.45, 0.45), (0.6, 0.5), (0.8, 0.7), (0.9, 0.85)]
)
def test_cup_to_disc_ratios(cdr_v: float, cdr_h: float) -> None:
    spec = SyntheticFundusSpec(
        size=600, disc_radius_px=45, cdr_vertical=cdr_v, cdr_horizontal=cdr_h
    )
    drawn = disc_and_cup(spec, make_layout(spec))
    masks = MaskSet(vessel=np.zeros((600, 600), bool), disc=drawn.disc_mask, cup=drawn.cup_mask)
    disc = measure(masks).disc
    assert disc.cdr_vertical == pytest.approx(cdr_v, abs=0.02)
    assert disc.cdr_horizontal == pytest.approx(cdr_h, abs=0.02)
    assert disc.disc_height == drawn.disc_height_px and disc.cup_width == drawn.cup_width_px
    assert disc.disc_diameter_px == max(drawn.disc_height_px, drawn.disc_width_px)


def test_fundus_disc(fundus: SyntheticFundus) -> None:
    disc = measure(fundus_masks(fundus)).disc
    assert disc.cdr_vertical == pytest.approx(fundus.cdr_vertical_drawn)
    assert disc.cdr_horizontal == pytest.approx(fundus.cdr_horizontal_drawn)
    assert disc.cdr_vertical == pytest.approx(fundus.cdr_vertical, abs=0.02)


def test_zone_geometry() -> None:
    """Zone B is 2r..3r and zone C 2r..5r from the disc centroid, r half the disc's extent."""
    size, center = 400, (200.0, 190.0)
    disc = circle(size, center, 20)  # 41 px across: r = 20.5
    result = measure(
        MaskSet(vessel=np.ones((size, size), bool), disc=disc), canonical_size=size
    ).columns()
    yy, xx = np.ogrid[0:size, 0:size]
    d = np.hypot(xx - center[0], yy - center[1])
    for suffix, outer in (("_zone_b", 3), ("_zone_c", 5)):
        expected = ((d >= 2 * 20.5) & (d <= outer * 20.5)).sum() / size**2
        assert result["Vessel_density" + suffix] == pytest.approx(expected, abs=2 / size**2)
    assert result["Vessel_density"] == 1.0
    assert result["Disc_diameter_px"] == 41


def test_zone_outside_the_image_is_none() -> None:
    size = 200
    disc = circle(size, (100, 100), 90)  # zone B begins 181 px out: past every corner
    columns = measure(MaskSet(vessel=np.ones((size, size), bool), disc=disc)).columns()
    assert columns["Vessel_density"] == 1.0
    assert columns["Vessel_density_zone_b"] is None
    assert columns["Fractal_dimension_zone_c"] is None
    assert columns["CRAE_Knudtson_zone_b"] is None


# --- calibre -----------------------------------------------------------------------------


def test_knudtson_by_hand() -> None:
    """Six widest of eight; pair widest with narrowest, carry the middle, and again."""
    widths = [3.0, 10.0, 60.0, 20.0, 5.0, 30.0, 40.0, 50.0]
    r1 = [0.88 * math.sqrt(10**2 + 60**2), 0.88 * math.sqrt(20**2 + 50**2), 0.88 * 50.0]
    a, mid, c = sorted(r1)
    r2 = sorted([0.88 * math.sqrt(a**2 + c**2), mid])
    expected = 0.88 * math.sqrt(r2[0] ** 2 + r2[1] ** 2)
    assert knudtson(widths, "artery") == pytest.approx(expected)
    assert knudtson(widths, "artery") == pytest.approx(67.96, abs=0.01)
    veins = [0.95 * math.sqrt(10**2 + 60**2), 0.95 * math.sqrt(20**2 + 50**2), 0.95 * 50.0]
    a, mid, c = sorted(veins)
    r2 = sorted([0.95 * math.sqrt(a**2 + c**2), mid])
    assert knudtson(widths, "vein") == pytest.approx(0.95 * math.hypot(*r2))
    assert knudtson(widths[:5], "artery") is None


def test_hubbard_by_hand() -> None:
    def artery(n: float, w: float) -> float:
        return math.sqrt(0.87 * n * n + 1.01 * w * w - 0.22 * n * w - 10.76)

    widths = [80.0, 90.0, 100.0, 110.0, 120.0, 130.0]
    a, mid, c = sorted([artery(80, 130), artery(90, 120), artery(100, 110)])
    r2 = sorted([artery(a, c), mid])
    assert hubbard(widths, "artery") == pytest.approx(artery(*r2))
    vein_pair = math.sqrt(0.72 * 100**2 + 0.91 * 130**2 + 450.05)
    assert hubbard([100.0, 130.0] * 3, "vein") is not None
    assert vein_pair == pytest.approx(151.75, abs=0.01)
    assert hubbard([1.0] * 6, "artery") is None  # negative radicand: no value, not NaN


def radial_vessels(size: int, center: float, widths: list[float], offset_deg: float) -> list:
    lines = []
    for i, width in enumerate(widths):
        a = math.radians(offset_deg + 60.0 * i)
        u = np.array([math.cos(a), math.sin(a)])
        lines.append((np.array([center + 35 * u, center + 280 * u]), width))
    return lines


def test_crae_crve_from_the_zone() -> None:
    size, centre = 600, 300.0
    arteries = [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    veins = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0]
    artery = tubes(size, radial_vessels(size, centre, arteries, 10.0))
    vein = tubes(size, radial_vessels(size, centre, veins, 40.0))
    masks = MaskSet(
        vessel=artery | vein,
        artery=artery,
        vein=vein,
        disc=circle(size, (centre, centre), 30),
    )
    plain = measure(masks, canonical_size=size).columns()
    for zone in ("_zone_b", "_zone_c"):
        assert plain["CRAE_Knudtson" + zone] == pytest.approx(knudtson(arteries, "artery"), abs=0.5)
        assert plain["CRVE_Knudtson" + zone] == pytest.approx(knudtson(veins, "vein"), abs=0.5)
        assert plain["AVR_Knudtson" + zone] == pytest.approx(
            knudtson(arteries, "artery") / knudtson(veins, "vein"), abs=0.03
        )
        assert plain["CRAE_Hubbard" + zone] is None  # uncalibrated
        assert plain["Artery_Vessel_count" + zone] == 6
    calibrated = measure(masks, pixel_size_um=12.0, canonical_size=size).columns()
    crae_um = [12.0 * w for w in arteries]
    assert calibrated["CRAE_Hubbard_zone_b"] == pytest.approx(hubbard(crae_um, "artery"), rel=0.05)
    assert calibrated["CRAE_Knudtson_zone_b"] == pytest.approx(12 * plain["CRAE_Knudtson_zone_b"])
    assert calibrated["AVR_Hubbard_zone_b"] is not None


# --- tortuosity and curvature ------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "amplitude", "wavelength", "angle"),
    [(4, 10, 100, 0), (4, 10, 100, 23), (6, 20, 120, 37), (5, 30, 200, 5), (8, 15, 150, 71)],
)
def test_sinusoid_distance_tortuosity(
    width: float, amplitude: float, wavelength: float, angle: float
) -> None:
    vessel = shapes.sinusoidal_vessel(width, amplitude, wavelength, angle_deg=angle)
    size = vessel.mask.shape[0]
    columns = measure(MaskSet(vessel=vessel.mask), canonical_size=size).columns()
    assert columns["Distance_tortuosity"] == pytest.approx(vessel.distance_tortuosity, rel=0.01)
    # Grisan: six half waves, each of the same arc / chord.
    n = 6
    half = shapes.sinusoid_arc_length(amplitude, wavelength, wavelength / 2)
    expected = (n - 1) / n + n * (half / (wavelength / 2) - 1) / vessel.arc_length
    assert columns["Tortuosity_density"] == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize(
    ("radius", "sweep"), [(60.0, 90.0), (100.0, 120.0), (80.0, 60.0), (150.0, 80.0)]
)
def test_arc_distance_tortuosity(radius: float, sweep: float) -> None:
    arc = shapes.circle_arc(radius, width_px=4.0, end_deg=sweep)
    size = arc.mask.shape[0]
    columns = measure(MaskSet(vessel=arc.mask), canonical_size=size).columns()
    truth = math.radians(sweep) / (2 * math.sin(math.radians(sweep) / 2))
    assert columns["Distance_tortuosity"] == pytest.approx(truth, rel=0.01)


@pytest.mark.parametrize(("radius", "sweep"), [(60.0, 90.0), (100.0, 120.0), (40.0, 180.0)])
def test_arc_squared_curvature(radius: float, sweep: float) -> None:
    """Squared, not signed: the integral of 1 / R^2 along the arc."""
    arc = shapes.circle_arc(radius, width_px=4.0, end_deg=sweep)
    size = arc.mask.shape[0]
    columns = measure(MaskSet(vessel=arc.mask), canonical_size=size).columns()
    assert columns["Squared_curvature_tortuosity"] == pytest.approx(
        arc.arc_length / radius**2, rel=0.1
    )


def test_straight_vessels_are_not_curved() -> None:
    for angle in (0.0, 17.0, 70.0):
        mask = shapes.straight_vessel(5.0, angle, size=256).mask
        columns = measure(MaskSet(vessel=mask), canonical_size=256).columns()
        assert columns["Squared_curvature_tortuosity"] < 0.1 * 94 / 60**2  # a 60 px arc's tenth
        assert columns["Tortuosity_density"] < 1e-3


@pytest.mark.parametrize(("left", "right"), [(30.0, -30.0), (20.0, -50.0), (45.0, -45.0)])
def test_branching_angle(left: float, right: float) -> None:
    size = 400
    fork = np.array([220.0, 200.0])

    def ray(deg: float) -> np.ndarray:
        return fork + 150 * np.array([math.cos(math.radians(deg)), -math.sin(math.radians(deg))])

    mask = tubes(
        size,
        [
            (np.array([[40.0, 200.0], fork]), 7.0),
            (np.array([fork, ray(left)]), 5.0),
            (np.array([fork, ray(right)]), 5.0),
        ],
    )
    columns = measure(MaskSet(vessel=mask), canonical_size=size).columns()
    assert columns["Branching_angle"] == pytest.approx(left - right, abs=3.0)
    assert columns["Vessel_count"] == 3


# --- fractal dimension -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fractal",
    [
        shapes.sierpinski_carpet(6),
        shapes.sierpinski_carpet(5),
        shapes.sierpinski_triangle(9),
        shapes.sierpinski_triangle(8),
        shapes.koch_curve(5),
        shapes.filled_square(512),
        shapes.filled_square(700),
        shapes.straight_line(512),
        shapes.straight_line(777),
    ],
    ids=lambda f: f"{f.name}_{f.mask.shape[0]}",
)
def test_box_counting_dimension(fractal: shapes.KnownFractal) -> None:
    assert box_counting_dimension(fractal.mask) == pytest.approx(fractal.dimension, abs=0.03)


def test_box_counting_undefined() -> None:
    assert box_counting_dimension(np.zeros((256, 256), bool)) is None
    assert box_counting_dimension(np.ones((20, 20), bool)) is None  # one box size only


# --- absent, empty and degenerate masks ------------------------------------------------


def test_absent_masks_give_none() -> None:
    mask = shapes.straight_vessel(6.0, 30.0, size=256).mask
    result = measure(MaskSet(vessel=mask))
    columns = result.columns()
    assert columns["Average_width"] is not None
    for name in ("Artery_Average_width", "Vein_Fractal_dimension", "Vessel_density_zone_b"):
        assert columns[name] is None
    for name in ("CRAE_Knudtson_zone_b", "AVR_Hubbard_zone_c", "Disc_height", "CDR_vertical"):
        assert columns[name] is None
    assert columns["Fovea_x"] is None and result.disc.center is None


def test_empty_and_full_masks() -> None:
    empty = np.zeros((120, 100), bool)
    columns = measure(MaskSet(vessel=empty, artery=empty, vein=empty, disc=empty)).columns()
    assert columns["Vessel_density"] == 0.0 and columns["Vessel_count"] == 0
    for name in ("Fractal_dimension", "Average_width", "Distance_tortuosity", "Disc_height"):
        assert columns[name] is None
    full = np.ones((120, 100), bool)
    columns = measure(MaskSet(vessel=full, artery=full, vein=full, disc=full, cup=full)).columns()
    assert columns["Fractal_dimension"] == pytest.approx(2.0, abs=0.05)
    assert columns["CDR_vertical"] == 1.0
    ring = np.abs(np.hypot(*np.ogrid[-100:100, -100:100]) - 60) < 3
    columns = measure(MaskSet(vessel=ring)).columns()
    assert columns["Distance_tortuosity"] is None  # a closed loop has no chord


def test_mask_validation() -> None:
    with pytest.raises(ValueError):
        MaskSet(vessel=np.zeros((10, 10), bool), artery=np.zeros((10, 11), bool))
    with pytest.raises(ValueError):
        MaskSet(vessel=np.zeros(10, bool))


def test_canonical_grid_maps_pixel_centres() -> None:
    grid = CanonicalGrid.for_shape((100, 200), 400)
    assert grid.scale == 2.0 and grid.pad_y == 50 and grid.pad_x == 0
    assert grid.to_canonical(0.0, 0.0) == (0.5, 100.5)
    mask = np.zeros((100, 200), bool)
    mask[40:60, 80:120] = True
    resampled = grid.resample(mask)
    rows, cols = np.nonzero(resampled)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (180, 219, 160, 239)
