"""Conversations about one image, written from its findings and labels by seeded templates.

Three tracks, in LLaVA's JSONL shape (`{id, image, conversations: [{from, value}]}` plus the
findings they were written from, which training and serving both render into the prompt):
- alignment: one turn, `<image>` in the question, a short description of the image;
- instruction: 3-6 turns drawn from modality/quality, disease, vascular values, disc/cup,
  lesions with boxes; the turn types, their order and the phrasings vary with the seed;
- values: 6-10 questions about measured values (and one about something never measured).
Answers state values exactly as the prompt states them (a fact's text), which is what the
grounding check accepts and what the evaluation scores.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from services.language.facts import LESION_NAMES, Fact, facts_from_findings
from services.language.prompting import in_prompt
from shared import findings as F
from training.vlm.records import LabeledImage

QUESTION_TYPES = ("modality", "quality", "disease", "vascular", "disc", "lesions", "fovea")
IMAGE_TOKEN = "<image>"

_ASK_VALUE = [
    "What is the {label}?",
    "Can you tell me the {label}?",
    "What {label} was measured?",
    "Give me the {label}.",
    "How large is the {label}?",
    "Report the {label}, please.",
    "What value does the {label} have?",
]
_STATE_VALUE = [
    "The {label} is {value}.",
    "The measured {label} is {value}.",
    "It is {value}.",
    "The {label} measures {value}.",
    "{Label}: {value}.",
]
_NOT_MEASURED = [
    "The {label} was not measured for this image.",
    "That was not measured: the findings have no {label}.",
    "There is no measured {label} for this image.",
]
_DESCRIBE = [
    "Describe this image.",
    "What does this photograph show?",
    "Give a short description of this fundus image.",
    "Summarise what you see.",
    "What kind of image is this?",
]
_QUALITY = [
    "Is the image quality good enough for grading?",
    "How good is this photograph?",
    "What is the image quality?",
]
_DISEASE = [
    "Are there signs of diabetic retinopathy?",
    "What is the screening assessment?",
    "Is this eye referable?",
    "Is there any sign of disease?",
]
_LESIONS = [
    "Where are the lesions?",
    "Which lesions were found, and where?",
    "Locate the lesions in this image.",
]
# Quantities a user asks about by name; the label they use is the fact's, with its region.
_ASKABLE = {
    "fractal_dimension", "vessel_density", "average_width", "tortuosity_density",
    "vessel_count", "branching_angle", "crae", "crve", "avr", "cdr_vertical",
    "cdr_horizontal", "disc_height", "disc_width", "cup_height", "cup_width",
}  # fmt: skip
# Asked in training only for the regions and vessel kinds a user most often names.
UNMEASURED_LABELS = ["retinal thickness", "intraocular pressure", "axial length", "visual acuity"]


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    kind: str
    fact_key: str = ""  # the fact a value question asks for


def askable_facts(result: F.Findings) -> list[Fact]:
    """Facts a user asks about by name that the prompt states (the model can only quote
    what it is given)."""
    facts, _ = facts_from_findings(result)
    return [f for f in facts if f.quantity in _ASKABLE and in_prompt(f)]


def not_measured_turn(rng: random.Random, label: str) -> Turn:
    return Turn(
        rng.choice(_ASK_VALUE).format(label=label),
        rng.choice(_NOT_MEASURED).format(label=label),
        "not_measured",
    )


def value_turn(rng: random.Random, fact: Fact) -> Turn:
    label = fact.spoken
    answer = rng.choice(_STATE_VALUE).format(
        label=label, Label=label[:1].upper() + label[1:], value=fact.text
    )
    return Turn(
        rng.choice(_ASK_VALUE).format(label=label),
        answer,
        "vascular" if fact.key.startswith("vessels.") else "disc",
        fact.key,
    )


def _describe(result: F.Findings) -> str:
    parts = ["This is a colour fundus photograph of the retina"]
    if result.image is not None and result.image.laterality is not None:
        parts[0] += f" ({result.image.laterality.value} eye)"
    if result.quality is not None and result.quality.grade is not None:
        parts.append(f"its quality was graded {result.quality.grade.value}")
    if result.disc is not None and result.disc.cdr_vertical is not None:
        parts.append(
            f"the optic disc is visible with a vertical cup-to-disc ratio of "
            f"{result.disc.cdr_vertical:.2f}"
        )
    found = [c for c in result.lesion_counts if c.type is not None and c.count > 0]
    if found:
        parts.append(
            "lesions were found: "
            + ", ".join(
                f"{c.count} {LESION_NAMES[c.type]}{'s' if c.count != 1 else ''}" for c in found
            )
        )
    return "; ".join(parts) + "."


def _quality(result: F.Findings) -> str:
    if result.quality is None or result.quality.grade is None:
        return "The image quality was not assessed."
    grade = result.quality.grade
    verdict = {
        F.QualityGrade.GOOD: "good enough for grading",
        F.QualityGrade.USABLE: "usable for grading, though small lesions may be missed",
        F.QualityGrade.REJECT: "too poor for grading; the photograph should be retaken",
    }[grade]
    return f"The image quality was graded {grade.value}: {verdict}."


def _disease(result: F.Findings, image: LabeledImage) -> str:
    sentences = []
    assessment = result.assessment
    if assessment is not None and assessment.dr_grade is not None:
        referable = assessment.referral is F.Referral.REFERABLE
        sentences.append(
            f"The DR grade estimate is {assessment.dr_grade} (ICDR), "
            f"{'referable' if referable else 'not referable'}."
        )
    if assessment is not None and assessment.glaucoma_suspect is not None:
        sentences.append(
            "The eye is a glaucoma suspect by its vertical cup-to-disc ratio."
            if assessment.glaucoma_suspect
            else "The vertical cup-to-disc ratio does not suggest glaucoma."
        )
    if image.diagnoses.get("diagnosis"):
        sentences.append(f"The dataset's label for this image: {image.diagnoses['diagnosis']}.")
    if not sentences:
        return "No screening assessment could be made for this image."
    return " ".join(sentences) + " This is an automated estimate, not a diagnosis."


def _lesions(result: F.Findings) -> str:
    if not result.lesion_counts:
        return "Lesions were not assessed for this image."
    _, boxes = facts_from_findings(result)
    if not boxes:
        return "No lesions were found among the types assessed."
    listed = [f"a {LESION_NAMES[b.lesion]} at {b.text}" for b in boxes[:3] if b.lesion]
    more = f" and {len(boxes) - 3} more" if len(boxes) > 3 else ""
    return "I found " + ", ".join(listed) + more + "."


def _fovea(result: F.Findings) -> str:
    if result.fovea is None or result.fovea.center is None:
        return "The fovea was not located."
    center = result.fovea.center
    return f"The fovea is at x {center.x:.0f} px, y {center.y:.0f} px."


def alignment(rng: random.Random, result: F.Findings) -> list[Turn]:
    return [Turn(rng.choice(_DESCRIBE), _describe(result), "modality")]


def instruction(rng: random.Random, result: F.Findings, image: LabeledImage) -> list[Turn]:
    makers: list[Callable[[], Turn]] = [
        lambda: Turn(rng.choice(_QUALITY), _quality(result), "quality"),
        lambda: Turn(rng.choice(_DISEASE), _disease(result, image), "disease"),
        lambda: Turn(rng.choice(_LESIONS), _lesions(result), "lesions"),
        lambda: Turn("Where is the fovea?", _fovea(result), "fovea"),
    ]
    facts = askable_facts(result)
    for fact in rng.sample(facts, k=min(len(facts), 4)):
        makers.append(lambda fact=fact: value_turn(rng, fact))
    label = rng.choice(UNMEASURED_LABELS)
    makers.append(lambda: not_measured_turn(rng, label))
    rng.shuffle(makers)
    count = rng.randint(3, min(6, len(makers)))
    turns = [make() for make in makers[:count]]
    if not any(t.fact_key for t in turns) and facts:
        turns[-1] = value_turn(rng, rng.choice(facts))
    return turns


def values(rng: random.Random, result: F.Findings, count: int) -> list[Turn]:
    """`count` value questions (one of them, at a random place, about something never
    measured): the most supervised answers per prompt, which a small model needs to learn to
    quote its measurements."""
    facts = askable_facts(result)
    turns = [value_turn(rng, fact) for fact in rng.sample(facts, k=min(len(facts), count - 1))]
    label = rng.choice(UNMEASURED_LABELS)
    turns.insert(rng.randrange(len(turns) + 1), not_measured_turn(rng, label))
    return turns


def to_llava(
    record_id: str, image: LabeledImage, turns: list[Turn], result: F.Findings
) -> dict[str, object]:
    conversations = []
    for index, turn in enumerate(turns):
        question = f"{IMAGE_TOKEN}\n{turn.question}" if index == 0 else turn.question
        conversations += [
            {"from": "human", "value": question},
            {"from": "gpt", "value": turn.answer},
        ]
    return {
        "id": record_id,
        "image": str(image.path),
        "conversations": conversations,
        "kinds": [t.kind for t in turns],
        "labels": image.diagnoses,
        "findings": result.model_dump(mode="json", exclude_none=True),
    }
