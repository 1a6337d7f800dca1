"""The findings document: protobuf and its pydantic mirror agree, and convert losslessly."""

from __future__ import annotations

import itertools

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel

from protos.retinal.v1 import findings_pb2
from shared import findings
from shared.convert import findings_from_proto, findings_to_proto

_counter = itertools.count(1)


def _value(field: FieldDescriptor) -> object:
    """A distinct, non-default value for a scalar field."""
    n = next(_counter)
    if field.enum_type is not None:
        return field.enum_type.values[-1].number  # the last value, never UNSPECIFIED
    return {
        FieldDescriptor.TYPE_DOUBLE: n + 0.25,
        FieldDescriptor.TYPE_FLOAT: n + 0.5,
        FieldDescriptor.TYPE_INT32: n,
        FieldDescriptor.TYPE_INT64: n,
        FieldDescriptor.TYPE_BOOL: True,
        FieldDescriptor.TYPE_STRING: f"s{n}",
    }[field.type]


def populate(message: Message) -> Message:
    """Set every field of the message, recursively, repeated fields with two items."""
    for field in message.DESCRIPTOR.fields:
        target = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target["a"] = 1.5
            target["b"] = 2.5
        elif field.is_repeated and field.message_type is not None:
            populate(target.add())
            populate(target.add())
        elif field.is_repeated:
            target.extend([_value(field), _value(field)])
        elif field.message_type is not None:
            populate(target)
        else:
            setattr(message, field.name, _value(field))
    return message


def test_a_fully_populated_document_round_trips_losslessly() -> None:
    original = populate(findings_pb2.Findings())
    model = findings_from_proto(original)
    assert findings_to_proto(model) == original
    # And through JSON, as the REST side sends it.
    again = findings.Findings.model_validate_json(model.model_dump_json())
    assert findings_to_proto(again) == original


def test_unset_optional_values_stay_absent_rather_than_zero() -> None:
    message = findings_pb2.Findings()
    message.disc.cdr_vertical = 0.0  # measured zero is a value
    model = findings_from_proto(message)
    assert model.disc is not None
    assert model.disc.cdr_vertical == 0.0
    assert model.disc.cdr_horizontal is None
    assert model.quality is None
    back = findings_to_proto(model)
    assert back.disc.HasField("cdr_vertical")
    assert not back.disc.HasField("cdr_horizontal")
    assert not back.HasField("quality")


def test_enums_read_as_lower_case_names() -> None:
    message = findings_pb2.Findings()
    message.quality.grade = findings_pb2.QUALITY_GRADE_REJECT
    message.image.calibration.source = findings_pb2.CALIBRATION_SOURCE_DICOM
    dumped = findings_from_proto(message).model_dump(mode="json", exclude_none=True)
    assert dumped["quality"]["grade"] == "reject"
    assert dumped["image"]["calibration"]["source"] == "dicom"


def _messages(descriptor: Descriptor) -> dict[str, Descriptor]:
    found = {descriptor.name: descriptor}
    for field in descriptor.fields:
        sub = field.message_type
        if sub is not None and not sub.GetOptions().map_entry and sub.name not in found:
            found.update(_messages(sub))
    return found


@pytest.mark.parametrize("name", sorted(_messages(findings_pb2.Findings.DESCRIPTOR)))
def test_every_message_has_a_mirror_with_the_same_fields(name: str) -> None:
    descriptor = _messages(findings_pb2.Findings.DESCRIPTOR)[name]
    model: type[BaseModel] = getattr(findings, name)
    assert set(model.model_fields) == {field.name for field in descriptor.fields}


@pytest.mark.parametrize(
    "enum",
    list(findings_pb2.DESCRIPTOR.enum_types_by_name.values()),
    ids=lambda e: e.name,
)
def test_every_enum_has_a_mirror_with_the_same_values(enum: EnumDescriptor) -> None:
    mirror = getattr(findings, enum.name)
    prefix = enum.values[0].name.removesuffix("UNSPECIFIED")
    assert {m.value for m in mirror} == {
        v.name.removeprefix(prefix).lower() for v in enum.values if v.number != 0
    }
