"""The grounding check: every number (and box) an answer states must be a measured value.

For each number the checker reads what the sentence says it is (the nearest quantity named
before it, or a lesion named right after a count; artery or vein; zone B or C; a unit) and
accepts it only when a fact of that kind has that value at the precision written: 0.45 and
0.5 both state a measured 0.4531, 0.46 does not. A box must match a lesion's box coordinate by
coordinate. An unmatched value is repaired in the delivered text: replaced by the measured
value when the sentence names exactly one measured quantity, and by "not measured" otherwise,
so the answer never presents an unmeasured number as measured. The report lists both kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TypeVar

from services.language.facts import BoxFact, Fact
from shared import findings

NOT_MEASURED = "not measured"
_Kind = TypeVar("_Kind")

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_BOX = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")
_UNIT = (
    r"(?:\s*(?P<unit>%|°|degrees?\b|µm\b|um\b|microns?\b|micrometres?\b|micrometers?\b|"
    r"px\b|pixels?\b|DD\b|disc diameters?\b))?"
)
_VALUE = re.compile(rf"(?<![\w.\-])(?P<number>{_NUMBER})(?![\w.]*\w){_UNIT}", re.IGNORECASE)
_SENTENCE = re.compile(r"[^\n]*?(?:[.!?;:](?=\s|$)|\n|$)")
_LIST_MARKER = re.compile(r"(?m)^[ \t]*\d+[.)](?=\s)")
_UNITS = {
    "%": "%",
    "°": "°",
    "degree": "°",
    "degrees": "°",
    "µm": "µm",
    "um": "µm",
    "micron": "µm",
    "microns": "µm",
    "micrometre": "µm",
    "micrometres": "µm",
    "micrometer": "µm",
    "micrometers": "µm",
    "px": "px",
    "pixel": "px",
    "pixels": "px",
    "dd": "DD",
    "disc diameter": "DD",
    "disc diameters": "DD",
}

# What a sentence can call each quantity; longer names are tried first, so that "vertical
# cup-to-disc ratio" wins over "cup-to-disc ratio".
_QUANTITY_NAMES: dict[str, tuple[str, ...]] = {
    "fractal_dimension": ("fractal dimension", "fd"),
    "vessel_density": ("vessel density", "vascular density", "density"),
    "average_width": ("average width", "vessel width", "mean width", "width", "calibre", "caliber"),
    "distance_tortuosity": ("distance tortuosity",),
    "squared_curvature_tortuosity": ("squared curvature tortuosity", "curvature tortuosity"),
    "tortuosity_density": ("tortuosity density",),
    "tortuosity": ("tortuosity",),
    "vessel_count": ("vessel count", "number of vessels", "vessel segments"),
    "branching_angle": ("branching angle", "bifurcation angle", "angle"),
    "crae": ("crae", "central retinal artery equivalent", "central retinal arteriolar equivalent"),
    "crve": ("crve", "central retinal vein equivalent", "central retinal venular equivalent"),
    "avr": (
        "avr",
        "artery-to-vein ratio",
        "arteriovenous ratio",
        "arteriole-to-venule ratio",
        "a/v ratio",
        "av ratio",
    ),
    "cdr_vertical": (
        "vertical cup-to-disc ratio",
        "vertical cup to disc ratio",
        "vertical cdr",
        "vcdr",
    ),
    "cdr_horizontal": (
        "horizontal cup-to-disc ratio",
        "horizontal cup to disc ratio",
        "horizontal cdr",
    ),
    "cdr": ("cup-to-disc ratio", "cup to disc ratio", "cdr"),
    "disc_height": ("disc height", "height of the disc"),
    "disc_width": ("disc width", "width of the disc"),
    "cup_height": ("cup height", "height of the cup"),
    "cup_width": ("cup width", "width of the cup"),
    "fovea_distance": ("from the fovea", "to the fovea", "fovea distance"),
    "disc_distance": ("from the disc", "to the disc", "from the optic disc", "to the optic disc"),
    "fovea_position": ("fovea", "macula centre", "macula center"),
    "lesion_area": ("area",),
    "confidence": ("confidence",),
    "quality_probability": ("probability", "quality"),
    "dr_grade": ("dr grade", "icdr grade", "icdr", "grade", "stage"),
    # Named but never measured from a photograph: a number about them is never accepted.
    "unmeasurable": (
        "visual acuity",
        "acuity",
        "intraocular pressure",
        "iop",
        "eye pressure",
        "retinal thickness",
        "macular thickness",
        "thickness",
        "axial length",
        "blood pressure",
        "hba1c",
        "age",
    ),
    "microaneurysm": ("microaneurysms", "microaneurysm", "mas", "ma"),
    "haemorrhage": ("haemorrhages", "hemorrhages", "haemorrhage", "hemorrhage"),
    "hard_exudate": ("hard exudates", "hard exudate", "exudates", "exudate"),
    "soft_exudate": (
        "cotton-wool spots",
        "cotton-wool spot",
        "cotton wool spots",
        "soft exudates",
        "soft exudate",
    ),
}
# A name that stands for several quantities of the facts.
_QUANTITY_GROUPS = {
    "tortuosity": {"distance_tortuosity", "squared_curvature_tortuosity", "tortuosity_density"},
    "cdr": {"cdr_vertical", "cdr_horizontal"},
}
_DISTANCES = frozenset({"fovea_distance", "disc_distance"})
_LESION_QUANTITIES = {t.value: t for t in findings.LesionType}
_VESSEL_NAMES = {
    findings.VesselType.ARTERY: r"arter(?:y|ies|ial|iolar|ioles?)|crae",
    findings.VesselType.VEIN: r"veins?|venous|venules?|venular|crve",
}
_LESION_NAMES = {
    t: "|".join(re.escape(n) for n in _QUANTITY_NAMES[t.value]) for t in findings.LesionType
}
_REGION_NAMES = {
    findings.Region.ZONE_B: r"zone\s*b\b",
    findings.Region.ZONE_C: r"zone\s*c\b",
    findings.Region.WHOLE: r"whole (?:image|retina|fundus)|entire image|overall",
}
_QUANTITY_PATTERN = re.compile(
    "|".join(
        rf"(?P<q{index}>\b{re.escape(name)}\b)"
        for index, (_, name) in enumerate(
            sorted(
                ((q, n) for q, names in _QUANTITY_NAMES.items() for n in names),
                key=lambda item: -len(item[1]),
            )
        )
    ),
    re.IGNORECASE,
)
_QUANTITY_BY_GROUP = [
    q
    for q, _ in sorted(
        ((q, n) for q, names in _QUANTITY_NAMES.items() for n in names),
        key=lambda item: -len(item[1]),
    )
]


@dataclass(frozen=True)
class CheckedValue:
    text: str  # as written in the answer
    measured: bool
    findings_key: str  # the fact it matched (or was corrected to); empty when none


@dataclass
class GroundingResult:
    answer: str  # the delivered text, repaired where needed
    values: list[CheckedValue] = field(default_factory=list)

    @property
    def unmatched(self) -> int:
        return sum(not value.measured for value in self.values)

    @property
    def repaired(self) -> bool:
        return self.unmatched > 0

    @property
    def findings_keys(self) -> list[str]:
        return list(dict.fromkeys(v.findings_key for v in self.values if v.findings_key))


@dataclass(frozen=True)
class _Context:
    quantities: frozenset[str]  # fact quantities the sentence names for this value
    vessel: findings.VesselType | None
    region: findings.Region | None
    lesion: findings.LesionType | None
    unit: str


def _states(fact_value: float, written: str, decimals_written: int) -> bool:
    return abs(round(fact_value, decimals_written) - float(written)) < 10 ** -(decimals_written + 3)


def _decimals(number: str) -> int:
    return len(number.split(".")[1]) if "." in number else 0


def _last_match(pattern: str, text: str) -> re.Match[str] | None:
    matches = list(re.finditer(pattern, text, re.IGNORECASE))
    return matches[-1] if matches else None


def _quantity_at(text: str, last: bool) -> str | None:
    matches = list(_QUANTITY_PATTERN.finditer(text))
    if not matches:
        return None
    chosen = matches[-1] if last else matches[0]
    group = next(name for name, value in chosen.groupdict().items() if value is not None)
    return _QUANTITY_BY_GROUP[int(group[1:])]


def _expand(quantity: str | None) -> frozenset[str]:
    if quantity is None:
        return frozenset()
    if quantity in _LESION_QUANTITIES:
        return frozenset({"lesion_count"})
    return frozenset(_QUANTITY_GROUPS.get(quantity, {quantity}))


def _nearest(patterns: dict[_Kind, str], before: str, after: str) -> _Kind | None:
    """The kind named last before the value, else first after it."""
    best: tuple[int, _Kind] | None = None
    for kind, pattern in patterns.items():
        found = _last_match(pattern, before)
        if found and (best is None or found.start() > best[0]):
            best = (found.start(), kind)
    if best is not None:
        return best[1]
    for kind, pattern in patterns.items():
        found = re.search(pattern, after, re.IGNORECASE)
        if found and (best is None or found.start() < best[0]):
            best = (found.start(), kind)
    return best[1] if best else None


def _context(sentence: str, start: int, end: int, previous_end: int, unit: str) -> _Context:
    # The words since the previous value or box, up to the next one or a clause's end. A repair
    # ("not measured", "[box not measured]") bounds them as the value it replaced did, so that
    # checking a repaired answer again reads every number the same way.
    before = sentence[previous_end:start].rsplit(NOT_MEASURED, 1)[-1]
    after = re.split(rf"[,;(\[\d]|{NOT_MEASURED}", sentence[end : end + 40], maxsplit=1)[0]
    named = _quantity_at(before, last=True)
    follower = _quantity_at(after, last=False)
    # "3 microaneurysms", "0.8 DD from the fovea": the quantity is named after the number.
    if follower is not None and (named is None or named in _LESION_QUANTITIES):
        named = follower
    quantities = _expand(named)
    if unit == "DD" and not quantities & _DISTANCES:
        quantities = _DISTANCES
    return _Context(
        quantities,
        _nearest(_VESSEL_NAMES, sentence[:start], after),
        _nearest(_REGION_NAMES, sentence[:start], after),
        _nearest(_LESION_NAMES, sentence[:start], after),
        unit,
    )


def _candidates(facts: list[Fact], context: _Context) -> list[Fact]:
    chosen = [f for f in facts if not context.quantities or f.quantity in context.quantities]
    if context.vessel is not None:
        chosen = [f for f in chosen if f.vessel in (None, context.vessel)]
    if context.region is not None:
        chosen = [f for f in chosen if f.region in (None, context.region)]
    if context.lesion is not None:
        chosen = [f for f in chosen if f.lesion in (None, context.lesion)]
    if context.unit and context.unit != "%":
        chosen = [f for f in chosen if f.unit == context.unit]
    return chosen


def _match(number: str, facts: list[Fact], unit: str) -> Fact | None:
    decimals = _decimals(number)
    for fact in facts:
        value = fact.value * 100 if unit == "%" else fact.value
        if _states(value, number, decimals):
            return fact
    return None


class GroundingChecker:
    """Checks answers against the facts of one findings document."""

    def __init__(self, facts: list[Fact], boxes: list[BoxFact], stated: list[str]) -> None:
        self._facts = facts
        self._boxes = boxes
        # Text the prompt states outside the facts (the assessment's reasons: rule thresholds,
        # counts near the fovea): a clause of it quoted verbatim keeps its numbers, and a lone
        # number of it ("below the 0.6 threshold") is accepted where no quantity is named.
        self._clauses = {
            clause.strip()
            for text in stated
            for clause in re.split(r"[:;()]", text)
            if len(clause.strip()) >= 12 and any(ch.isdigit() for ch in clause)
        }
        self._stated = {m.group("number") for text in stated for m in _VALUE.finditer(text)}

    def check(self, answer: str) -> GroundingResult:
        result = GroundingResult(answer="")
        skipped = [m.span() for m in _LIST_MARKER.finditer(answer)]
        for clause in self._clauses:
            skipped.extend(m.span() for m in re.finditer(re.escape(clause), answer))
        pieces: list[str] = []
        position = 0
        for sentence in _SENTENCE.finditer(answer):
            if not sentence.group(0):
                continue
            pieces.append(answer[position : sentence.start()])
            pieces.append(
                self._check_sentence(sentence.group(0), sentence.start(), skipped, result)
            )
            position = sentence.end()
        pieces.append(answer[position:])
        result.answer = "".join(pieces)
        return result

    def _check_box(self, sentence: str, box: re.Match[str]) -> tuple[CheckedValue, str | None]:
        lesion = _nearest(_LESION_NAMES, sentence[: box.start()], sentence[box.end() :])
        fact = next(
            (
                b
                for b in self._boxes
                if (lesion is None or b.lesion == lesion)
                and all(
                    _states(c, w, _decimals(w))
                    for c, w in zip(b.coordinates, box.groups(), strict=True)
                )
            ),
            None,
        )
        if fact is None:
            return CheckedValue(box.group(0), False, ""), f"[box {NOT_MEASURED}]"
        return CheckedValue(box.group(0), True, fact.key), None

    def _check_value(
        self, sentence: str, value: re.Match[str], previous_end: int
    ) -> tuple[CheckedValue, str | None]:
        number = value.group("number")
        unit = _UNITS.get((value.group("unit") or "").lower(), "")
        context = _context(sentence, value.start(), value.end(), previous_end, unit)
        candidates = _candidates(self._facts, context)
        fact = _match(number, candidates, unit)
        if fact is not None:
            return CheckedValue(value.group(0), True, fact.key), None
        if not context.quantities and number in self._stated:
            return CheckedValue(value.group(0), True, "assessment.reasons"), None
        # Repair: the one measured value the sentence names (an unqualified region is the
        # whole image), or "not measured".
        if context.region is None and len(candidates) > 1:
            candidates = [f for f in candidates if f.region in (None, findings.Region.WHOLE)]
        correction = candidates[0] if context.quantities and len(candidates) == 1 else None
        if correction is None:
            return CheckedValue(value.group(0), False, ""), NOT_MEASURED
        return CheckedValue(value.group(0), False, correction.key), correction.text

    def _check_sentence(
        self, sentence: str, offset: int, skipped: list[tuple[int, int]], result: GroundingResult
    ) -> str:
        replacements: list[tuple[int, int, str]] = []
        box_spans = []
        for box in _BOX.finditer(sentence):
            box_spans.append(box.span())
            checked, repair = self._check_box(sentence, box)
            result.values.append(checked)
            if repair is not None:
                replacements.append((*box.span(), repair))
        previous_end = 0
        for value in _VALUE.finditer(sentence):
            start, end = value.span()
            if any(s <= start < e for s, e in box_spans):
                continue
            previous_end = max([previous_end, *(e for _, e in box_spans if e <= start)])
            quoted = any(s <= offset + start < e for s, e in skipped)
            if quoted and _LIST_MARKER.match(sentence[start:] + " "):
                continue
            checked, repair = self._check_value(sentence, value, previous_end)
            previous_end = end
            if quoted and not checked.measured:
                checked, repair = CheckedValue(value.group(0), True, "assessment.reasons"), None
            result.values.append(checked)
            if repair is not None:
                replacements.append((start, end, repair))
        for start, end, text in sorted(replacements, reverse=True):
            sentence = sentence[:start] + text + sentence[end:]
        return sentence
