"""From findings and a conversation to the model's messages.

The findings become a compact clinical description in the paper's style (quality, vascular
values with readable names, disc/cup, lesions with boxes, assessment), injected once per
conversation in the system message, with the instruction to use those values only. Messages
are OpenAI-style (`role`, `content` parts with the image first in the first user turn); the
model family decides the chat template that renders them: the checkpoint's own ("chat") or
the LLaVA v0 "simple" template of the published RetinalGPT weights ("retinalgpt_v0").
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from services.language.facts import LESION_NAMES, BoxFact, Fact
from shared import findings

INSTRUCTIONS = (
    "You are RetinalGPT, a retinal clinical assistant. You discuss one colour fundus "
    "photograph. Use only the measurements listed below; state numbers exactly as listed. If "
    "a value is not listed, say that it was not measured. Do not guess."
)


class PromptFamily(StrEnum):
    CHAT = "chat"  # the checkpoint's own chat template (RetinalGPT-mini, HF LLaVA models)
    RETINALGPT_V0 = "retinalgpt_v0"  # LLaVA v0 "simple" template of the published weights


# LLaVA v0's conv "simple" (SeparatorStyle.SINGLE, sep "###"), as a chat template; image parts
# become the "<image>" placeholder the processor expands.
RETINALGPT_V0_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}"
    "{{ 'Human' if message['role'] == 'user' else 'Assistant' }}: {% endif %}"
    # vLLM hands every message's content over as parts once a template loops over parts,
    # the system message's too: render strings and parts alike.
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}###"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _join(facts: list[Fact]) -> str:
    return "; ".join(f"{fact.label} {fact.text}" for fact in facts)


_ZONE_QUANTITIES = {"crae", "crve", "avr", "fractal_dimension", "vessel_density", "average_width"}
# Lesions listed one by one (largest first); the rest are counted.
MAX_LESIONS_DESCRIBED = 5


def in_prompt(fact: Fact) -> bool:
    """Whether the description states this vessel fact (every other fact is always stated)."""
    return fact.region in (None, findings.Region.WHOLE) or fact.quantity in _ZONE_QUANTITIES


def _vessel_lines(facts: list[Fact]) -> list[str]:
    """One line per value, named as a question names it: "arterial fractal dimension in zone
    B: 1.371".

    A small model quotes a value far more reliably when the words of the question stand right
    before it than when it must combine a region heading, a quantity and a vessel group (the
    grouped form it replaced). Zones B and C keep the quantities read there clinically
    (calibres, fractal dimension, density, width); their tortuosities, counts and angles stay
    out of the prompt, which must fit a small model's context.
    """
    return [
        f"{fact.spoken}: {fact.text}"
        for fact in facts
        if fact.key.startswith("vessels.") and fact.region is not None and in_prompt(fact)
    ]


def _lesion_lines(result: findings.Findings, boxes: list[BoxFact]) -> list[str]:
    lines = []
    assessed = {count.type for count in result.lesion_counts if count.type is not None}
    if result.lesion_counts:
        counts = "; ".join(
            f"{LESION_NAMES[c.type]} count {c.count}, total area {c.total_area_px:.0f} px"
            for c in result.lesion_counts
            if c.type is not None
        )
        lines.append(f"Lesions found: {counts}.")
    missing = [LESION_NAMES[t] + "s" for t in findings.LesionType if t not in assessed]
    if missing:
        lines.append(f"Not assessed (no lesion model result): {', '.join(missing)}.")
    boxed = [(lesion, box) for lesion, box in zip(result.lesions, boxes, strict=False)]
    boxed.sort(key=lambda pair: -pair[0].area_px)
    for lesion, box in boxed[:MAX_LESIONS_DESCRIBED]:
        name = LESION_NAMES[lesion.type] if lesion.type else "lesion"
        where = []
        if lesion.position is not None:
            position = lesion.position
            if position.quadrant is not None:
                where.append(position.quadrant.value.replace("_", "-"))
            if position.distance_to_fovea_dd is not None:
                where.append(f"{position.distance_to_fovea_dd:.1f} DD from the fovea")
            if position.distance_to_disc_dd is not None:
                where.append(f"{position.distance_to_disc_dd:.1f} DD from the disc")
            if position.in_macula:
                where.append("in the macula")
        lines.append(
            f"{name.capitalize()} at {box.text}" + (f", {', '.join(where)}" if where else "") + "."
        )
    return lines


def describe(result: findings.Findings, facts: list[Fact], boxes: list[BoxFact]) -> str:
    """The findings as a compact clinical description, every number at its fact's precision."""
    by_key = {fact.key: fact for fact in facts}
    lines = []
    if result.quality is not None and result.quality.grade is not None:
        probabilities = [f for f in facts if f.quantity == "quality_probability"]
        detail = ", ".join(f"{f.key.rsplit('.', 1)[1]} {f.text}" for f in probabilities)
        lines.append(
            f"Image quality: {result.quality.grade.value}"
            + (f" (probabilities {detail})" if detail else "")
            + "."
        )
    vessel_lines = _vessel_lines(facts)
    if vessel_lines:
        lines.append("Vessels:")
        lines.extend(vessel_lines)
    disc = [f for f in facts if f.key.startswith("disc.")]
    if disc:
        lines.append(f"Optic disc: {_join(disc)}.")
    if "fovea.center.x" in by_key:
        method = result.fovea.method if result.fovea else ""
        lines.append(
            f"Fovea at x {by_key['fovea.center.x'].text}, y {by_key['fovea.center.y'].text}"
            + (f" ({method.replace('_', ' ')})" if method else "")
            + "."
        )
    lines.extend(_lesion_lines(result, boxes))
    assessment = result.assessment
    if assessment is not None:
        verdict = []
        if assessment.dr_grade is not None:
            verdict.append(f"DR grade estimate (ICDR) {assessment.dr_grade}")
        if assessment.referral is not None:
            verdict.append(assessment.referral.value.replace("_", " "))
        if assessment.macular_edema_risk is not None:
            verdict.append(
                "macular-edema risk" if assessment.macular_edema_risk else "no macular-edema risk"
            )
        if assessment.glaucoma_suspect is not None:
            verdict.append(
                "glaucoma suspect" if assessment.glaucoma_suspect else "not a glaucoma suspect"
            )
        if verdict:
            lines.append(f"Assessment: {', '.join(verdict)}.")
        lines.extend(f"Reason: {reason}." for reason in assessment.reasons if reason)
        lines.extend(f"Caveat: {caveat}." for caveat in assessment.caveats if caveat)
    not_measured = [s.stage for s in result.stages if s.state not in (None, findings.StageState.OK)]
    if not_measured:
        lines.append(f"Not measured: {', '.join(not_measured)}.")
    return "\n".join(lines) if lines else "No measurements are available for this image."


def stated_texts(result: findings.Findings) -> list[str]:
    """Text of the description that is not a fact but may be quoted (rule thresholds)."""
    if result.assessment is None:
        return []
    return [*result.assessment.reasons, *result.assessment.caveats]


def build_messages(
    description: str | None, conversation: list[tuple[str, str]], with_image: bool
) -> list[dict[str, Any]]:
    """OpenAI-style messages: instructions + findings (none: the instructions alone), then the
    turns (image in the first)."""
    system = INSTRUCTIONS
    if description is not None:
        system += f"\n\nMeasurements:\n{description}"
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for index, (role, text) in enumerate(conversation):
        if index == 0 and with_image:
            content: Any = [{"type": "image"}, {"type": "text", "text": text}]
        else:
            content = [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return messages
