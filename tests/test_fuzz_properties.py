"""Property-based fuzzing (hypothesis) of the code that reads untrusted input: the image and
DICOM decoders, and the grounding checker that reads the model's answers.

Properties: a decoder either normalises its input or refuses it with ImageRejected and a
stable code, whatever the bytes or the DICOM header say; the grounding checker never raises,
accepts only values that are measured, and its repair is final (a repaired answer checked
again needs no repair). CI runs a short, derandomised form; `bench/reliability.py` sets
RETINAL_RELIABILITY_LONG=1 for a long random one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from services.language.facts import facts_from_findings
from services.language.grounding import GroundingChecker
from services.language.prompting import stated_texts
from shared.imaging import ImageRejected, RejectCode, ingest
from tests.findings_examples import example_findings
from tests.reliability import LONG, record, scaled
from tests.test_ingestion import MUTATION_SEEDS, assert_normalised, dicom, fundus

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fuzz(strategy: st.SearchStrategy[Any], examples: tuple[int, int], check: Callable) -> int:
    """Run `check(value)` over `strategy`; how many examples it tried (for the report)."""
    tried = 0

    @settings(
        max_examples=scaled(*examples),
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def run(value: Any) -> None:
        nonlocal tried
        tried += 1
        check(value)

    run()
    return tried


def decoded_or_refused(data: bytes) -> None:
    try:
        result = ingest(data)
    except ImageRejected as rejected:
        assert rejected.code in set(RejectCode)
    else:
        assert_normalised(result)


# --------------------------------------------------------------------------- decoders

SEEDS = {name: make() for name, make in MUTATION_SEEDS.items()}


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    """A valid file of some format with bytes overwritten, inserted or cut out."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["overwrite", "insert", "cut"]))
        chunk = draw(st.binary(min_size=1, max_size=16))
        if edit == "overwrite":
            data[position : position + len(chunk)] = chunk
        elif edit == "insert":
            data[position:position] = chunk
        else:
            del data[position : position + draw(st.integers(1, 4096))]
    return bytes(data)


def test_any_bytes_are_decoded_or_refused() -> None:
    record("fuzz", examples=fuzz(st.binary(max_size=2048), (150, 5000), decoded_or_refused))


def test_damaged_files_of_every_format_are_decoded_or_refused() -> None:
    record("fuzz", examples=fuzz(damaged_files(), (200, 5000), decoded_or_refused))


@st.composite
def dicom_headers(draw: st.DrawFn) -> bytes:
    """A DICOM object whose header lies freely about its pixels."""
    height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    samples = draw(st.sampled_from([1, 3]))
    pixels = fundus(height, width)[:, :, 0] if samples == 1 else fundus(height, width)
    attributes: dict[str, object] = {
        "Rows": draw(st.integers(0, 65535)),
        "Columns": draw(st.integers(0, 65535)),
        "SamplesPerPixel": draw(st.sampled_from([0, 1, 2, 3, 4])),
        "BitsAllocated": draw(st.sampled_from([1, 8, 12, 16, 32])),
        "BitsStored": draw(st.integers(1, 32)),
        "PixelRepresentation": draw(st.sampled_from([0, 1])),
        "NumberOfFrames": draw(st.integers(0, 4)),
        "PixelSpacing": draw(st.sampled_from([[0.0065, 0.0065], [0, 0], [-1, 1e9], None])),
    }
    chosen = draw(st.sets(st.sampled_from(sorted(attributes)), max_size=4))
    photometric = draw(
        st.sampled_from(
            [None, "RGB", "MONOCHROME1", "MONOCHROME2", "YBR_FULL", "PALETTE COLOR", "bogus"]
        )
    )
    syntax = draw(
        st.sampled_from(
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless]
        )
    )
    truncate = draw(st.integers(0, 64))
    # A compressed syntax gets the raw pixels as its one "compressed" frame: a lie too.
    compressed = syntax in (JPEGBaseline8Bit, RLELossless)
    data = dicom(
        pixels,
        pixel_data=encapsulate([pixels.tobytes()]) if compressed else None,
        encapsulated=compressed,
        modality=draw(st.sampled_from(["OP", "XC", "CT", None])),
        photometric=photometric,
        syntax=syntax,
        **{name: attributes[name] for name in chosen if attributes[name] is not None},
    )
    return data[: len(data) - truncate] if truncate else data


def test_dicom_headers_that_lie_are_decoded_or_refused() -> None:
    record("fuzz", examples=fuzz(dicom_headers(), (100, 3000), decoded_or_refused))


# --------------------------------------------------------------------------- grounding

FINDINGS = example_findings()
FACTS, BOXES = facts_from_findings(FINDINGS)
CHECKER = GroundingChecker(FACTS, BOXES, stated_texts(FINDINGS))
WORDS = [
    "the", "vertical", "cup-to-disc", "ratio", "CDR", "is", "CRAE", "CRVE", "AVR", "zone",
    "B", "C", "arterial", "venous", "fractal", "dimension", "tortuosity", "vessel", "density",
    "width", "hard", "exudates", "microaneurysms", "haemorrhages", "from", "the", "fovea",
    "DD", "µm", "%", "mm", "px", "visual", "acuity", "IOP", "of", "about", "and", "grade",
    "at", "there", "are", ",", ";", ".", ":", "(", ")", "\n", "-", "1.", "•",
]  # fmt: skip


@st.composite
def answers(draw: st.DrawFn) -> str:
    """Text a small model might write: clinical words, measured and invented numbers, boxes."""
    measured_numbers = [f"{fact.value:.{fact.decimals}f}" for fact in FACTS]
    number = st.one_of(
        st.sampled_from(measured_numbers),
        st.floats(-1000, 1000, allow_nan=False).map(lambda x: f"{x:.{abs(int(x)) % 4}f}"),
        st.integers(-5, 500).map(str),
    )
    box = st.lists(st.floats(0, 1), min_size=4, max_size=4).map(
        lambda xs: "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"
    )
    token = st.one_of(st.sampled_from(WORDS), number, box, st.text(max_size=3))
    return " ".join(draw(st.lists(token, max_size=40)))


def grounded(answer: str) -> None:
    result = CHECKER.check(answer)
    for value in result.values:
        if value.measured:
            assert value.findings_key, value
    again = CHECKER.check(result.answer)
    assert again.unmatched == 0, (answer, result.answer, again.values)


def test_the_grounding_checker_accepts_only_measured_values_and_its_repair_is_final() -> None:
    record("fuzz", examples=fuzz(answers(), (300, 10000), grounded))
