"""Pydantic mirror of the findings document (protos/retinal/v1/findings.proto).

The protobuf messages are the contract between services; these models are the same document
for the REST side. Field names are identical; enums drop their proto prefix and are lower case
(`QUALITY_GRADE_GOOD` -> `"good"`), and an UNSPECIFIED enum is `None`. `shared.convert` turns
one into the other.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.0"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False)


class LengthUnit(StrEnum):
    PIXEL = "pixel"
    MICROMETER = "micrometer"


class CalibrationSource(StrEnum):
    DICOM = "dicom"
    REQUEST = "request"
    CAMERA_FOV = "camera_fov"
    DISC_DIAMETER = "disc_diameter"


class Laterality(StrEnum):
    LEFT = "left"
    RIGHT = "right"


class QualityGrade(StrEnum):
    GOOD = "good"
    USABLE = "usable"
    REJECT = "reject"


class VesselType(StrEnum):
    ALL = "all"
    ARTERY = "artery"
    VEIN = "vein"


class Region(StrEnum):
    WHOLE = "whole"
    ZONE_B = "zone_b"
    ZONE_C = "zone_c"


class LesionType(StrEnum):
    MICROANEURYSM = "microaneurysm"
    HAEMORRHAGE = "haemorrhage"
    HARD_EXUDATE = "hard_exudate"
    SOFT_EXUDATE = "soft_exudate"


# Short names of the lesion types: overlay layers, mask files, table columns, manifests.
LESION_SHORT_NAMES = {
    LesionType.MICROANEURYSM: "ma",
    LesionType.HAEMORRHAGE: "he",
    LesionType.HARD_EXUDATE: "ex",
    LesionType.SOFT_EXUDATE: "se",
}


class Quadrant(StrEnum):
    SUPERO_TEMPORAL = "supero_temporal"
    SUPERO_NASAL = "supero_nasal"
    INFERO_TEMPORAL = "infero_temporal"
    INFERO_NASAL = "infero_nasal"


class Referral(StrEnum):
    NOT_REFERABLE = "not_referable"
    REFERABLE = "referable"


class StageState(StrEnum):
    OK = "ok"
    UNAVAILABLE = "unavailable"
    SKIPPED = "skipped"
    FAILED = "failed"


class Calibration(_Model):
    source: CalibrationSource | None = None
    pixel_size_um: float | None = None


class FieldOfView(_Model):
    center_x: float = 0.0
    center_y: float = 0.0
    radius: float = 0.0
    crop_x0: int = 0
    crop_y0: int = 0
    crop_x1: int = 0
    crop_y1: int = 0
    coverage: float = 0.0


class ImageInfo(_Model):
    content_sha256: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    bit_depth: int = 0
    source_mode: str = ""
    calibration: Calibration | None = None
    field_of_view: FieldOfView | None = None
    laterality: Laterality | None = None
    dicom_modality: str = ""


class Quality(_Model):
    grade: QualityGrade | None = None
    probabilities: list[float] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)


class VesselFeatures(_Model):
    vessel_type: VesselType | None = None
    region: Region | None = None
    fractal_dimension: float | None = None
    vessel_density: float | None = None
    average_width: float | None = None
    distance_tortuosity: float | None = None
    squared_curvature_tortuosity: float | None = None
    tortuosity_density: float | None = None
    vessel_count: int | None = None
    branching_angle_deg: float | None = None


class CaliberSummary(_Model):
    region: Region | None = None
    crae_hubbard: float | None = None
    crve_hubbard: float | None = None
    avr_hubbard: float | None = None
    crae_knudtson: float | None = None
    crve_knudtson: float | None = None
    avr_knudtson: float | None = None


class VesselMeasurements(_Model):
    length_unit: LengthUnit | None = None
    features: list[VesselFeatures] = Field(default_factory=list)
    calibers: list[CaliberSummary] = Field(default_factory=list)


class Point(_Model):
    x: float = 0.0
    y: float = 0.0


class Disc(_Model):
    center: Point | None = None
    length_unit: LengthUnit | None = None
    disc_height: float | None = None
    disc_width: float | None = None
    cup_height: float | None = None
    cup_width: float | None = None
    cdr_vertical: float | None = None
    cdr_horizontal: float | None = None
    disc_diameter_px: float | None = None


class Fovea(_Model):
    center: Point | None = None
    confidence: float | None = None
    method: str = ""


class Box(_Model):
    """RetinalGPT's box: [x_min, y_min, x_max, y_max] normalized to [0, 1]."""

    x_min: float = 0.0
    y_min: float = 0.0
    x_max: float = 0.0
    y_max: float = 0.0


class LesionPosition(_Model):
    quadrant: Quadrant | None = None
    distance_to_fovea_dd: float | None = None
    distance_to_disc_dd: float | None = None
    in_macula: bool | None = None


class Lesion(_Model):
    type: LesionType | None = None
    box: Box | None = None
    area_px: float = 0.0
    confidence: float = 0.0
    position: LesionPosition | None = None


class LesionCount(_Model):
    type: LesionType | None = None
    count: int = 0
    total_area_px: float = 0.0


class Assessment(_Model):
    dr_grade: int | None = None
    referral: Referral | None = None
    macular_edema_risk: bool | None = None
    glaucoma_suspect: bool | None = None
    reasons: list[str] = Field(default_factory=list)
    caveats: list[str] = Field(default_factory=list)


class ModelVersion(_Model):
    name: str = ""
    version: str = ""
    sha256: str = ""


class StageStatus(_Model):
    stage: str = ""
    state: StageState | None = None
    detail: str = ""


class Findings(_Model):
    schema_version: str = SCHEMA_VERSION
    image: ImageInfo | None = None
    quality: Quality | None = None
    vessels: VesselMeasurements | None = None
    disc: Disc | None = None
    fovea: Fovea | None = None
    lesions: list[Lesion] = Field(default_factory=list)
    lesion_counts: list[LesionCount] = Field(default_factory=list)
    assessment: Assessment | None = None
    models: list[ModelVersion] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    stages: list[StageStatus] = Field(default_factory=list)
