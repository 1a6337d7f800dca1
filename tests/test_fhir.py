"""The FHIR R4 Bundle of an analysis: valid R4B resources, codes, values, a lossless round trip."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal

from fhir.resources.R4B.bundle import Bundle

from services.gateway.fhir import CODE_SYSTEM, LOINC, bundle
from services.gateway.store import StoredAnalysis
from shared import findings

F = findings


def _stored(**update: object) -> StoredAnalysis:
    found = F.Findings(
        image=F.ImageInfo(width=2000, height=1500, laterality=F.Laterality.LEFT),
        quality=F.Quality(grade=F.QualityGrade.USABLE, reasons=["slightly blurred"]),
        disc=F.Disc(
            cdr_vertical=0.64,
            cdr_horizontal=0.51,
            disc_height=1804.5,
            length_unit=F.LengthUnit.MICROMETER,
        ),
        vessels=F.VesselMeasurements(
            length_unit=F.LengthUnit.MICROMETER,
            features=[
                F.VesselFeatures(
                    vessel_type=F.VesselType.ALL, region=F.Region.WHOLE, fractal_dimension=1.48
                ),
                F.VesselFeatures(
                    vessel_type=F.VesselType.ARTERY, region=F.Region.WHOLE, fractal_dimension=1.3
                ),
            ],
            calibers=[F.CaliberSummary(region=F.Region.ZONE_B, crae_knudtson=142.1)],
        ),
        lesion_counts=[
            F.LesionCount(type=F.LesionType.MICROANEURYSM, count=3, total_area_px=41.0),
            F.LesionCount(type=F.LesionType.HARD_EXUDATE, count=0, total_area_px=0.0),
        ],
        assessment=F.Assessment(
            dr_grade=2,
            referral=F.Referral.REFERABLE,
            macular_edema_risk=False,
            glaucoma_suspect=True,
            reasons=["ICDR >= 2"],
            caveats=["automated screening estimate, not a diagnosis"],
        ),
    )
    found = found.model_copy(update=update)
    created = dt.datetime(2026, 11, 29, 6, 0, tzinfo=dt.UTC)
    return StoredAnalysis(str(uuid.uuid4()), created, found, ())


def _observations(b: Bundle) -> dict[str, object]:
    return {
        entry.resource.code.coding[0].code: entry.resource
        for entry in b.entry
        if entry.resource.get_resource_type() == "Observation"
    }


def test_the_report_references_one_observation_per_measured_value() -> None:
    stored = _stored()
    b = bundle(stored)
    report = b.entry[0].resource
    assert report.get_resource_type() == "DiagnosticReport"
    assert (report.code.coding[0].system, report.code.coding[0].code) == (LOINC, "103592-2")
    assert report.status == "preliminary" and "ICDR >= 2" in report.conclusion
    observations = _observations(b)
    assert {r.reference for r in report.result} == {
        e.fullUrl for e in b.entry if e.resource.get_resource_type() == "Observation"
    }
    # Exactly what was measured: no horizontal width, no vessel density, no CRVE.
    assert set(observations) == {
        "image-quality",
        "cdr-vertical",
        "cdr-horizontal",
        "disc-height",
        "fractal-dimension",
        "crae-knudtson",
        "microaneurysm-count",
        "hard-exudate-count",
        "dr-grade-icdr",
        "referable-dr",
        "macular-edema-risk",
        "glaucoma-suspect",
    }
    assert observations["cdr-vertical"].valueQuantity.value == Decimal("0.64")
    height = observations["disc-height"].valueQuantity
    assert (height.value, height.code) == (Decimal("1804.5"), "um")
    assert observations["fractal-dimension"].valueQuantity.value == Decimal("1.48")  # not arteries
    assert observations["microaneurysm-count"].valueInteger == 3
    assert observations["hard-exudate-count"].valueInteger == 0
    grade = observations["dr-grade-icdr"].valueCodeableConcept.coding
    assert (grade[0].system, grade[0].code) == (LOINC, "LA18645-4")  # moderate NPDR
    assert observations["referable-dr"].valueBoolean is True
    assert observations["macular-edema-risk"].valueBoolean is False
    assert all(o.bodySite.coding[0].code == "8966001" for o in observations.values())
    assert all(o.code.coding[0].system == CODE_SYSTEM for o in observations.values())


def test_nothing_measured_gives_a_report_without_observations() -> None:
    b = bundle(_stored(disc=None, vessels=None, lesion_counts=[], assessment=None, quality=None))
    assert len(b.entry) == 1
    report = b.entry[0].resource
    assert not report.result and report.conclusion is None


def test_the_bundle_round_trips_through_json_losslessly() -> None:
    b = bundle(_stored())
    text = b.model_dump_json(exclude_none=True)
    again = Bundle.model_validate_json(text)
    assert again.model_dump_json(exclude_none=True) == text
    assert json.loads(text)["resourceType"] == "Bundle"
    # Observation ids are stable for an analysis: the same analysis gives the same bundle.
    assert bundle(_stored()).entry[1].resource.id != b.entry[1].resource.id  # new analysis id
    stored = _stored()
    assert bundle(stored).model_dump_json() == bundle(stored).model_dump_json()
