"""Lesion boxes in RetinalGPT's convention, and lesion positions relative to the anatomy.

Coordinates. Boxes are `[x_min, y_min, x_max, y_max]` normalized by the ORIGINAL image's
width and height (ImageInfo.width/height) and rounded to 4 decimals; pixel boxes are
end-exclusive (a one-pixel lesion at column x spans x..x+1). The services see the FOV crop of
the photograph (ImageInfo.field_of_view.crop_x0/crop_y0 is its offset), so a box found on the
crop is shifted by that offset before it is normalized. The analysis findings' disc and fovea
centres are already in original pixels. A 4-decimal box maps back to the same integer pixels
for images up to 10,000 px wide (rounding error <= 0.00005 x size < 0.5 px).

Positions (all measured in original pixels, distances in disc diameters, DD):
- distance_to_fovea_dd / distance_to_disc_dd: from the fovea / disc centre to the nearest point
  of the lesion's box (0 when the box covers the centre), so a large exudate reaching into the
  macula is near it even when its own centre is not;
- in_macula: within `MACULA_RADIUS_DD` (1 DD) of the fovea, the central zone that the ETDRS
  and ICDR macular-edema rules use;
- quadrant: around the fovea (else the FOV centre, else the image centre); superior is up in
  the photograph, temporal is the side away from the disc (else from laterality: a right eye's
  disc is on the image's right).
The disc diameter is Disc.disc_diameter_px, else the larger of the disc's height and width in
pixels, else 1800 um over the calibrated pixel size; without any, distances are absent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shared import findings

MACULA_RADIUS_DD = 1.0
TYPICAL_DISC_DIAMETER_UM = 1800.0
PixelBox = tuple[int, int, int, int]  # x0, y0, x1, y1, end exclusive


def box_to_norm(box: PixelBox, image_size: tuple[int, int]) -> findings.Box:
    """Pixel box (original image) -> normalized Box, clipped to [0, 1], 4 decimals."""
    width, height = image_size
    x0, y0, x1, y1 = box

    def norm(value: float, size: int) -> float:
        return round(min(max(value / size, 0.0), 1.0), 4)

    return findings.Box(
        x_min=norm(x0, width), y_min=norm(y0, height), x_max=norm(x1, width), y_max=norm(y1, height)
    )


def box_to_px(box: findings.Box, image_size: tuple[int, int]) -> PixelBox:
    """Normalized Box -> pixel box of the original image (nearest integers)."""
    width, height = image_size
    return (
        round(box.x_min * width),
        round(box.y_min * height),
        round(box.x_max * width),
        round(box.y_max * height),
    )


def disc_diameter_px(anatomy: findings.Findings) -> float | None:
    """The disc diameter in original pixels, by the best source available (see module doc)."""
    disc = anatomy.disc
    if disc is not None and disc.disc_diameter_px:
        return disc.disc_diameter_px
    if disc is not None and disc.length_unit == findings.LengthUnit.PIXEL:
        sides = [v for v in (disc.disc_height, disc.disc_width) if v]
        if sides:
            return max(sides)
    calibration = anatomy.image.calibration if anatomy.image else None
    if calibration is not None and calibration.pixel_size_um:
        return TYPICAL_DISC_DIAMETER_UM / calibration.pixel_size_um
    return None


def _distance_to_box(point: findings.Point, box: tuple[float, float, float, float]) -> float:
    x0, y0, x1, y1 = box
    dx = max(x0 - point.x, 0.0, point.x - x1)
    dy = max(y0 - point.y, 0.0, point.y - y1)
    return math.hypot(dx, dy)


def _quadrant_centre(anatomy: findings.Findings, image_size: tuple[int, int]) -> findings.Point:
    if anatomy.fovea is not None and anatomy.fovea.center is not None:
        return anatomy.fovea.center
    fov = anatomy.image.field_of_view if anatomy.image else None
    if fov is not None and fov.radius > 0:
        return findings.Point(x=fov.center_x, y=fov.center_y)
    return findings.Point(x=image_size[0] / 2, y=image_size[1] / 2)


def nasal_sign(anatomy: findings.Findings, centre: findings.Point) -> int | None:
    """+1 when the nasal side is towards larger x, -1 towards smaller x, None if unknown."""
    disc = anatomy.disc
    if disc is not None and disc.center is not None and disc.center.x != centre.x:
        return 1 if disc.center.x > centre.x else -1
    laterality = anatomy.image.laterality if anatomy.image else None
    if laterality == findings.Laterality.RIGHT:
        return 1
    if laterality == findings.Laterality.LEFT:
        return -1
    return None


def quadrant_of(
    x: float, y: float, centre: findings.Point, nasal: int | None
) -> findings.Quadrant | None:
    """Quadrant of a point (original pixels); superior is up, i.e. smaller y."""
    if nasal is None:
        return None
    superior = y < centre.y
    is_nasal = (x - centre.x) * nasal > 0
    return {
        (True, False): findings.Quadrant.SUPERO_TEMPORAL,
        (True, True): findings.Quadrant.SUPERO_NASAL,
        (False, False): findings.Quadrant.INFERO_TEMPORAL,
        (False, True): findings.Quadrant.INFERO_NASAL,
    }[(superior, is_nasal)]


def position_lesions(
    lesions: Sequence[findings.Lesion],
    anatomy: findings.Findings,
    image_size: tuple[int, int],
) -> list[findings.Lesion]:
    """Copies of `lesions` with `position` filled from the anatomy (see the module doc).

    `image_size` is the ORIGINAL image's (width, height), which the boxes are normalized by.
    What the anatomy cannot support stays absent (None), never a guess.
    """
    dd = disc_diameter_px(anatomy)
    fovea = anatomy.fovea.center if anatomy.fovea is not None else None
    disc = anatomy.disc.center if anatomy.disc is not None else None
    centre = _quadrant_centre(anatomy, image_size)
    nasal = nasal_sign(anatomy, centre)
    placed = []
    for lesion in lesions:
        if lesion.box is None:
            placed.append(lesion)
            continue
        width, height = image_size
        box = (
            lesion.box.x_min * width,
            lesion.box.y_min * height,
            lesion.box.x_max * width,
            lesion.box.y_max * height,
        )
        to_fovea = _distance_to_box(fovea, box) / dd if fovea is not None and dd else None
        to_disc = _distance_to_box(disc, box) / dd if disc is not None and dd else None
        position = findings.LesionPosition(
            quadrant=quadrant_of((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, centre, nasal),
            distance_to_fovea_dd=None if to_fovea is None else round(to_fovea, 3),
            distance_to_disc_dd=None if to_disc is None else round(to_disc, 3),
            in_macula=None if to_fovea is None else to_fovea <= MACULA_RADIUS_DD,
        )
        placed.append(lesion.model_copy(update={"position": position}))
    return placed
