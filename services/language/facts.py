"""The measured values of a findings document as a flat list of facts.

One list serves both halves of grounding: the prompt states every fact at its precision, and
the checker accepts a number in an answer only when it matches a fact. A fact knows what it
measures (`quantity`, e.g. "crae"), on which vessels and in which region, so that a value of
the vein stated as the artery's is caught even though the number itself was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import findings

UNIT_SYMBOLS = {findings.LengthUnit.PIXEL: "px", findings.LengthUnit.MICROMETER: "µm"}
LESION_NAMES = {
    findings.LesionType.MICROANEURYSM: "microaneurysm",
    findings.LesionType.HAEMORRHAGE: "haemorrhage",
    findings.LesionType.HARD_EXUDATE: "hard exudate",
    findings.LesionType.SOFT_EXUDATE: "cotton-wool spot",
}
REGION_NAMES = {
    findings.Region.WHOLE: "whole image",
    findings.Region.ZONE_B: "zone B",
    findings.Region.ZONE_C: "zone C",
}
# (field, quantity, label, decimals, has a length unit)
_VESSEL_FIELDS = [
    ("fractal_dimension", "fractal_dimension", "fractal dimension", 3, False),
    ("vessel_density", "vessel_density", "vessel density", 4, False),
    ("average_width", "average_width", "average width", 2, True),
    ("distance_tortuosity", "distance_tortuosity", "distance tortuosity", 3, False),
    (
        "squared_curvature_tortuosity",
        "squared_curvature_tortuosity",
        "squared curvature tortuosity",
        4,
        False,
    ),
    ("tortuosity_density", "tortuosity_density", "tortuosity density", 4, False),
    ("vessel_count", "vessel_count", "vessel count", 0, False),
    ("branching_angle_deg", "branching_angle", "mean branching angle", 1, False),
]
_CALIBER_FIELDS = [
    ("crae_hubbard", "crae", "CRAE (Hubbard)", 2, True),
    ("crve_hubbard", "crve", "CRVE (Hubbard)", 2, True),
    ("avr_hubbard", "avr", "AVR (Hubbard)", 3, False),
    ("crae_knudtson", "crae", "CRAE (Knudtson)", 2, True),
    ("crve_knudtson", "crve", "CRVE (Knudtson)", 2, True),
    ("avr_knudtson", "avr", "AVR (Knudtson)", 3, False),
]
_DISC_FIELDS = [
    ("cdr_vertical", "cdr_vertical", "vertical cup-to-disc ratio", 2, False),
    ("cdr_horizontal", "cdr_horizontal", "horizontal cup-to-disc ratio", 2, False),
    ("disc_height", "disc_height", "disc height", 1, True),
    ("disc_width", "disc_width", "disc width", 1, True),
    ("cup_height", "cup_height", "cup height", 1, True),
    ("cup_width", "cup_width", "cup width", 1, True),
]
_VESSEL_WORDS = {
    findings.VesselType.ALL: "",
    findings.VesselType.ARTERY: "arterial ",
    findings.VesselType.VEIN: "venous ",
}
_CRAE_VESSEL = {"crae": findings.VesselType.ARTERY, "crve": findings.VesselType.VEIN}


@dataclass(frozen=True)
class Fact:
    """One measured number, with what it measures and the precision it is stated at."""

    key: str  # its path in the findings document, e.g. "vessels.artery.zone_b.crae_knudtson"
    quantity: str
    label: str
    value: float
    decimals: int
    unit: str = ""  # "px", "µm", "°", "DD" or "" for a ratio or count
    vessel: findings.VesselType | None = None
    region: findings.Region | None = None
    lesion: findings.LesionType | None = None

    @property
    def spoken(self) -> str:
        """How the prompt and a question name it: '<arterial >label< in zone B>'."""
        vessel = (
            _VESSEL_WORDS.get(self.vessel, "")
            if self.vessel and self.quantity not in ("crae", "crve", "avr")
            else ""
        )
        region = (
            f" in {REGION_NAMES[self.region]}"
            if self.region is not None and self.region is not findings.Region.WHOLE
            else ""
        )
        return f"{vessel}{self.label}{region}"

    @property
    def text(self) -> str:
        number = f"{self.value:.{self.decimals}f}"
        return f"{number} {self.unit}" if self.unit else number


@dataclass(frozen=True)
class BoxFact:
    """A lesion's box, stated as [x_min, y_min, x_max, y_max] (normalized, 4 decimals)."""

    key: str
    lesion: findings.LesionType | None
    coordinates: tuple[float, float, float, float]

    @property
    def text(self) -> str:
        return "[" + ", ".join(f"{c:.4f}" for c in self.coordinates) + "]"


def _vessel_facts(vessels: findings.VesselMeasurements) -> list[Fact]:
    unit = UNIT_SYMBOLS.get(vessels.length_unit or findings.LengthUnit.PIXEL, "px")
    facts: list[Fact] = []
    for features in vessels.features:
        if features.vessel_type is None or features.region is None:
            continue
        prefix = f"vessels.{features.vessel_type.value}.{features.region.value}"
        for field, quantity, label, decimals, has_unit in _VESSEL_FIELDS:
            value = getattr(features, field)
            if value is None:
                continue
            field_unit = unit if has_unit else ("°" if quantity == "branching_angle" else "")
            facts.append(
                Fact(
                    f"{prefix}.{field}",
                    quantity,
                    label,
                    float(value),
                    decimals,
                    field_unit,
                    vessel=features.vessel_type,
                    region=features.region,
                )
            )
    for caliber in vessels.calibers:
        if caliber.region is None:
            continue
        for field, quantity, label, decimals, has_unit in _CALIBER_FIELDS:
            value = getattr(caliber, field)
            if value is None:
                continue
            facts.append(
                Fact(
                    f"vessels.calibers.{caliber.region.value}.{field}",
                    quantity,
                    label,
                    float(value),
                    decimals,
                    unit if has_unit else "",
                    vessel=_CRAE_VESSEL.get(quantity),
                    region=caliber.region,
                )
            )
    return facts


def _disc_facts(disc: findings.Disc) -> list[Fact]:
    unit = UNIT_SYMBOLS.get(disc.length_unit or findings.LengthUnit.PIXEL, "px")
    return [
        Fact(f"disc.{field}", quantity, label, float(value), decimals, unit if has_unit else "")
        for field, quantity, label, decimals, has_unit in _DISC_FIELDS
        if (value := getattr(disc, field)) is not None
    ]


def _lesion_facts(result: findings.Findings) -> tuple[list[Fact], list[BoxFact]]:
    facts: list[Fact] = []
    boxes: list[BoxFact] = []
    for count in result.lesion_counts:
        if count.type is None:
            continue
        name = LESION_NAMES[count.type]
        key = f"lesion_counts.{count.type.value}"
        facts.append(
            Fact(f"{key}.count", "lesion_count", f"{name} count", count.count, 0, lesion=count.type)
        )
        facts.append(
            Fact(
                f"{key}.total_area_px",
                "lesion_area",
                f"{name} total area",
                count.total_area_px,
                0,
                "px",
                lesion=count.type,
            )
        )
    for index, lesion in enumerate(result.lesions):
        key = f"lesions[{index}]"
        if lesion.box is not None:
            box = lesion.box
            boxes.append(
                BoxFact(f"{key}.box", lesion.type, (box.x_min, box.y_min, box.x_max, box.y_max))
            )
        facts.append(
            Fact(
                f"{key}.area_px",
                "lesion_area",
                "lesion area",
                lesion.area_px,
                0,
                "px",
                lesion=lesion.type,
            )
        )
        facts.append(
            Fact(
                f"{key}.confidence",
                "confidence",
                "lesion confidence",
                lesion.confidence,
                2,
                lesion=lesion.type,
            )
        )
        position = lesion.position
        if position is None:
            continue
        for field, quantity in (
            ("distance_to_fovea_dd", "fovea_distance"),
            ("distance_to_disc_dd", "disc_distance"),
        ):
            value = getattr(position, field)
            if value is not None:
                facts.append(
                    Fact(
                        f"{key}.position.{field}",
                        quantity,
                        quantity.replace("_", " "),
                        value,
                        1,
                        "DD",
                        lesion=lesion.type,
                    )
                )
    return facts, boxes


def facts_from_findings(result: findings.Findings) -> tuple[list[Fact], list[BoxFact]]:
    """Every measured number of the document (and every lesion box), in reading order."""
    facts: list[Fact] = []
    if result.quality is not None and len(result.quality.probabilities) == 3:
        for grade, probability in zip(
            findings.QualityGrade, result.quality.probabilities, strict=True
        ):
            facts.append(
                Fact(
                    f"quality.probabilities.{grade.value}",
                    "quality_probability",
                    f"probability of quality {grade.value}",
                    probability,
                    2,
                )
            )
    if result.vessels is not None:
        facts.extend(_vessel_facts(result.vessels))
    if result.disc is not None:
        facts.extend(_disc_facts(result.disc))
    if result.fovea is not None and result.fovea.center is not None:
        for axis in ("x", "y"):
            facts.append(
                Fact(
                    f"fovea.center.{axis}",
                    "fovea_position",
                    f"fovea {axis}",
                    getattr(result.fovea.center, axis),
                    0,
                    "px",
                )
            )
    lesion_facts, boxes = _lesion_facts(result)
    facts.extend(lesion_facts)
    if result.assessment is not None and result.assessment.dr_grade is not None:
        facts.append(
            Fact(
                "assessment.dr_grade",
                "dr_grade",
                "DR grade estimate (ICDR)",
                result.assessment.dr_grade,
                0,
            )
        )
    return facts, boxes
