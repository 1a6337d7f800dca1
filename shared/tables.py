"""One row per image for tables (CSV): AutoMorph's column names first, then ours.

`retinal analyze --csv` and a batch's results.csv write the same columns from the same
findings, so a table from either can be joined with AutoMorph's.
"""

from __future__ import annotations

from services.analysis.features import AUTOMORPH_COLUMNS, EXTRA_COLUMNS, Measurements
from shared import findings

LESION_COLUMNS = tuple(
    f"{short}_{what}"
    for short in findings.LESION_SHORT_NAMES.values()
    for what in ("count", "area_px")
)
CSV_COLUMNS = (
    "source",
    "quality",
    "error",
    *AUTOMORPH_COLUMNS,
    *EXTRA_COLUMNS,
    *LESION_COLUMNS,
    "dr_grade",
    "referable",
)


def columns(found: findings.Findings) -> dict[str, float | None]:
    """The AutoMorph-named columns of one image's findings (empty when nothing was measured)."""
    if found.vessels is None or found.disc is None:
        return {}
    pixel_size = None
    if found.vessels.length_unit == findings.LengthUnit.MICROMETER and found.image:
        pixel_size = found.image.calibration.pixel_size_um if found.image.calibration else None
    measured = Measurements(
        vessels=found.vessels,
        disc=found.disc,
        fovea=found.fovea.center if found.fovea else None,
        pixel_size_um=pixel_size,
        canonical_scale=1.0,  # not used for columns
    )
    return measured.columns()


def lesion_columns(found: findings.Findings) -> dict[str, float | int | str | None]:
    """Counts and areas (input pixels) per lesion type, and the DR grade estimate."""
    row: dict[str, float | int | str | None] = {}
    for count in found.lesion_counts:
        if count.type is not None:
            short = findings.LESION_SHORT_NAMES[count.type]
            row[f"{short}_count"] = count.count
            row[f"{short}_area_px"] = count.total_area_px
    if found.assessment is not None:
        row["dr_grade"] = found.assessment.dr_grade
        referral = found.assessment.referral
        row["referable"] = None if referral is None else referral == findings.Referral.REFERABLE
    return row


def row(found: findings.Findings) -> dict[str, float | int | str | None]:
    """Every column of one analysed image but `source` and `error`."""
    grade = found.quality.grade.value if found.quality and found.quality.grade else None
    return {"quality": grade, **columns(found), **lesion_columns(found)}
