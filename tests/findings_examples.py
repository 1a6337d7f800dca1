"""A findings document for the language tests: every kind of value the prompt states."""

from __future__ import annotations

from shared import findings as F
from shared.assessment import assess


def example_findings() -> F.Findings:
    """Findings with vessels, calibres, disc, fovea, a hard exudate and an assessment."""
    result = F.Findings(
        quality=F.Quality(grade=F.QualityGrade.GOOD, probabilities=[0.91, 0.08, 0.01]),
        vessels=F.VesselMeasurements(
            length_unit=F.LengthUnit.MICROMETER,
            features=[
                F.VesselFeatures(
                    vessel_type=F.VesselType.ALL,
                    region=F.Region.WHOLE,
                    fractal_dimension=1.4821,
                    vessel_density=0.08123,
                    vessel_count=37,
                    average_width=95.31,
                ),
                F.VesselFeatures(
                    vessel_type=F.VesselType.ARTERY,
                    region=F.Region.WHOLE,
                    fractal_dimension=1.3712,
                    average_width=88.2,
                ),
                F.VesselFeatures(
                    vessel_type=F.VesselType.VEIN,
                    region=F.Region.WHOLE,
                    fractal_dimension=1.4023,
                    average_width=110.77,
                ),
                F.VesselFeatures(
                    vessel_type=F.VesselType.ARTERY,
                    region=F.Region.ZONE_B,
                    fractal_dimension=1.2011,
                ),
            ],
            calibers=[
                F.CaliberSummary(
                    region=F.Region.ZONE_B,
                    crae_knudtson=134.2051,
                    crve_knudtson=201.4388,
                    avr_knudtson=0.66624,
                ),
            ],
        ),
        disc=F.Disc(
            cdr_vertical=0.4531,
            cdr_horizontal=0.4112,
            disc_height=1712.4,
            length_unit=F.LengthUnit.MICROMETER,
        ),
        fovea=F.Fovea(center=F.Point(x=1210.4, y=980.6), method="anatomical_prior"),
        lesions=[
            F.Lesion(
                type=F.LesionType.HARD_EXUDATE,
                box=F.Box(x_min=0.4123, y_min=0.5012, x_max=0.4301, y_max=0.5188),
                area_px=312,
                confidence=0.82,
                position=F.LesionPosition(
                    quadrant=F.Quadrant.INFERO_TEMPORAL, distance_to_fovea_dd=0.84, in_macula=True
                ),
            ),
        ],
        lesion_counts=[F.LesionCount(type=F.LesionType.HARD_EXUDATE, count=3, total_area_px=901)],
    )
    result.assessment = assess(result)
    return result
