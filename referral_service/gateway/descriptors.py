"""What the gateway, the OpenAPI document and the Markdown reference read from the protos.

Everything comes from descriptors, never from hand-written tables:

- services, methods, messages and their options from the descriptor pool the generated ``_pb2``
  modules populate (``google.api.http`` rules, ``(referral.v1.access)``, ``field_behavior``);
- comments from ``generated/referral/v1/api_descriptor.binpb``, a ``FileDescriptorSet`` written by
  ``make generate`` with ``--include_source_info`` (generated ``_pb2`` modules drop comments), and
  committed and packaged next to the stubs.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from referral.v1 import auth_pb2, errors_pb2, events_pb2, options_pb2, referral_pb2

#: The services the gateway exposes, in the order they are documented.
SERVICES: tuple[ServiceDescriptor, ...] = (
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    referral_pb2.DESCRIPTOR.services_by_name["ReferralService"],
    events_pb2.DESCRIPTOR.services_by_name["EventService"],
)
#: Our proto files, for the reference (errors.proto has no service but documents ErrorReason).
FILES: tuple[FileDescriptor, ...] = (
    auth_pb2.DESCRIPTOR,
    referral_pb2.DESCRIPTOR,
    events_pb2.DESCRIPTOR,
    errors_pb2.DESCRIPTOR,
    options_pb2.DESCRIPTOR,
)

DESCRIPTOR_SET = "api_descriptor.binpb"

# Field numbers inside FileDescriptorProto / DescriptorProto / ... used by SourceCodeInfo paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


@functools.cache
def comments() -> dict[str, str]:
    """Leading comment of every service, method, message, field, oneof, enum and enum value of
    our files, by full name (``referral.v1.User.email``)."""
    data = importlib.resources.files("referral.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    found: dict[str, str] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        by_path = {
            tuple(location.path): _clean(location.leading_comments)
            for location in file.source_code_info.location
            if location.leading_comments
        }
        for name, path in _named_paths(file):
            if path in by_path:
                found[name] = by_path[path]
    return found


def _clean(comment: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in comment.strip("\n").split("\n")]
    return "\n".join(lines).strip()


def _named_paths(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, tuple[int, ...]]]:
    package = file.package

    def enum(
        prefix: str, value: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...]
    ) -> Iterator[tuple[str, tuple[int, ...]]]:
        name = f"{prefix}.{value.name}"
        yield name, path
        # Enum values are scoped like siblings of the enum (C++ scoping rules).
        for i, item in enumerate(value.value):
            yield f"{prefix}.{item.name}", (*path, _ENUM_VALUE, i)

    def message(
        prefix: str, value: descriptor_pb2.DescriptorProto, path: tuple[int, ...]
    ) -> Iterator[tuple[str, tuple[int, ...]]]:
        name = f"{prefix}.{value.name}"
        yield name, path
        for i, item in enumerate(value.field):
            yield f"{name}.{item.name}", (*path, _MESSAGE_FIELD, i)
        for i, oneof in enumerate(value.oneof_decl):
            yield f"{name}.{oneof.name}", (*path, _MESSAGE_ONEOF, i)
        for i, nested in enumerate(value.nested_type):
            yield from message(name, nested, (*path, _MESSAGE_NESTED, i))
        for i, nested_enum in enumerate(value.enum_type):
            yield from enum(name, nested_enum, (*path, _MESSAGE_ENUM, i))

    for i, msg in enumerate(file.message_type):
        yield from message(package, msg, (_FILE_MESSAGE, i))
    for i, top_enum in enumerate(file.enum_type):
        yield from enum(package, top_enum, (_FILE_ENUM, i))
    for i, service in enumerate(file.service):
        name = f"{package}.{service.name}"
        yield name, (_FILE_SERVICE, i)
        for j, method in enumerate(service.method):
            yield f"{name}.{method.name}", (_FILE_SERVICE, i, _SERVICE_METHOD, j)


def comment(full_name: str) -> str:
    return comments().get(full_name, "")


def summary(full_name: str) -> str:
    """The first sentence of a comment."""
    text = " ".join(comment(full_name).split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


# --- options ------------------------------------------------------------------------------


def needs_token(method: MethodDescriptor) -> bool:
    """True when the ``(referral.v1.access)`` option says the RPC needs an access token (an
    undeclared level counts as authenticated, as the option's documentation says)."""
    return bool(method.GetOptions().Extensions[options_pb2.access] != options_pb2.ACCESS_PUBLIC)


def access_name(method: MethodDescriptor) -> str:
    return str(options_pb2.Access.Name(method.GetOptions().Extensions[options_pb2.access]))


def scope(method: MethodDescriptor) -> str:
    """The ``(referral.v1.scope)`` a service token needs for the RPC ("" when none)."""
    return str(method.GetOptions().Extensions[options_pb2.scope])


def access_text(method: MethodDescriptor) -> str:
    """``ACCESS_AUTHENTICATED``, or with a scope ``ACCESS_SERVICE (scope users:read)``."""
    needed = scope(method)
    return f"{access_name(method)} (scope {needed})" if needed else access_name(method)


def behaviors(field: FieldDescriptor) -> set[str]:
    """``google.api.field_behavior`` values of a field, by name (``REQUIRED``, ``OUTPUT_ONLY``)."""
    return {
        field_behavior_pb2.FieldBehavior.Name(value)
        for value in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    }


@dataclass(frozen=True)
class Binding:
    """One HTTP binding of an RPC: ``verb`` + path ``template``, which part of the request the
    body fills (``""`` none, ``"*"`` all fields not bound by the path, or one field's name), and
    which response field is returned (``""`` the whole response)."""

    method: MethodDescriptor
    verb: str
    template: str
    body: str
    response_body: str

    @property
    def grpc_path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise ValueError(f"{method.full_name}: google.api.http rule without a pattern")
    if kind == "custom":
        verb, template = rule.custom.kind.upper(), rule.custom.path
    else:
        verb, template = kind.upper(), getattr(rule, kind)
    return Binding(method, verb, template, rule.body, rule.response_body)


def bindings(services: Sequence[ServiceDescriptor] = SERVICES) -> list[Binding]:
    """Every HTTP binding (primary and ``additional_bindings``) of every RPC."""
    found: list[Binding] = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                raise ValueError(f"{method.full_name} has no google.api.http annotation")
            rule = options.Extensions[annotations_pb2.http]
            found.append(_binding(method, rule))
            found.extend(_binding(method, extra) for extra in rule.additional_bindings)
    return found


def enum_values(enum: EnumDescriptor) -> list[str]:
    return [value.name for value in enum.values]


def message_of(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None
    return field.message_type
