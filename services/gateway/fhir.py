"""An analysis as a FHIR R4 Bundle: one DiagnosticReport and an Observation per measurement.

Built with `fhir.resources`' R4B models, which validate every resource as it is made.
Coding: LOINC where a code means exactly this (the report: 103592-2 "Retinal eye screening
report"; the ICDR levels as LOINC answers LA18643-9..LA18648-8) and SNOMED CT for the eye
(18944008 right eye structure, 8966001 left eye structure); LOINC's cup-disc ratio and DR
severity terms are defined "by Ophthalmoscopy", not a photograph read by software, so those
observations use the project's code system (`CODE_SYSTEM`) instead. Status is `preliminary`:
an automated estimate that no clinician has verified. Numbers are copied as measured, never
rounded again; what was not measured has no Observation.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference

from services.gateway.store import StoredAnalysis
from shared import findings

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
CODE_SYSTEM = "urn:retinalgpt:codes"  # the project's own codes (no standard term fits)
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

REPORT_CODE = Coding(system=LOINC, code="103592-2", display="Retinal eye screening report")
EYE = {
    findings.Laterality.RIGHT: Coding(
        system=SNOMED, code="18944008", display="Right eye structure"
    ),
    findings.Laterality.LEFT: Coding(system=SNOMED, code="8966001", display="Left eye structure"),
}
ICDR_ANSWERS = {
    0: ("LA18643-9", "No apparent retinopathy"),
    1: ("LA18644-7", "Mild non-proliferative retinopathy"),
    2: ("LA18645-4", "Moderate non-proliferative retinopathy"),
    3: ("LA18646-2", "Severe non-proliferative retinopathy"),
    4: ("LA18648-8", "Proliferative retinopathy"),
}
LENGTH_UNITS = {
    findings.LengthUnit.MICROMETER: ("um", "µm"),
    findings.LengthUnit.PIXEL: ("{pixel}", "pixel"),
}


def _code(code: str, display: str) -> CodeableConcept:
    return CodeableConcept(coding=[Coding(system=CODE_SYSTEM, code=code, display=display)])


def _quantity(value: float, unit: findings.LengthUnit | None = None) -> Quantity:
    if unit is None:  # a ratio or a dimensionless index
        return Quantity(value=value, unit="1", system=UCUM, code="1")
    code, shown = LENGTH_UNITS[unit]
    return Quantity(value=value, unit=shown, system=UCUM, code=code)


class _Observations:
    """The Observations of one analysis, each with the report's subject-free context."""

    def __init__(self, stored: StoredAnalysis) -> None:
        self.stored = stored
        laterality = stored.findings.image.laterality if stored.findings.image else None
        self.body_site = CodeableConcept(coding=[EYE[laterality]]) if laterality else None

    def make(self, code: CodeableConcept, **value: object) -> Observation:
        return Observation(
            id=str(uuid.uuid5(uuid.UUID(self.stored.id), code.coding[0].code)),
            status="preliminary",
            category=[
                CodeableConcept(
                    coding=[Coding(system=OBSERVATION_CATEGORY, code="imaging", display="Imaging")]
                )
            ],
            code=code,
            bodySite=self.body_site,
            issued=self.stored.created_at,
            **value,
        )

    def all(self) -> Iterator[Observation]:
        found = self.stored.findings
        if found.quality is not None and found.quality.grade is not None:
            yield self.make(
                _code("image-quality", "Image quality grade"),
                valueCodeableConcept=_code(found.quality.grade.value, found.quality.grade.value),
                note=[{"text": reason} for reason in found.quality.reasons] or None,
            )
        yield from self.disc(found.disc)
        yield from self.vessels(found.vessels)
        yield from self.lesions(found.lesion_counts)
        yield from self.assessment(found.assessment)

    def disc(self, disc: findings.Disc | None) -> Iterator[Observation]:
        if disc is None:
            return
        unit = disc.length_unit
        for name, display, value, value_unit in (
            ("cdr-vertical", "Vertical cup-to-disc ratio (photo)", disc.cdr_vertical, None),
            (
                "cdr-horizontal",
                "Horizontal cup-to-disc ratio (photo)",
                disc.cdr_horizontal,
                None,
            ),
            ("disc-height", "Optic disc height", disc.disc_height, unit),
            ("disc-width", "Optic disc width", disc.disc_width, unit),
        ):
            if value is not None:
                yield self.make(_code(name, display), valueQuantity=_quantity(value, value_unit))

    def vessels(self, vessels: findings.VesselMeasurements | None) -> Iterator[Observation]:
        if vessels is None:
            return
        for features in vessels.features:
            if (
                features.vessel_type != findings.VesselType.ALL
                or features.region != findings.Region.WHOLE
            ):
                continue
            for name, value in (
                ("fractal-dimension", features.fractal_dimension),
                ("vessel-density", features.vessel_density),
            ):
                if value is not None:
                    display = name.replace("-", " ").capitalize() + " (whole image, all vessels)"
                    yield self.make(_code(name, display), valueQuantity=_quantity(value))
        for caliber in vessels.calibers:
            if caliber.region != findings.Region.ZONE_B:
                continue
            for name, value, unit in (
                ("crae-knudtson", caliber.crae_knudtson, vessels.length_unit),
                ("crve-knudtson", caliber.crve_knudtson, vessels.length_unit),
                ("avr-knudtson", caliber.avr_knudtson, None),
            ):
                if value is not None:
                    display = f"{name.split('-')[0].upper()} (Knudtson, zone B)"
                    yield self.make(_code(name, display), valueQuantity=_quantity(value, unit))

    def lesions(self, counts: list[findings.LesionCount]) -> Iterator[Observation]:
        for count in counts:
            if count.type is None:
                continue
            name = count.type.value.replace("_", "-")
            yield self.make(
                _code(f"{name}-count", f"{count.type.value.replace('_', ' ')} count"),
                valueInteger=count.count,
                component=[
                    ObservationComponent(
                        code=_code(f"{name}-area", "total area"),
                        valueQuantity=_quantity(count.total_area_px, findings.LengthUnit.PIXEL),
                    )
                ],
            )

    def assessment(self, assessment: findings.Assessment | None) -> Iterator[Observation]:
        if assessment is None:
            return
        if assessment.dr_grade is not None:
            answer, display = ICDR_ANSWERS[assessment.dr_grade]
            yield self.make(
                _code("dr-grade-icdr", "Diabetic retinopathy grade estimate (ICDR)"),
                valueCodeableConcept=CodeableConcept(
                    coding=[
                        Coding(system=LOINC, code=answer, display=display),
                        Coding(system=CODE_SYSTEM, code=f"icdr-{assessment.dr_grade}"),
                    ],
                    text=f"ICDR {assessment.dr_grade}",
                ),
            )
        for name, display, value in (
            ("referable-dr", "Referable diabetic retinopathy", assessment.referral),
            ("macular-edema-risk", "Macular edema risk", assessment.macular_edema_risk),
            ("glaucoma-suspect", "Glaucoma suspect (vertical CDR)", assessment.glaucoma_suspect),
        ):
            if value is None:
                continue
            flag = value == findings.Referral.REFERABLE if name == "referable-dr" else value
            yield self.make(_code(name, display), valueBoolean=bool(flag))


def bundle(stored: StoredAnalysis) -> Bundle:
    """The FHIR R4 collection Bundle of a stored analysis (DiagnosticReport first)."""
    observations = list(_Observations(stored).all())
    assessment = stored.findings.assessment
    conclusion = None
    if assessment is not None:
        conclusion = "; ".join([*assessment.reasons, *assessment.caveats]) or None
    report = DiagnosticReport(
        id=stored.id,
        status="preliminary",
        code=CodeableConcept(coding=[REPORT_CODE]),
        issued=stored.created_at,
        result=[Reference(reference=f"urn:uuid:{o.id}") for o in observations],
        conclusion=conclusion,
    )
    entries = [BundleEntry(fullUrl=f"urn:uuid:{report.id}", resource=report)]
    entries += [BundleEntry(fullUrl=f"urn:uuid:{o.id}", resource=o) for o in observations]
    return Bundle(id=stored.id, type="collection", timestamp=stored.created_at, entry=entries)
