"""The one conversion between the findings' protobuf messages and their pydantic mirror.

Driven by the protobuf descriptors, so a field added to the .proto and to shared/findings.py
converts without new code; tests/test_findings_schema.py checks the two stay in step.
Enum values map by dropping the enum's prefix and lower-casing (QUALITY_GRADE_GOOD <-> "good");
value 0 (UNSPECIFIED) <-> None. Unset `optional` scalars and unset messages <-> None.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel

from protos.retinal.v1 import findings_pb2
from shared import findings

ModelT = TypeVar("ModelT", bound=BaseModel)
MessageT = TypeVar("MessageT", bound=Message)


def _enum_prefix(enum: EnumDescriptor) -> str:
    return enum.values_by_number[0].name.removesuffix("UNSPECIFIED")


def enum_to_str(enum: EnumDescriptor, number: int) -> str | None:
    if number == 0:
        return None
    return enum.values_by_number[number].name.removeprefix(_enum_prefix(enum)).lower()


def enum_from_str(enum: EnumDescriptor, value: str | None) -> int:
    if value is None:
        return 0
    return enum.values_by_name[_enum_prefix(enum) + str(value).upper()].number


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _scalar_from_proto(field: FieldDescriptor, value: Any) -> Any:
    if field.enum_type is not None:
        return enum_to_str(field.enum_type, value)
    return value


def message_to_dict(message: Message) -> dict[str, Any]:
    """A message as plain Python values shaped like the pydantic mirror."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if _is_map(field):
            out[field.name] = dict(value)
        elif _is_repeated(field):
            if field.message_type is not None:
                out[field.name] = [message_to_dict(item) for item in value]
            else:
                out[field.name] = [_scalar_from_proto(field, item) for item in value]
        elif field.message_type is not None:
            out[field.name] = message_to_dict(value) if message.HasField(field.name) else None
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _scalar_from_proto(field, value)
    return out


def _fill_message(message: Message, data: dict[str, Any]) -> None:
    descriptor: Descriptor = message.DESCRIPTOR
    for name, value in data.items():
        field = descriptor.fields_by_name[name]
        if value is None:
            continue
        if _is_map(field):
            getattr(message, name).update(value)
        elif _is_repeated(field):
            target = getattr(message, name)
            for item in value:
                if field.message_type is not None:
                    _fill_message(target.add(), item)
                elif field.enum_type is not None:
                    target.append(enum_from_str(field.enum_type, item))
                else:
                    target.append(item)
        elif field.message_type is not None:
            sub = getattr(message, name)
            sub.SetInParent()
            _fill_message(sub, value)
        elif field.enum_type is not None:
            setattr(message, name, enum_from_str(field.enum_type, value))
        else:
            setattr(message, name, value)


def to_proto(model: BaseModel, message_type: type[MessageT]) -> MessageT:
    message = message_type()
    _fill_message(message, model.model_dump(mode="json"))
    return message


def from_proto(message: Message, model_type: type[ModelT]) -> ModelT:
    return model_type.model_validate(message_to_dict(message))


def findings_to_proto(model: findings.Findings) -> findings_pb2.Findings:
    return to_proto(model, findings_pb2.Findings)


def findings_from_proto(message: findings_pb2.Findings) -> findings.Findings:
    return from_proto(message, findings.Findings)
