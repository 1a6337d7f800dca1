"""The screening assessment: what the findings support, each conclusion with its reasons.

DR grade (ICDR, Wilkinson et al., Ophthalmology 2003), from the lesions one photograph shows:
- 0 no apparent retinopathy: no lesion found;
- 1 mild NPDR: microaneurysms only;
- 2 moderate NPDR: more than microaneurysms only (haemorrhages, hard exudates, cotton-wool
  spots) but nothing of severe NPDR;
- 3 severe NPDR, by its first criterion (the 4-2-1 rule's "4"): more than 20 intraretinal
  haemorrhages in each of the 4 quadrants. Its other criteria (venous beading in 2+
  quadrants, IRMA in 1+ quadrant) and grade 4 (neovascularisation, vitreous or preretinal
  haemorrhage) are not detected, and one 45-degree photograph does not show the periphery:
  a grade of 2 or less is therefore a lower bound, and the reasons say so.
Referable DR: grade >= 2, or macular-edema risk (the usual screening definition).
Macular-edema risk: hard exudates within `MACULA_RADIUS_DD` (1 disc diameter) of the fovea.
Glaucoma suspicion: vertical cup-to-disc ratio >= `CDR_SUSPECT` (0.6); >= `CDR_HIGH` (0.7)
is called high. Image quality: a rejected image is not graded; a usable one is graded with
the caveat that small lesions may be missed, and so is a photograph whose field of view is
under `DETAIL_FOV_DIAMETER_PX` across (a microaneurysm, 5-15 px in IDRiD's 3,400-px field of
view that the lesion model learnt from, is then 1-4 px wide).
"""

from __future__ import annotations

from collections import Counter

from shared import findings
from shared.lesion_positions import MACULA_RADIUS_DD

CDR_SUSPECT = 0.6
CDR_HIGH = 0.7
SEVERE_HAEMORRHAGES_PER_QUADRANT = 20  # ICDR severe NPDR: "more than 20 ... in each of 4"
REFERABLE_GRADE = 2
DETAIL_FOV_DIAMETER_PX = 1000

_NAMES = {  # singular, plural
    findings.LesionType.MICROANEURYSM: ("microaneurysm", "microaneurysms"),
    findings.LesionType.HAEMORRHAGE: ("haemorrhage", "haemorrhages"),
    findings.LesionType.HARD_EXUDATE: ("hard exudate", "hard exudates"),
    findings.LesionType.SOFT_EXUDATE: ("cotton-wool spot", "cotton-wool spots"),
}
_NOT_SEEN = (
    "venous beading, IRMA, neovascularisation and vitreous/preretinal haemorrhage are not "
    "detected, and one photograph does not show the whole retina: the grade is a lower bound"
)


def lesion_totals(result: findings.Findings) -> dict[findings.LesionType, int] | None:
    """Count per ASSESSED type (uncapped, from lesion_counts); None when no lesion was measured.

    A type without a LesionCount was not assessed (the lesion model does not report a type
    whose held-out accuracy is too low): it is absent here, never counted as zero.
    """
    if not result.lesion_counts:
        return None
    totals: dict[findings.LesionType, int] = {}
    for count in result.lesion_counts:
        if count.type is not None:
            totals[count.type] = totals.get(count.type, 0) + count.count
    return totals


def _plural(types: set[findings.LesionType]) -> str:
    return ", ".join(_NAMES[t][1] for t in findings.LesionType if t in types)


def haemorrhages_per_quadrant(result: findings.Findings) -> Counter[findings.Quadrant] | None:
    """Listed haemorrhages per quadrant; None when any of them has no quadrant."""
    quadrants: Counter[findings.Quadrant] = Counter()
    for lesion in result.lesions:
        if lesion.type != findings.LesionType.HAEMORRHAGE:
            continue
        if lesion.position is None or lesion.position.quadrant is None:
            return None
        quadrants[lesion.position.quadrant] += 1
    return quadrants


def dr_grade(result: findings.Findings) -> tuple[int | None, list[str], list[str]]:
    """(ICDR grade estimate, reasons, caveats) from the lesions."""
    totals = lesion_totals(result)
    if totals is None:
        return None, ["DR grade not estimated: no lesion type was assessed"], []
    found = {t: n for t, n in totals.items() if n}
    summary = ", ".join(f"{n} {_NAMES[t][n > 1]}" for t, n in found.items())
    unassessed = set(findings.LesionType) - set(totals)
    not_assessed = (
        [f"{_plural(unassessed)} not assessed (the lesion model is not accurate enough for them)"]
        if unassessed
        else []
    )
    if not found:
        if unassessed:
            return None, [f"DR grade not estimated: no lesion found, but {not_assessed[0]}"], []
        return 0, ["ICDR 0 (no apparent retinopathy): no lesion found"], [_NOT_SEEN]
    if set(found) == {findings.LesionType.MICROANEURYSM}:
        reasons = [f"ICDR 1 (mild NPDR): microaneurysms only ({summary})"]
        return 1, reasons, [*not_assessed, _NOT_SEEN]
    reasons = [f"ICDR >= 2 (moderate NPDR): more than microaneurysms only ({summary})"]
    caveats: list[str] = list(not_assessed)
    quadrants = haemorrhages_per_quadrant(result)
    listed = sum(1 for les in result.lesions if les.type == findings.LesionType.HAEMORRHAGE)
    if listed < totals.get(findings.LesionType.HAEMORRHAGE, 0):
        caveats.append("not every haemorrhage is listed (capped): quadrant counts are low")
    if quadrants is None:
        caveats.append("haemorrhage quadrants unknown: the severe-NPDR 4-2-1 rule was not applied")
    elif all(quadrants[q] > SEVERE_HAEMORRHAGES_PER_QUADRANT for q in findings.Quadrant):
        counts = ", ".join(f"{q.value} {quadrants[q]}" for q in findings.Quadrant)
        reasons.append(
            f"ICDR 3 (severe NPDR): more than {SEVERE_HAEMORRHAGES_PER_QUADRANT} haemorrhages "
            f"in each of the 4 quadrants ({counts})"
        )
        caveats.append(
            "proliferative signs (ICDR 4) are not detected; this photograph cannot exclude them"
        )
        return 3, reasons, caveats
    caveats.append(_NOT_SEEN)
    return 2, reasons, caveats


def macular_edema_risk(result: findings.Findings) -> tuple[bool | None, str]:
    """Hard exudates within 1 DD of the fovea; None when their distance is unknown."""
    totals = lesion_totals(result)
    if totals is None:
        return None, "macular-edema risk not assessed: no lesion type was assessed"
    if findings.LesionType.HARD_EXUDATE not in totals:
        return None, "macular-edema risk not assessed: hard exudates were not assessed"
    if totals[findings.LesionType.HARD_EXUDATE] == 0:
        return False, "no macular-edema risk: no hard exudates found"
    exudates = [les for les in result.lesions if les.type == findings.LesionType.HARD_EXUDATE]
    distances = [
        les.position.distance_to_fovea_dd
        for les in exudates
        if les.position is not None and les.position.distance_to_fovea_dd is not None
    ]
    near = [d for d in distances if d <= MACULA_RADIUS_DD]
    if near:
        return True, (
            f"macular-edema risk: {len(near)} hard exudate(s) within {MACULA_RADIUS_DD:g} disc "
            f"diameter of the fovea (nearest {min(near):.2f} DD)"
        )
    if len(distances) < len(exudates):
        return None, "macular-edema risk unknown: hard exudates found, fovea or disc size unknown"
    return False, (
        f"no macular-edema risk by the rule: the nearest hard exudate is {min(distances):.2f} "
        f"disc diameters from the fovea (threshold {MACULA_RADIUS_DD:g})"
    )


def glaucoma_suspicion(result: findings.Findings) -> tuple[bool | None, str]:
    """Vertical CDR against CDR_SUSPECT (and CDR_HIGH for 'high')."""
    cdr = result.disc.cdr_vertical if result.disc is not None else None
    if cdr is None:
        return None, "glaucoma suspicion not assessed: no vertical cup-to-disc ratio"
    if cdr >= CDR_HIGH:
        return True, f"glaucoma suspect (high): vertical CDR {cdr:.2f} >= {CDR_HIGH}"
    if cdr >= CDR_SUSPECT:
        return True, f"glaucoma suspect: vertical CDR {cdr:.2f} >= {CDR_SUSPECT}"
    return False, f"no glaucoma suspicion: vertical CDR {cdr:.2f} < {CDR_SUSPECT}"


def resolution_caveat(result: findings.Findings) -> list[str]:
    """A caveat when the field of view is too few pixels across for small lesions."""
    fov = result.image.field_of_view if result.image is not None else None
    diameter = 2 * fov.radius if fov is not None else 0.0
    if 0 < diameter < DETAIL_FOV_DIAMETER_PX:
        return [
            f"low resolution (field of view {diameter:.0f} px across, under "
            f"{DETAIL_FOV_DIAMETER_PX}): microaneurysms may be missed and lesion findings are "
            "less reliable"
        ]
    return []


def quality_caveats(result: findings.Findings) -> tuple[bool, list[str]]:
    """(gradable, caveats) from the image-quality grade and the field of view's size."""
    grade = result.quality.grade if result.quality is not None else None
    if grade == findings.QualityGrade.REJECT:
        reasons = "; ".join(result.quality.reasons) if result.quality else ""
        detail = f" ({reasons})" if reasons else ""
        return False, [f"image quality reject{detail}: not graded; re-take the photograph"]
    caveats = resolution_caveat(result)
    if grade == findings.QualityGrade.USABLE:
        caveats.insert(
            0, "image quality usable, not good: small lesions (microaneurysms) may be missed"
        )
    if grade is None:
        caveats.insert(0, "image quality not assessed")
    return True, caveats


def assess(result: findings.Findings) -> findings.Assessment:
    """The screening assessment of a findings document (see the module doc for the rules)."""
    gradable, caveats = quality_caveats(result)
    edema, edema_reason = macular_edema_risk(result)
    glaucoma, glaucoma_reason = glaucoma_suspicion(result)
    if not gradable:
        return findings.Assessment(
            glaucoma_suspect=glaucoma,
            reasons=["DR grade not estimated: the image is ungradable", glaucoma_reason],
            caveats=[*caveats, "automated screening estimate, not a diagnosis"],
        )
    grade, reasons, grade_caveats = dr_grade(result)
    referral = None
    if grade is not None:
        referable = grade >= REFERABLE_GRADE or edema is True
        referral = findings.Referral.REFERABLE if referable else findings.Referral.NOT_REFERABLE
        basis = f"ICDR {grade}" + (", macular-edema risk" if edema else "")
        reasons.append(
            f"referable DR ({basis}): grade >= {REFERABLE_GRADE} or macular-edema risk"
            if referable
            else f"not referable ({basis}): grade < {REFERABLE_GRADE}, no macular-edema risk"
        )
    return findings.Assessment(
        dr_grade=grade,
        referral=referral,
        macular_edema_risk=edema,
        glaucoma_suspect=glaucoma,
        reasons=[*reasons, edema_reason, glaucoma_reason],
        caveats=[*caveats, *grade_caveats, "automated screening estimate, not a diagnosis"],
    )
