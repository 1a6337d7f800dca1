"""Lesion service: boxes, instances, positions, the screening assessment, the model files, and
Detect over a real gRPC process."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from bench.lesions import (
    LEVELS,
    REPORTING_FLOOR,
    aupr,
    best_f1_threshold,
    scales,
    scales_option,
    shares_option,
    update_manifest,
)
from protos.retinal.v1 import common_pb2, findings_pb2, lesion_pb2, lesion_pb2_grpc
from services.analysis.engine.model_files import ModelIntegrityError, save_with_manifest
from services.analysis.engine.nets import VesselUNet
from services.lesion.engine.detection import detect, original_frame, to_findings
from services.lesion.engine.detector import (
    CONTEXT_WEIGHTS,
    DEFAULT_WEIGHTS,
    TASK,
    LesionDetector,
    LesionMaps,
    tiles,
    within_upscale,
)
from services.lesion.engine.instances import Instance, components, extract
from services.lesion.engine.overlays import LAYERS, mask_png, render
from services.lesion.engine.preprocess import INPUT_CHANNELS, MAX_UPSCALE, WorkGrid, standardise
from services.lesion.settings import LesionSettings
from shared import findings, pixels
from shared.assessment import CDR_HIGH, CDR_SUSPECT, assess
from shared.convert import to_proto
from shared.findings import LesionType, Quadrant
from shared.healthcheck import grpc_serving
from shared.imaging.fov import FovEstimate
from shared.lesion_positions import box_to_norm, box_to_px, position_lesions
from shared.synthetic import LesionSpec, SyntheticFundusSpec, generate_fundus
from tests.conftest import ServiceProcess, free_port, reported_lesion_types, wait_until

MA, HE, EX, SE = (
    LesionType.MICROANEURYSM,
    LesionType.HAEMORRHAGE,
    LesionType.HARD_EXUDATE,
    LesionType.SOFT_EXUDATE,
)


# --- boxes -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(512, 512), (4288, 2848), (9999, 7000), (37, 91)])
def test_pixel_boxes_round_trip_through_normalized_boxes(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size))
    width, height = size
    for _ in range(500):
        x0, x1 = sorted(rng.integers(0, width + 1, 2))
        y0, y1 = sorted(rng.integers(0, height + 1, 2))
        box = (int(x0), int(y0), int(x1), int(y1))
        norm = box_to_norm(box, size)
        assert all(round(v, 4) == v for v in (norm.x_min, norm.y_min, norm.x_max, norm.y_max))
        assert box_to_px(norm, size) == box


def test_normalized_boxes_are_clipped_and_follow_the_convention() -> None:
    box = box_to_norm((-5, 10, 520, 256), (512, 512))
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == (0.0, 0.0195, 1.0, 0.5)


# --- instances ---------------------------------------------------------------------------


def _blob(plane: np.ndarray, x: int, y: int, radius: int, value: float) -> None:
    yy, xx = np.mgrid[: plane.shape[0], : plane.shape[1]]
    plane[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = value


def test_components_merge_close_blobs_and_keep_distant_ones_apart() -> None:
    plane = np.zeros((200, 200), np.float32)
    _blob(plane, 50, 50, 5, 0.9)
    _blob(plane, 63, 50, 5, 0.7)  # 2 background px from the first: merged
    _blob(plane, 150, 150, 3, 0.6)  # far away: its own lesion
    found = sorted(components(plane, HE, 0.5, gap=4), key=lambda i: i.box)
    assert [i.box for i in found] == [(45, 45, 69, 56), (147, 147, 154, 154)]
    assert found[0].confidence == pytest.approx(0.9)
    disk = np.zeros((20, 20), np.float32)
    _blob(disk, 10, 10, 5, 1.0)
    assert found[0].area_px == 2 * disk.sum()
    assert len(components(plane, HE, 0.5, gap=1)) == 3


def test_extract_caps_per_type_keeps_the_most_confident_and_counts_all() -> None:
    probs = np.zeros((4, 300, 300), np.float32)
    for k in range(6):
        _blob(probs[2], 20 + 45 * k, 100, 4, 0.5 + 0.08 * k)
    grid = WorkGrid(x0=100, y0=50, x1=700, y1=650, scale=0.5, fov_x=150, fov_y=150, fov_radius=150)
    maps = LesionMaps(probabilities=probs, grid=grid)
    kept, totals = extract(maps, dict.fromkeys(LesionType, 0.45), max_per_type=4)
    assert [i.type for i in kept] == [EX] * 4
    assert [round(i.confidence, 2) for i in kept] == [0.9, 0.82, 0.74, 0.66]
    count, area = totals[EX]
    assert count == 6 and area == pytest.approx(6 * (probs[2, 90:110, 10:30] > 0).sum() * 4)
    brightest = kept[0]  # blob at (245, 100) on the grid -> input x 100 + 245 * 2
    assert brightest.box == (100 + 241 * 2, 50 + 96 * 2, 100 + 250 * 2, 50 + 105 * 2)


@pytest.mark.parametrize("length", [1, 100, 1024, 1025, 1500, 1793, 5000])
def test_tiles_keep_every_pixel_away_from_window_borders(length: int) -> None:
    covered = np.zeros(length, int)
    windows = list(tiles(length, 1024, 32))
    for start, end, keep_start, keep_end in windows:
        assert 0 <= start <= keep_start < keep_end <= end <= length
        assert end - start <= 1024
        assert keep_start == 0 or keep_start - start >= 32
        assert keep_end == length or end - keep_end >= 32
        covered[keep_start:keep_end] = 1
    assert covered.all()
    assert sum(end - start for start, end, _, _ in windows) <= 1.1 * length + 64 * len(windows)


# --- positions on a synthetic fundus -----------------------------------------------------

# (type, offset from the fovea in disc diameters as (temporal, inferior), quadrant)
PLACED = [
    (HE, (1.5, -1.0), Quadrant.SUPERO_TEMPORAL),
    (EX, (-0.5, 0.4), Quadrant.INFERO_NASAL),
    (MA, (1.0, 1.5), Quadrant.INFERO_TEMPORAL),
    (SE, (-1.2, -1.2), Quadrant.SUPERO_NASAL),
]


def _fundus_with_lesions(laterality: findings.Laterality):
    base = generate_fundus(SyntheticFundusSpec(laterality=laterality))
    dd = base.disc_diameter_px
    fx, fy = base.fovea_center
    temporal = -1 if base.disc_center[0] > fx else 1  # the side away from the disc
    specs = tuple(
        LesionSpec(type=t, center=(fx + temporal * dx * dd, fy + dy * dd), radius=8)
        for t, (dx, dy), _ in PLACED
    )
    return generate_fundus(SyntheticFundusSpec(laterality=laterality, lesions=specs))


def _expected_distance(box: tuple[int, int, int, int], point: tuple[float, float]) -> float:
    x0, y0, x1, y1 = box
    dx = max(x0 - point[0], 0.0, point[0] - x1)
    dy = max(y0 - point[1], 0.0, point[1] - y1)
    return float(np.hypot(dx, dy))


@pytest.mark.parametrize("laterality", [findings.Laterality.RIGHT, findings.Laterality.LEFT])
def test_positions_of_lesions_at_known_places(laterality: findings.Laterality) -> None:
    fundus = _fundus_with_lesions(laterality)
    size = (fundus.spec.size, fundus.spec.size)
    anatomy = findings.Findings(
        image=findings.ImageInfo(width=size[0], height=size[1], laterality=laterality),
        disc=findings.Disc(
            center=findings.Point(x=fundus.disc_center[0], y=fundus.disc_center[1]),
            disc_diameter_px=fundus.disc_diameter_px,
        ),
        fovea=findings.Fovea(
            center=findings.Point(x=fundus.fovea_center[0], y=fundus.fovea_center[1])
        ),
    )
    lesions = [
        findings.Lesion(
            type=les.type,
            box=findings.Box(
                **dict(zip(("x_min", "y_min", "x_max", "y_max"), les.box_norm, strict=True))
            ),
        )
        for les in fundus.lesions
    ]
    placed = position_lesions(lesions, anatomy, size)
    dd = fundus.disc_diameter_px
    for lesion, truth, (*_, quadrant) in zip(placed, fundus.lesions, PLACED, strict=True):
        position = lesion.position
        assert position.quadrant == quadrant
        to_fovea = _expected_distance(truth.box_px, fundus.fovea_center) / dd
        to_disc = _expected_distance(truth.box_px, fundus.disc_center) / dd
        assert position.distance_to_fovea_dd == pytest.approx(to_fovea, abs=0.01)
        assert position.distance_to_disc_dd == pytest.approx(to_disc, abs=0.01)
        assert position.in_macula == (to_fovea <= 1.0)
    assert [p.position.in_macula for p in placed] == [False, True, False, False]
    # Laterality alone (no disc, no fovea: quadrants around the FOV centre) still names sides.
    bare = findings.Findings(image=anatomy.image)
    lone = position_lesions(lesions, bare, size)
    assert all(p.position.distance_to_fovea_dd is None for p in lone)
    assert all(p.position.quadrant is not None for p in lone)


def test_positions_stay_absent_without_anatomy() -> None:
    lesion = findings.Lesion(type=EX, box=findings.Box(x_min=0.1, y_min=0.1, x_max=0.2, y_max=0.2))
    (placed,) = position_lesions([lesion], findings.Findings(), (1000, 800))
    assert placed.position == findings.LesionPosition()


# --- the screening assessment, table-driven from the ICDR definitions --------------------


def _lesion(kind: LesionType, quadrant: Quadrant | None = None, fovea_dd: float | None = None):
    return findings.Lesion(
        type=kind,
        box=findings.Box(x_min=0.4, y_min=0.4, x_max=0.41, y_max=0.41),
        position=findings.LesionPosition(quadrant=quadrant, distance_to_fovea_dd=fovea_dd),
    )


def _findings(lesions: list[findings.Lesion], **extra) -> findings.Findings:
    counts = [
        findings.LesionCount(type=t, count=sum(1 for les in lesions if les.type == t))
        for t in LesionType
    ]
    return findings.Findings(
        quality=findings.Quality(grade=findings.QualityGrade.GOOD),
        lesions=lesions,
        lesion_counts=counts,
        **extra,
    )


def _haemorrhages(per_quadrant: dict[Quadrant, int]) -> list[findings.Lesion]:
    return [_lesion(HE, q, 3.0) for q, n in per_quadrant.items() for _ in range(n)]


GRADE_TABLE = [
    # ICDR 0: no abnormalities.
    ("no lesions", [], 0, findings.Referral.NOT_REFERABLE),
    # ICDR 1: microaneurysms only.
    (
        "microaneurysms only",
        [_lesion(MA, Quadrant.SUPERO_NASAL, 2.0)] * 5,
        1,
        findings.Referral.NOT_REFERABLE,
    ),
    # ICDR 2: more than just microaneurysms.
    (
        "one haemorrhage",
        [_lesion(MA), _lesion(HE, Quadrant.INFERO_NASAL, 3.0)],
        2,
        findings.Referral.REFERABLE,
    ),
    (
        "hard exudate away from the macula",
        [_lesion(EX, Quadrant.SUPERO_NASAL, 2.5)],
        2,
        findings.Referral.REFERABLE,
    ),
    (
        "cotton-wool spot",
        [_lesion(SE, Quadrant.SUPERO_TEMPORAL, 2.0)],
        2,
        findings.Referral.REFERABLE,
    ),
    (
        "20 haemorrhages per quadrant is not > 20",
        _haemorrhages(dict.fromkeys(Quadrant, 20)),
        2,
        findings.Referral.REFERABLE,
    ),
    (
        "> 20 haemorrhages in only 3 quadrants",
        _haemorrhages({**dict.fromkeys(Quadrant, 21), Quadrant.INFERO_NASAL: 5}),
        2,
        findings.Referral.REFERABLE,
    ),
    # ICDR 3: > 20 intraretinal haemorrhages in each of 4 quadrants.
    (
        "> 20 haemorrhages in each quadrant",
        _haemorrhages(dict.fromkeys(Quadrant, 21)),
        3,
        findings.Referral.REFERABLE,
    ),
]


@pytest.mark.parametrize(("case", "lesions", "grade", "referral"), GRADE_TABLE)
def test_dr_grade_follows_icdr(case: str, lesions, grade: int, referral) -> None:
    result = assess(_findings(lesions))
    assert result.dr_grade == grade, case
    assert result.referral == referral, case
    assert any(f"ICDR {grade}" in r or f"ICDR >= {grade}" in r for r in result.reasons)
    if grade < 3:  # what one photograph cannot show is said
        assert any("lower bound" in c for c in result.caveats)


EDEMA_TABLE = [
    ("no exudates", [_lesion(MA, Quadrant.SUPERO_NASAL, 0.2)], False),
    ("exudate at 0.8 DD from the fovea", [_lesion(EX, Quadrant.INFERO_NASAL, 0.8)], True),
    ("exudate at exactly 1 DD", [_lesion(EX, Quadrant.INFERO_NASAL, 1.0)], True),
    ("exudate at 1.3 DD", [_lesion(EX, Quadrant.INFERO_NASAL, 1.3)], False),
    ("exudate, fovea unknown", [_lesion(EX, Quadrant.INFERO_NASAL, None)], None),
]


@pytest.mark.parametrize(("case", "lesions", "risk"), EDEMA_TABLE)
def test_macular_edema_risk_is_exudates_within_one_disc_diameter(case, lesions, risk) -> None:
    result = assess(_findings(lesions))
    assert result.macular_edema_risk is risk, case
    if risk:
        assert result.referral == findings.Referral.REFERABLE


@pytest.mark.parametrize(
    ("cdr", "suspect", "word"),
    [
        (None, None, "not assessed"),
        (0.45, False, "no glaucoma"),
        (CDR_SUSPECT, True, "suspect:"),
        (0.65, True, "suspect:"),
        (CDR_HIGH, True, "(high)"),
        (0.85, True, "(high)"),
    ],
)
def test_glaucoma_suspicion_from_the_vertical_cdr(cdr, suspect, word) -> None:
    result = assess(_findings([], disc=findings.Disc(cdr_vertical=cdr)))
    assert result.glaucoma_suspect is suspect
    assert any(word in reason for reason in result.reasons)


def test_quality_and_missing_lesions_are_said_plainly() -> None:
    reject = _findings([_lesion(HE, Quadrant.INFERO_NASAL, 2.0)])
    reject.quality = findings.Quality(grade=findings.QualityGrade.REJECT, reasons=["blurred"])
    result = assess(reject)
    assert result.dr_grade is None and result.referral is None
    assert any("blurred" in c and "re-take" in c for c in result.caveats)
    usable = _findings([])
    usable.quality = findings.Quality(grade=findings.QualityGrade.USABLE)
    assert any("microaneurysms" in c for c in assess(usable).caveats)
    unmeasured = assess(findings.Findings())
    assert unmeasured.dr_grade is None and unmeasured.macular_edema_risk is None
    assert any("no lesion type was assessed" in r for r in unmeasured.reasons)


@pytest.mark.parametrize(
    ("fov_diameter", "warned"), [(540.0, True), (999.0, True), (1800.0, False)]
)
def test_a_small_field_of_view_is_a_caveat_not_a_rejection(fov_diameter, warned) -> None:
    result = _findings([_lesion(MA, Quadrant.SUPERO_NASAL, 2.0)])
    result.image = findings.ImageInfo(
        field_of_view=findings.FieldOfView(radius=fov_diameter / 2), width=2000, height=2000
    )
    assessment = assess(result)
    assert assessment.dr_grade == 1  # still graded
    low = [c for c in assessment.caveats if c.startswith("low resolution")]
    assert bool(low) is warned
    if warned:
        assert f"{fov_diameter:.0f} px" in low[0]


# --- the network input -------------------------------------------------------------------


def test_local_contrast_removes_the_illumination_gradient_and_keeps_a_small_dark_spot() -> None:
    size, radius, spot = 400, 180, (200, 250)  # spot (y, x)
    ys, xs = np.mgrid[0:size, 0:size]
    fov = (xs - 200) ** 2 + (ys - 200) ** 2 <= radius**2
    green = 60.0 + 100.0 * xs / size  # lit from the right
    near_spot = (xs - spot[1]) ** 2 + (ys - spot[0]) ** 2
    green[near_spot <= 9] -= 40.0
    rgb = np.stack([1.5 * green, green, 0.3 * green], axis=-1).clip(0, 255).astype(np.uint8)
    out = standardise(rgb * fov[..., None], fov, float(radius))
    assert out.shape == (INPUT_CHANNELS, size, size) and out.dtype == np.float32
    assert not out[:, ~fov].any()
    standardised_green, contrast_green = out[1], out[4]
    # The plain z-score's darkest pixel is on the dim left rim, not the spot; the contrast
    # channel's is the spot, and away from it the gradient is gone (the rim included): what
    # is left there is the 8-bit quantisation, far below the spot.
    darkest = np.unravel_index(np.argmin(np.where(fov, standardised_green, np.inf)), fov.shape)
    assert darkest[1] < 100
    assert near_spot[np.unravel_index(np.argmin(contrast_green), fov.shape)] <= 9
    elsewhere = np.abs(contrast_green[fov & (near_spot > 30**2)])
    assert np.percentile(elsewhere, 99) < -contrast_green[spot] / 20


# --- model files -------------------------------------------------------------------------


def _tiny_model(path: Path, task: str = TASK, **manifest: object) -> dict:
    net = VesselUNet(INPUT_CHANNELS, (4, 8), 4)
    return save_with_manifest(
        net.state_dict(),
        path,
        {
            "name": "lesion-test",
            "version": "0",
            "task": task,
            "architecture": {"in_channels": INPUT_CHANNELS, "widths": [4, 8], "classes": 4},
            **manifest,
        },
    )


def test_the_detector_verifies_the_manifest_sha256(tmp_path: Path) -> None:
    weights = tmp_path / "lesion.safetensors"
    manifest = _tiny_model(weights)
    detector = LesionDetector.load(weights, threads=1)
    assert detector.manifest["sha256"] == manifest["sha256"]
    result = detect(detector, np.zeros((40, 60, 3), np.uint8), findings.ImageInfo())
    assert [c.type for c in result.counts] == list(LesionType)  # a black image is searched too
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        LesionDetector.load(weights)
    _tiny_model(weights, task="vessel-segmentation")
    with pytest.raises(ValueError, match="not 'lesion-segmentation'"):
        LesionDetector.load(weights)


@pytest.mark.parametrize(("flips", "dims"), [(1, ()), (2, (3,)), (4, (2, 3))])
def test_test_time_flips_make_the_maps_mirror_with_the_image(
    tmp_path: Path, flips: int, dims: tuple[int, ...]
) -> None:
    weights = tmp_path / "lesion.safetensors"
    _tiny_model(weights)
    detector = LesionDetector.load(weights, threads=1, precision="fp32", test_time_flips=flips)
    inputs = torch.randn(1, INPUT_CHANNELS, 48, 64, generator=torch.Generator().manual_seed(0))
    maps = detector.probabilities(inputs)
    assert maps.shape == (4, 48, 64)
    for mirror in ((3,), (2,)):  # left-right, then upside down
        mirrored = detector.probabilities(inputs.flip(mirror)).flip([d - 1 for d in mirror])
        # Averaging over a flip makes the maps follow that flip of the image, and only then.
        assert torch.allclose(mirrored, maps, atol=1e-5) is (mirror[0] in dims)


def test_a_rescaled_grid_keeps_the_crop_and_the_fov_and_is_coarser() -> None:
    grid = WorkGrid.around(
        FovEstimate(2100.0, 1420.0, 1400.0, (700, 20, 3500, 2820), 0.8), 4288, 2848
    )
    coarse = grid.rescaled(0.75)
    assert (coarse.x0, coarse.y0, coarse.x1, coarse.y1) == (grid.x0, grid.y0, grid.x1, grid.y1)
    assert coarse.shape == (round(grid.shape[0] * 0.75), round(grid.shape[1] * 0.75))
    assert coarse.to_input(coarse.fov_x, coarse.fov_y) == pytest.approx((2100.0, 1420.0))
    assert coarse.fov_mask().sum() / grid.fov_mask().sum() == pytest.approx(0.75**2, rel=1e-2)


def test_test_time_scales_average_a_coarser_pass_resized_onto_the_working_grid(
    tmp_path: Path,
) -> None:
    weights = tmp_path / "lesion.safetensors"
    _tiny_model(weights)
    rgb = _fundus_with_lesions(findings.Laterality.RIGHT).rgb
    plain = LesionDetector.load(weights, threads=1, precision="fp32")
    both = LesionDetector.load(weights, threads=1, precision="fp32", test_time_scales=(1.0, 0.5))
    one, two = plain.predict(rgb), both.predict(rgb)
    assert two.grid == one.grid
    coarse = plain.on_grid(rgb, one.grid.rescaled(0.5), one.grid.shape).numpy()
    assert coarse.shape == one.probabilities.shape
    expected = (one.probabilities + coarse * one.grid.fov_mask()) / 2
    np.testing.assert_allclose(two.probabilities, expected, atol=1e-5)
    assert not np.allclose(two.probabilities, one.probabilities, atol=1e-3)
    for wrong in ((0.75,), (1.0, 0.1), {"he": (0.5,)}, {"xx": (1.0,)}):
        with pytest.raises(ValueError, match="test_time_scales"):  # 1.0 first, sane, known types
            LesionDetector.load(weights, test_time_scales=wrong)


def test_test_time_scales_per_type_average_only_that_types_passes(tmp_path: Path) -> None:
    weights = tmp_path / "lesion.safetensors"
    _tiny_model(weights)
    rgb = _fundus_with_lesions(findings.Laterality.LEFT).rgb
    plain = LesionDetector.load(weights, threads=1, precision="fp32")
    chosen = {"ma": (1.0, 0.5), "he": (1.0, 0.75, 0.5), "ex": (1.0, 1.5)}  # SE left out
    mixed = LesionDetector.load(weights, threads=1, precision="fp32", test_time_scales=chosen)
    assert mixed.test_time_scales == {**chosen, "se": (1.0,)}
    one, per_type = plain.predict(rgb), mixed.predict(rgb)
    grid, inside = one.grid, one.grid.fov_mask()
    # The 912-px photograph is already enlarged MAX_UPSCALE times: EX's finer grid is skipped.
    assert grid.scale == MAX_UPSCALE
    passes = {
        f: plain.on_grid(rgb, grid.rescaled(f), grid.shape).numpy() * inside for f in (0.5, 0.75)
    }
    expected = one.probabilities.copy()
    expected[0] = (one.probabilities[0] + passes[0.5][0]) / 2
    expected[1] = (one.probabilities[1] + passes[0.75][1] + passes[0.5][1]) / 3
    np.testing.assert_allclose(per_type.probabilities, expected, atol=1e-5)
    assert not np.allclose(per_type.probabilities[:2], one.probabilities[:2], atol=1e-3)


def _context_model(path: Path) -> None:
    """A tiny context model: other weights than _tiny_model's, trained a quarter as fine."""
    torch.manual_seed(1)
    net = VesselUNet(INPUT_CHANNELS, (4, 8), 4)
    architecture = {"in_channels": INPUT_CHANNELS, "widths": [4, 8], "classes": 4}
    save_with_manifest(
        net.state_dict(),
        path,
        {
            "name": "lesion-context-test",
            "version": "0",
            "task": TASK,
            "architecture": {**architecture, "grid_scale": 0.25},
        },
    )


def test_a_context_model_s_map_weighs_its_share_of_the_types_the_manifest_names(
    tmp_path: Path,
) -> None:
    weights, context = tmp_path / "lesion.safetensors", tmp_path / "context.safetensors"
    _tiny_model(weights, context={"weights": context.name, "shares": {"he": 0.25, "se": 1.0}})
    _context_model(context)
    rgb = _fundus_with_lesions(findings.Laterality.RIGHT).rgb
    fused = LesionDetector.load(weights, threads=1, precision="fp32")
    assert fused.context is not None and fused.context.grid_scale == 0.25
    assert fused.context_shares == {"ma": 0.0, "he": 0.25, "ex": 0.0, "se": 1.0}
    alone = tmp_path / "alone.safetensors"  # the same network, its manifest naming no context
    alone.write_bytes(weights.read_bytes())
    manifest = json.loads(weights.with_suffix(".json").read_text())
    del manifest["context"]
    alone.with_suffix(".json").write_text(json.dumps(manifest))
    plain = LesionDetector.load(alone, threads=1, precision="fp32").predict(rgb)
    maps = fused.predict(rgb)
    grid = plain.grid
    quarter = fused.context.on_grid(rgb, grid.rescaled(0.25), grid.shape).numpy()
    quarter *= grid.fov_mask()
    assert quarter.shape == plain.probabilities.shape
    expected = plain.probabilities.copy()
    expected[1] = 0.75 * plain.probabilities[1] + 0.25 * quarter[1]
    expected[3] = quarter[3]
    np.testing.assert_allclose(maps.probabilities, expected, atol=1e-5)
    assert not np.allclose(maps.probabilities[1], plain.probabilities[1], atol=1e-3)
    # Shares given to load win over the manifest's; unknown types and shares over 1 are refused.
    mine = LesionDetector.load(weights, threads=1, precision="fp32", context_shares={"ex": 0.5})
    assert mine.context_shares == {"ma": 0.0, "he": 0.0, "ex": 0.5, "se": 0.0}
    for wrong in ({"xx": 0.5}, {"he": 1.5}):
        with pytest.raises(ValueError, match="context shares"):
            LesionDetector.load(weights, threads=1, context_shares=wrong)


def test_a_missing_or_altered_context_model_stops_the_detector_loading(tmp_path: Path) -> None:
    weights, context = tmp_path / "lesion.safetensors", tmp_path / "context.safetensors"
    _tiny_model(weights, context={"weights": context.name, "shares": {"he": 0.5}})
    with pytest.raises(ModelIntegrityError, match="model files missing"):
        LesionDetector.load(weights, threads=1)
    _context_model(context)
    blob = bytearray(context.read_bytes())
    blob[-1] ^= 0xFF
    context.write_bytes(bytes(blob))
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        LesionDetector.load(weights, threads=1)


def test_finer_grids_are_kept_only_up_to_the_largest_enlargement() -> None:
    fov = FovEstimate(2100.0, 1420.0, 1400.0, (700, 20, 3500, 2820), 0.8)
    idrid = WorkGrid.around(fov, 4288, 2848)  # about half the photograph's resolution
    assert within_upscale((1.0, 0.75, 1.5), idrid) == (1.0, 0.75, 1.5)
    small = WorkGrid.around(FovEstimate(280.0, 290.0, 270.0, (10, 20, 550, 560), 0.8), 565, 584)
    assert small.scale == MAX_UPSCALE  # a DRIVE-sized photograph, enlarged as far as allowed
    assert within_upscale((1.0, 1.5, 0.5), small) == (1.0, 0.5)


def test_bench_scales_options_set_every_type_or_one() -> None:
    options = [scales_option("1,0.75"), scales_option("ma=1,1.5"), scales_option("he=1,0.75,0.5")]
    assert scales(options) == {
        "ma": (1.0, 1.5),
        "he": (1.0, 0.75, 0.5),
        "ex": (1.0, 0.75),
        "se": (1.0, 0.75),
    }
    assert scales([]) == dict.fromkeys(("ma", "he", "ex", "se"), (1.0,))
    with pytest.raises(argparse.ArgumentTypeError, match="not one of"):
        scales_option("xx=1,0.5")


def test_the_committed_manifest_matches_its_weights() -> None:
    manifest = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert manifest["task"] == TASK
    assert set(manifest["thresholds"]) == {"ma", "he", "ex", "se"}
    LesionDetector.load(DEFAULT_WEIGHTS, threads=1)  # raises on a mismatch


# --- Detect over real gRPC ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lesion_address(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    env = {**os.environ, "RETINAL_LESION_PORT": str(port)}
    service = ServiceProcess("lesion", env, tmp_path_factory.mktemp("lesion") / "lesion.log")
    service.start()
    try:
        wait_until(lambda: grpc_serving(f"127.0.0.1:{port}"), 30, "lesion SERVING")
        yield f"127.0.0.1:{port}"
    finally:
        service.stop()


def _request(fundus, masks: list[str], overlays: tuple[str, ...] = ()) -> lesion_pb2.DetectRequest:
    size = fundus.spec.size
    info = findings.ImageInfo(width=size, height=size, laterality=fundus.laterality)
    anatomy = findings.Findings(
        disc=findings.Disc(
            center=findings.Point(x=fundus.disc_center[0], y=fundus.disc_center[1]),
            disc_diameter_px=fundus.disc_diameter_px,
            cdr_vertical=0.72,
        ),
        fovea=findings.Fovea(
            center=findings.Point(x=fundus.fovea_center[0], y=fundus.fovea_center[1])
        ),
    )
    return lesion_pb2.DetectRequest(
        image=pixels.to_message(fundus.rgb, info),
        anatomy=to_proto(anatomy, findings_pb2.Findings),
        masks=masks,
        overlays=overlays,
    )


def test_detect_over_grpc_returns_lesions_masks_and_assessment(lesion_address: str) -> None:
    fundus = _fundus_with_lesions(findings.Laterality.RIGHT)
    with grpc.insecure_channel(lesion_address) as channel:
        stub = lesion_pb2_grpc.LesionServiceStub(channel)
        reply = stub.Detect(_request(fundus, ["ex", "he"], ("lesions", "se")), timeout=60)
        with pytest.raises(grpc.RpcError) as error:
            stub.Detect(_request(fundus, ["vessels"]), timeout=60)
        with pytest.raises(grpc.RpcError) as overlay_error:
            stub.Detect(_request(fundus, [], ("vessels",)), timeout=60)
        cards = stub.ListModels(common_pb2.ListModelsRequest(), timeout=10).models
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert overlay_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown overlay layers" in overlay_error.value.details()
    assert [o.layer for o in reply.overlays] == ["lesions", "se"]
    for overlay in reply.overlays:
        assert Image.open(io.BytesIO(overlay.png)).size == fundus.rgb.shape[1::-1]
    manifests = [
        json.loads(weights.with_suffix(".json").read_text())
        for weights in (DEFAULT_WEIGHTS, CONTEXT_WEIGHTS)
    ]
    assert [(c.name, c.sha256, c.task) for c in cards] == [
        (m["name"], m["sha256"], TASK) for m in manifests
    ]
    assert [m.sha256 for m in reply.models] == [m["sha256"] for m in manifests]
    reported = reported_lesion_types()
    order = ["ma", "he", "ex", "se"]
    assert [c.type for c in reply.counts] == [order.index(r) + 1 for r in reported]
    assert len(reply.masks) == len({"ex", "he"} & set(reported))  # unreported: no mask
    for mask in reply.masks:
        plane = np.asarray(Image.open(io.BytesIO(mask.png)))
        assert plane.shape == fundus.rgb.shape[:2]
        assert set(np.unique(plane)) <= {0, 255}
    assert reply.assessment.glaucoma_suspect  # CDR 0.72 in the anatomy
    assert "lesion_maps" in reply.timings_ms
    for lesion in reply.lesions:
        box = lesion.box
        assert 0 <= box.x_min <= box.x_max <= 1 and 0 <= box.y_min <= box.y_max <= 1
        assert lesion.position.quadrant != findings_pb2.QUADRANT_UNSPECIFIED
        assert lesion.position.HasField("distance_to_fovea_dd")


def test_boxes_on_the_fov_crop_are_shifted_into_the_original_image() -> None:
    info = findings.ImageInfo(
        width=4000,
        height=3000,
        field_of_view=findings.FieldOfView(crop_x0=300, crop_y0=20, crop_x1=3700, crop_y1=2980),
    )
    rgb = np.zeros((2960, 3400, 3), np.uint8)
    offset, size = original_frame(info, rgb)
    assert (offset, size) == ((300, 20), (4000, 3000))
    (lesion,) = to_findings([Instance(EX, (100, 200, 140, 230), 900.0, 0.8)], offset, size)
    assert box_to_px(lesion.box, size) == (400, 220, 440, 250)


def test_overlays_draw_each_type_and_masks_are_0_255() -> None:
    rgb = np.full((60, 80, 3), 90, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:20, 30:40] = True
    boxes = [Instance(HE, (30, 10, 40, 20), 100.0, 0.9)]
    for layer in LAYERS:
        image = Image.open(io.BytesIO(render(rgb, {HE: mask}, boxes, layer)))
        assert image.size == (80, 60)
        drawn = np.asarray(image)
        assert (drawn[15, 35] != 90).any() == (layer in ("he", "lesions"))
    plane = np.asarray(Image.open(io.BytesIO(mask_png(mask))))
    assert plane.dtype == np.uint8 and set(np.unique(plane)) == {0, 255}
    with pytest.raises(ValueError, match="unknown lesion layer"):
        render(rgb, {}, [], "vessels")


# --- types the model does not report are "not assessed", never "none found" ---------------


def _partially_assessed(lesions: list[findings.Lesion], assessed: set[LesionType]):
    result = _findings(lesions)
    result.lesion_counts = [c for c in result.lesion_counts if c.type in assessed]
    return result


@pytest.mark.parametrize(
    ("case", "lesions", "assessed", "grade", "edema"),
    [
        ("nothing found, MA not assessed", [], {HE, EX, SE}, None, False),
        ("nothing found, EX not assessed", [], {MA, HE, SE}, None, None),
        (
            "a haemorrhage, MA not assessed",
            [_lesion(HE, Quadrant.INFERO_NASAL, 3.0)],
            {HE, EX},
            2,
            False,
        ),
        ("MA only, HE not assessed", [_lesion(MA, Quadrant.SUPERO_NASAL, 2.0)], {MA, EX}, 1, False),
    ],
)
def test_unassessed_types_are_never_read_as_absent(case, lesions, assessed, grade, edema) -> None:
    result = assess(_partially_assessed(lesions, assessed))
    assert result.dr_grade == grade, case
    assert result.macular_edema_risk is edema, case
    said = " ".join([*result.reasons, *result.caveats])
    plural = {MA: "microaneurysms", HE: "haemorrhages", EX: "hard exudates", SE: "cotton-wool"}
    for kind in set(LesionType) - assessed:
        assert f"{plural[kind]}" in said and "not assessed" in said, case


def test_the_detector_reports_only_the_types_its_manifest_lists(tmp_path: Path) -> None:
    manifest = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    manifest["reported_types"] = ["he", "ex"]
    manifest["thresholds"] = {"ma": 0.3, "he": 0.4, "ex": 0.6, "se": 0.5}
    detector = LesionDetector.load()
    detector.manifest = manifest
    assert detector.reported_types() == (HE, EX)
    assert detector.thresholds() == {HE: 0.4, EX: 0.6}
    fundus = _fundus_with_lesions(findings.Laterality.RIGHT)
    info = findings.ImageInfo(width=fundus.spec.size, height=fundus.spec.size)
    result = detect(detector, fundus.rgb, info, mask_types=tuple(LesionType))
    assert [c.type for c in result.counts] == [HE, EX]
    assert set(result.masks) == {HE, EX}
    assert {lesion.type for lesion in result.lesions} <= {HE, EX}


# --- the benchmark's metrics -------------------------------------------------------------


def test_bench_aupr_and_f1_from_level_counts_match_sklearn_on_the_scores() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random(5000) < 0.1
    scores = np.clip(rng.normal(0.3 + 0.4 * truth, 0.2), 0, 1)
    levels = np.round(scores * LEVELS).astype(np.int64)
    positives = np.bincount(levels[truth], minlength=LEVELS + 1)
    negatives = np.bincount(levels[~truth], minlength=LEVELS + 1)
    assert aupr(positives, negatives) == pytest.approx(average_precision_score(truth, levels))
    threshold, f1 = best_f1_threshold(positives, negatives)
    called = levels >= round(threshold * LEVELS)
    tp = (called & truth).sum()
    assert f1 == pytest.approx(2 * tp / (called.sum() + truth.sum()))
    assert 0.3 < threshold < 0.7  # between the two classes' means


def test_the_manifest_reports_types_by_their_mean_fold_aupr(tmp_path: Path) -> None:
    """Haemorrhages clear the floor in each fold but not pooled (two models' scales mixed):
    they are reported. Cotton-wool spots fall short in one fold and on average: not reported."""
    floor = REPORTING_FLOOR
    per_fold = {
        "ma": (floor["ma"] + 0.1, floor["ma"] + 0.2),
        "he": (floor["he"] + 0.01, floor["he"] + 0.1),
        "ex": (floor["ex"] + 0.3, floor["ex"] + 0.3),
        "se": (floor["se"] - 0.2, floor["se"] + 0.1),
    }
    pooled = {"ma": floor["ma"] + 0.1, "he": floor["he"] - 0.05, "ex": 0.8, "se": 0.3}
    report = {
        "cross_validation": {"folds_run": {"0": [], "1": []}, "held_out_images": 10},
        "per_type": {
            name: {
                "aupr": pooled[name],
                "aupr_per_fold": dict(zip(("0", "1"), folds, strict=True)),
                "aupr_mean_over_folds": sum(folds) / 2,
                "best_f1_threshold": 0.2,
                "lesions": {"sensitivity_at_2_fp": 0.1},
            }
            for name, folds in per_fold.items()
        },
    }
    weights = tmp_path / "lesion-unet.safetensors"
    weights.with_suffix(".json").write_text(json.dumps({"name": "lesion-unet"}))
    update_manifest(weights, report)
    manifest = json.loads(weights.with_suffix(".json").read_text())
    assert manifest["reported_types"] == ["ma", "he", "ex"]
    assert manifest["metrics"]["aupr"]["he"] == pooled["he"]
    assert manifest["thresholds"] == dict.fromkeys(per_fold, 0.5)  # never below 0.5
    assert "context" not in manifest
    shares = shares_option("he=0.5")
    update_manifest(weights, {**report, "context_shares": shares})
    manifest = json.loads(weights.with_suffix(".json").read_text())
    assert manifest["context"] == {"weights": CONTEXT_WEIGHTS.name, "shares": shares}
    update_manifest(weights, report)  # a run without a context model drops it
    assert "context" not in json.loads(weights.with_suffix(".json").read_text())


def test_bench_context_shares_option() -> None:
    assert shares_option("he=0.5,se=0.25") == {"ma": 0.0, "he": 0.5, "ex": 0.0, "se": 0.25}
    for wrong in ("he", "he=x", "xx=0.5", "he=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            shares_option(wrong)


def test_the_single_pass_setting_overrides_the_manifest_s_grids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "lesion.safetensors"
    _tiny_model(weights, test_time_scales={"he": [1.0, 0.5]})
    assert LesionSettings().test_time_scales is None
    manifest_s = LesionDetector.load(weights, test_time_scales=LesionSettings().test_time_scales)
    assert manifest_s.test_time_scales["he"] == (1.0, 0.5)
    monkeypatch.setenv("RETINAL_LESION_SINGLE_PASS", "true")
    scales = LesionSettings().test_time_scales
    single = LesionDetector.load(weights, test_time_scales=scales)
    assert set(single.test_time_scales.values()) == {(1.0,)}
