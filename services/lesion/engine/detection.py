"""One Detect call's work: maps -> instances -> findings lesions, counts, masks, assessment.

Boxes are found on the image the service received (the FOV crop of the photograph), shifted by
the crop offset (ImageInfo.field_of_view.crop_x0/crop_y0) and normalized by the ORIGINAL
size (ImageInfo.width/height), so they are in RetinalGPT's convention for the original
photograph, like the analysis findings' disc and fovea (see shared/lesion_positions.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from services.analysis.engine.model_files import model_version
from services.lesion.engine.detector import TYPES, LesionDetector, LesionMaps
from services.lesion.engine.instances import Instance, extract
from shared import findings
from shared.assessment import assess
from shared.imaging.errors import ImageRejected
from shared.imaging.fov import FovEstimate, detect_field_of_view, whole_image_fov
from shared.lesion_positions import box_to_norm, position_lesions

DEFAULT_MAX_PER_TYPE = 100  # > 4 x 20 so the severe-NPDR haemorrhage rule stays decidable


@dataclass
class Detection:
    lesions: list[findings.Lesion]
    counts: list[findings.LesionCount]
    assessment: findings.Assessment
    instances: list[Instance]  # the lesions' boxes in the received image's pixels
    masks: dict[findings.LesionType, np.ndarray] = field(default_factory=dict)  # bool, input size
    timings_ms: dict[str, float] = field(default_factory=dict)


def input_masks(
    maps: LesionMaps,
    thresholds: dict[findings.LesionType, float],
    shape: tuple[int, int],
    types: tuple[findings.LesionType, ...],
) -> dict[findings.LesionType, np.ndarray]:
    """Bool masks of `types` on the received image's grid (zero outside the FOV crop); a type
    without a threshold (not reported) has no mask."""
    grid = maps.grid
    masks = {}
    for lesion_type in types:
        if lesion_type not in thresholds:
            continue
        channel = TYPES.index(lesion_type)
        plane = (np.clip(maps.probabilities[channel], 0, 1) * 255).astype(np.uint8)
        size = (grid.x1 - grid.x0, grid.y1 - grid.y0)
        resized = np.asarray(Image.fromarray(plane).resize(size, Image.Resampling.BILINEAR))
        full = np.zeros(shape, dtype=bool)
        full[grid.y0 : grid.y1, grid.x0 : grid.x1] = resized >= thresholds[lesion_type] * 255
        masks[lesion_type] = full
    return masks


def original_frame(
    info: findings.ImageInfo, rgb: np.ndarray
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(crop offset, original (width, height)) of the received pixels."""
    fov = info.field_of_view
    offset = (fov.crop_x0, fov.crop_y0) if fov is not None else (0, 0)
    if info.width > 0 and info.height > 0:
        return offset, (info.width, info.height)
    return (0, 0), (rgb.shape[1], rgb.shape[0])


def field_of_view(rgb: np.ndarray, info: findings.ImageInfo) -> FovEstimate:
    """The FOV in the received pixels: the gateway's (shifted by its crop), else detected.

    An image without a detectable FOV (black, or all retina) is searched whole rather than
    refused: the gateway has already judged it worth analysing.
    """
    fov = info.field_of_view
    height, width = rgb.shape[:2]
    if fov is not None and fov.radius > 0:
        box = (0, 0, width, height)
        x, y = fov.center_x - fov.crop_x0, fov.center_y - fov.crop_y0
        return FovEstimate(x, y, fov.radius, box, fov.coverage)
    try:
        return detect_field_of_view(rgb)
    except ImageRejected:
        return whole_image_fov(width, height)


def to_findings(
    instances: list[Instance], offset: tuple[int, int], size: tuple[int, int]
) -> list[findings.Lesion]:
    dx, dy = offset
    return [
        findings.Lesion(
            type=i.type,
            box=box_to_norm((i.box[0] + dx, i.box[1] + dy, i.box[2] + dx, i.box[3] + dy), size),
            area_px=round(i.area_px, 1),
            confidence=round(i.confidence, 4),
        )
        for i in instances
    ]


def detect(
    detector: LesionDetector,
    rgb: np.ndarray,
    info: findings.ImageInfo,
    anatomy: findings.Findings | None = None,
    mask_types: tuple[findings.LesionType, ...] = (),
    max_per_type: int = DEFAULT_MAX_PER_TYPE,
) -> Detection:
    """Lesions of one image, positioned and assessed with whatever anatomy is known."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    maps = detector.predict(rgb, field_of_view(rgb, info))
    timings["lesion_maps"] = (time.perf_counter() - start) * 1000
    thresholds = detector.thresholds()
    instances, totals = extract(maps, thresholds, max_per_type)
    offset, size = original_frame(info, rgb)
    # The image's own facts (laterality, FOV) place quadrants even without the analysis.
    known = anatomy or findings.Findings()
    if known.image is None:
        known = known.model_copy(update={"image": info})
    lesions = position_lesions(to_findings(instances, offset, size), known, size)
    counts = [  # reported types only: an absent type was not assessed, not found absent
        findings.LesionCount(type=t, count=totals[t][0], total_area_px=round(totals[t][1], 1))
        for t in TYPES
        if t in totals
    ]
    assessment = assess(known.model_copy(update={"lesions": lesions, "lesion_counts": counts}))
    masks = input_masks(maps, thresholds, rgb.shape[:2], mask_types)
    timings["lesion_total"] = (time.perf_counter() - start) * 1000
    return Detection(lesions, counts, assessment, instances, masks, timings)


def model_versions(detector: LesionDetector) -> list[findings.ModelVersion]:
    """The lesion network's and its context model's."""
    return [model_version(m) for m in detector.manifests]


def merged(
    result: findings.Findings, detection: Detection, detector: LesionDetector
) -> findings.Findings:
    """The analysis findings with this detection's lesions, counts and assessment added."""
    return result.model_copy(
        update={
            "lesions": detection.lesions,
            "lesion_counts": detection.counts,
            "assessment": detection.assessment,
            "models": [*result.models, *model_versions(detector)],
            "timings_ms": {
                **result.timings_ms,
                **{f"lesion.{k}": round(v, 1) for k, v in detection.timings_ms.items()},
            },
            "stages": [
                *result.stages,
                findings.StageStatus(stage="lesion", state=findings.StageState.OK),
            ],
        }
    )
