"""HTTP request parts -> request message, with protobuf's JSON mapping and field-level errors.

``google.protobuf.json_format`` does the mapping (lowerCamelCase or original field names, int64
as strings or numbers, Timestamp/Duration strings, enum names); this module adds what a client
needs when it gets something wrong: one ``BadRequest`` field violation per bad field, named by its
proto field path, unknown fields rejected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


@dataclass(frozen=True)
class Violation:
    field: str
    description: str
    reason: str = "INVALID"


class RequestError(Exception):
    """The HTTP request cannot become a request message."""

    def __init__(self, message: str, violations: Sequence[Violation]) -> None:
        super().__init__(message)
        self.message = message
        self.violations = list(violations)


#: Deepest nesting of objects and arrays accepted in a request body. Our requests nest two or
#: three levels; the bound keeps a hostile body (``[[[[...``) from reaching the parser's recursion.
MAX_DEPTH = 32
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_SURROGATE = re.compile("[\ud800-\udfff]")


class _BadJson(ValueError):
    """Valid JSON syntax that a request must not use (the message says why)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _BadJson(f"the number {text[:40]} is out of range")
    return number


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadJson(f"the key {key[:100]!r} appears more than once in one object")
            seen.add(key)
    for key in data:
        if _SURROGATE.search(key):
            raise _BadJson("a key contains an unpaired UTF-16 surrogate")
    return data


def nesting_depth(raw: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep objects and arrays nest in ``raw`` (outside strings), counted up to ``limit + 1``.
    Works on the bytes: no UTF-8 sequence contains an ASCII byte."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0  # cannot nest deeper than it has brackets
    depth = deepest = 0
    for byte in _STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        depth += 1 if byte in b"[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity or numbers beyond a double, no duplicate keys, nesting at
    most ``MAX_DEPTH`` deep; a violation says what is wrong."""
    if nesting_depth(raw) > MAX_DEPTH:
        raise RequestError(
            f"the request body nests objects or arrays deeper than {MAX_DEPTH} levels",
            [Violation("", f"JSON nesting is limited to {MAX_DEPTH} levels", "TOO_DEEP")],
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(
            "the request body is not valid UTF-8", [Violation("", "the body must be UTF-8 JSON", "MALFORMED")]
        ) from None
    try:
        return json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite, object_pairs_hook=_object
        )
    except _BadJson as error:
        raise RequestError(
            f"the request body is not acceptable JSON: {error}", [Violation("", str(error), "MALFORMED")]
        ) from None
    except (ValueError, RecursionError) as error:
        raise RequestError(
            "the request body is not valid JSON", [Violation("", f"malformed JSON: {error}", "MALFORMED")]
        ) from None


def find_field(descriptor: Any, key: str) -> Any:
    """A field (FieldDescriptor or None) by its JSON name (``maxUses``) or proto name (``max_uses``)."""
    for field in descriptor.fields:
        if key in (field.json_name, field.name):
            return field
    return None


def _describe(error: Exception) -> str:
    # json_format names the message type and position ('... at "RegisterRequest.maxUses"'),
    # which says nothing to an HTTP client; keep the useful part.
    text = re.sub(r'\s+at "?[A-Za-z0-9_.\[\]]+"?\.?$', "", str(error)).rstrip(".")
    return text or "invalid value"


def _check(data: Mapping[str, Any], descriptor: Any, prefix: str, out: list[Violation]) -> None:
    cls = _message_class(descriptor)
    oneofs: dict[str, str] = {}
    for key, value in data.items():
        field = find_field(descriptor, key)
        path = f"{prefix}{field.name if field else key}"
        if field is None:
            out.append(Violation(path, f"unknown field {key!r}", "UNKNOWN_FIELD"))
            continue
        group = field.containing_oneof
        if group is not None and value is not None:
            if group.name in oneofs:
                members = ", ".join(item.json_name for item in group.fields)
                out.append(Violation(path, f"only one of {members} may be set", "ONEOF_CONFLICT"))
                continue
            oneofs[group.name] = path
        if (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and not field.message_type.GetOptions().map_entry
            and not _is_repeated(field)
            and isinstance(value, dict)
            and not field.message_type.full_name.startswith("google.protobuf.")
        ):
            _check(value, field.message_type, f"{path}.", out)
            continue
        try:
            json_format.ParseDict({key: value}, cls(), ignore_unknown_fields=False)
        except (json_format.ParseError, ValueError, TypeError) as error:
            out.append(Violation(path, _describe(error)))


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _message_class(descriptor: Any) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def to_message(data: Any, cls: type[Message], what: str = "the request") -> Message:
    """A JSON value -> message of ``cls``; RequestError with field violations when it does not
    fit."""
    if not isinstance(data, dict):
        raise RequestError(
            f"{what} must be a JSON object",
            [Violation("", f"expected a JSON object, got {type(data).__name__}", "MALFORMED")],
        )
    violations: list[Violation] = []
    _check(data, cls.DESCRIPTOR, "", violations)
    if violations:
        raise RequestError(f"{what} has invalid fields", violations)
    message = cls()
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError) as error:
        # Cross-field problems: two members of one oneof, a field given under both names.
        raise RequestError(f"{what} is invalid", [Violation("", _describe(error))]) from None
    return message


# --- path variables and query parameters --------------------------------------------------


def _scalar(field: FieldDescriptor, text: str, name: str) -> Any:
    """A query/path string -> the JSON value json_format expects for ``field``."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise RequestError(
            f"invalid value for {name}", [Violation(name, f"expected true or false, got {text!r}")]
        )
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        try:
            number = float(text)
        except ValueError:
            return text  # json_format explains the problem
        return number if math.isfinite(number) else text
    return text  # json_format parses integers, enums, Timestamp, Duration, bytes from strings


def set_path(
    data: dict[str, Any], descriptor: Any, dotted: str, values: Sequence[str], *, origin: str
) -> None:
    """Set ``a.b.c`` (proto or JSON names) in the JSON-space dict ``data`` from string values."""
    parts = dotted.split(".")
    target = data
    current: Any = descriptor
    for depth, part in enumerate(parts):
        field = find_field(current, part)
        path = ".".join(parts[: depth + 1])
        if field is None:
            raise RequestError(
                f"unknown {origin} {dotted!r}",
                [Violation(dotted, f"unknown field {part!r}", "UNKNOWN_FIELD")],
            )
        if depth < len(parts) - 1:
            if field.type != FieldDescriptor.TYPE_MESSAGE or _is_repeated(field):
                raise RequestError(
                    f"unknown {origin} {dotted!r}",
                    [Violation(dotted, f"{path} has no sub-fields", "UNKNOWN_FIELD")],
                )
            nested = target.setdefault(field.json_name, {})
            if not isinstance(nested, dict):
                raise RequestError(f"conflicting {origin} {dotted!r}", [Violation(dotted, "given twice")])
            target = nested
            current = field.message_type
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.full_name.startswith(
            "google.protobuf."
        ):
            raise RequestError(
                f"{origin} {dotted!r} names a message",
                [Violation(dotted, "set its fields instead (a.b=value)", "INVALID")],
            )
        if field.json_name in target:
            raise RequestError(
                f"{origin} {dotted!r} given twice", [Violation(dotted, "given more than once")]
            )
        converted = [_scalar(field, value, dotted) for value in values]
        if _is_repeated(field):
            target[field.json_name] = converted
        elif len(converted) > 1:
            raise RequestError(
                f"{origin} {dotted!r} given twice", [Violation(field.name, "a single value is expected")]
            )
        else:
            target[field.json_name] = converted[0]
