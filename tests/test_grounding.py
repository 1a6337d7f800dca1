"""The grounding check against adversarial answers: every unmeasured number is caught,
every measured one accepted, and the delivered text never states an unmeasured value."""

from __future__ import annotations

import pytest

from services.language.facts import facts_from_findings
from services.language.grounding import NOT_MEASURED, GroundingChecker
from services.language.prompting import describe, stated_texts
from tests.findings_examples import example_findings


@pytest.fixture(scope="module")
def checker() -> GroundingChecker:
    result = example_findings()
    facts, boxes = facts_from_findings(result)
    return GroundingChecker(facts, boxes, stated_texts(result))


@pytest.mark.parametrize(
    ("answer", "key"),
    [
        ("The vertical cup-to-disc ratio is 0.45.", "disc.cdr_vertical"),
        ("The vertical CDR is 0.5, below the 0.6 threshold.", "disc.cdr_vertical"),
        ("The vertical cup-to-disc ratio is 0.4531.", "disc.cdr_vertical"),
        ("CRAE in zone B is 134.21 µm.", "vessels.calibers.zone_b.crae_knudtson"),
        ("The CRVE is 201.4 micrometres.", "vessels.calibers.zone_b.crve_knudtson"),
        ("The arteriovenous ratio is 0.67.", "vessels.calibers.zone_b.avr_knudtson"),
        ("The arterial fractal dimension is 1.371.", "vessels.artery.whole.fractal_dimension"),
        ("Veins have a fractal dimension of 1.40.", "vessels.vein.whole.fractal_dimension"),
        ("There are 3 hard exudates.", "lesion_counts.hard_exudate.count"),
        (
            "One hard exudate lies 0.8 DD from the fovea.",
            "lesions[0].position.distance_to_fovea_dd",
        ),
        ("A hard exudate is at [0.4123, 0.5012, 0.4301, 0.5188].", "lesions[0].box"),
        ("Vessel density is 8.12% of the image.", "vessels.all.whole.vessel_density"),
        ("The DR grade estimate is 2.", "assessment.dr_grade"),
        ("The image quality is good with probability 0.91.", "quality.probabilities.good"),
    ],
)
def test_measured_values_are_accepted(checker: GroundingChecker, answer: str, key: str) -> None:
    result = checker.check(answer)
    assert result.unmatched == 0, result.values
    assert result.answer == answer
    assert key in result.findings_keys


@pytest.mark.parametrize(
    ("answer", "wrong", "repair"),
    [
        # off by rounding: 0.4531 is 0.45 at two decimals, never 0.46
        ("The vertical cup-to-disc ratio is 0.46.", "0.46", "0.45"),
        # the vein's value stated for the artery (swapped artery/vein)
        ("The arterial fractal dimension is 1.402.", "1.402", "1.371"),
        ("CRAE is 201.44 µm.", "201.44", "134.21 µm"),
        # invented values of quantities that were never measured
        ("The CRAE in zone C is 150.3 µm.", "150.3", NOT_MEASURED),
        ("The retinal thickness is 250 µm.", "250", NOT_MEASURED),
        # a measured number (a vessel count of 37) stated for something never measured
        ("The visual acuity is 37 letters.", "37", NOT_MEASURED),
        ("The AVR is 0.67 in zone C.", "0.67", NOT_MEASURED),
        # measured in µm, not pixels
        ("The disc height is 1712.4 px.", "1712.4 px", NOT_MEASURED),
        # counts and boxes
        ("There are 5 hard exudates.", "5", "3"),
        ("There are 4 microaneurysms.", "4", NOT_MEASURED),
        ("A haemorrhage is at [0.1000, 0.2000, 0.1500, 0.2600].", "[0.1000", NOT_MEASURED),
        ("A hard exudate is at [0.4123, 0.5012, 0.4310, 0.5188].", "0.4310", NOT_MEASURED),
        ("The arterial fractal dimension in zone B is 1.3712.", "1.3712", "1.201"),
    ],
)
def test_unmeasured_values_are_caught_and_repaired(
    checker: GroundingChecker, answer: str, wrong: str, repair: str
) -> None:
    result = checker.check(answer)
    assert result.unmatched == 1, result.values
    assert result.repaired
    assert wrong not in result.answer
    assert repair in result.answer


def test_several_values_in_one_sentence_are_checked_each(checker: GroundingChecker) -> None:
    answer = "CRAE is 134.2 µm, CRVE is 301.4 µm and the AVR is 0.67."
    result = checker.check(answer)
    assert [v.measured for v in result.values] == [True, False, True]
    assert "301.4" not in result.answer and "201.44 µm" in result.answer


def test_text_without_numbers_is_left_alone(checker: GroundingChecker) -> None:
    answer = "This is a colour fundus photograph of good quality.\n1. Look at the disc."
    result = checker.check(answer)
    assert result.values == [] and result.answer == answer


def test_the_description_states_every_fact_and_passes_its_own_check() -> None:
    result = example_findings()
    facts, boxes = facts_from_findings(result)
    description = describe(result, facts, boxes)
    for fact in facts:
        if not fact.key.startswith("lesions["):  # per-lesion areas/confidences stay out
            assert fact.text in description, fact.key
    for box in boxes:
        assert box.text in description
    checked = GroundingChecker(facts, boxes, stated_texts(result)).check(description)
    assert checked.unmatched == 0, [v for v in checked.values if not v.measured]


def test_streamed_text_is_released_a_sentence_at_a_time_or_at_a_clause_when_run_on() -> None:
    from services.language.chat import _release_point

    assert _release_point("The CDR is 0.45. The AV") == len("The CDR is 0.45. ")
    assert _release_point("The CDR is 0.4") == 0  # a number may still be growing
    run_on = "the vessels look " * 10 + "thin, and the disc " + "looks " * 10
    cut = _release_point(run_on)
    assert run_on[:cut].endswith("thin, ")
