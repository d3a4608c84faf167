"""The OpenAPI 3.1 document, generated from the proto descriptors (never written by hand).

- paths and verbs from ``google.api.http``; path variables, query parameters (bindings without
  ``body: "*"``) and the request body as the transcoder reads them;
- schemas in protobuf's JSON mapping (lowerCamelCase names, 64-bit integers as strings,
  Timestamp as RFC 3339 strings, Duration as ``"3.5s"``, enums by name);
- proto comments as summaries and descriptions;
- ``google.api.field_behavior``: ``REQUIRED`` -> ``required``, ``OUTPUT_ONLY`` -> ``readOnly``,
  ``INPUT_ONLY`` -> ``writeOnly``;
- the bearer scheme on RPCs whose ``(referral.v1.access)`` is not ``ACCESS_PUBLIC``;
- the AIP-193 error envelope as the ``default`` response of every operation.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor
from referral.v1 import options_pb2

from referral_service.gateway import descriptors
from referral_service.gateway.paths import compile_template

F = FieldDescriptor
_SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT64: {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"},
    F.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": r"^[0-9]+$"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": r"^[0-9]+$"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    F.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339 timestamp, e.g. 2030-01-31T12:00:00Z.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": 'Duration in seconds with an "s" suffix, e.g. "604800s" for 7 days.',
    },
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object"},
}
ERROR_SCHEMA = "Error"
BEARER = "bearerAuth"
SERVICE = "serviceAuth"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


class _Builder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    # --- schemas ---------------------------------------------------------------------------

    def enum(self, enum: EnumDescriptor) -> dict[str, Any]:
        name = enum.full_name
        if name not in self.schemas:
            values = descriptors.enum_values(enum)
            lines = [descriptors.comment(name)] + [
                f"- `{value}`: {' '.join(descriptors.comment(_value_name(enum, value)).split())}"
                for value in values
            ]
            self.schemas[name] = {
                "type": "string",
                "enum": values,
                "description": "\n".join(line for line in lines if line),
            }
        return _ref(name)

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value)}
        single = self._single(field)
        if field.is_repeated:
            return {"type": "array", "items": single}
        return single

    def _single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.type == F.TYPE_MESSAGE:
            assert field.message_type is not None
            return self.message(field.message_type)
        if field.type == F.TYPE_ENUM:
            assert field.enum_type is not None
            return self.enum(field.enum_type)
        return dict(_SCALARS[field.type])

    def message(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        name = message.full_name
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder against recursion
            self.schemas[name] = self.object(message, exclude=())
        return _ref(name)

    def object(self, message: Descriptor, exclude: Sequence[str]) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required: list[str] = []
        for field in message.fields:
            if field.name in exclude:
                continue
            schema = self.field(field)
            behaviors = descriptors.behaviors(field)
            notes: list[str] = []
            text = descriptors.comment(field.full_name)
            if field.containing_oneof is not None and not field.containing_oneof.name.startswith("_"):
                siblings = [f"`{item.json_name}`" for item in field.containing_oneof.fields]
                notes.append(f"At most one of {', '.join(siblings)}.")
            if "$ref" in schema:
                # OpenAPI 3.1 allows siblings of $ref; keep the field's own documentation.
                schema = {**schema}
            description = " ".join(part for part in (text, *notes) if part)
            if description:
                schema["description"] = description
            if "OUTPUT_ONLY" in behaviors:
                schema["readOnly"] = True
            if "INPUT_ONLY" in behaviors:
                schema["writeOnly"] = True
            if "REQUIRED" in behaviors:
                required.append(field.json_name)
            properties[field.json_name] = schema
        result: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        if required:
            result["required"] = required
        description = descriptors.comment(message.full_name)
        if description:
            result["description"] = description
        return result

    # --- the error envelope ------------------------------------------------------------------

    def error(self) -> dict[str, str]:
        from google.rpc import code_pb2

        self.schemas[ERROR_SCHEMA] = {
            "type": "object",
            "description": (
                "The AIP-193 error envelope. `details` holds the google.rpc.Status details of "
                "the call, each with its `@type`: exactly one `google.rpc.ErrorInfo` (its `reason` "
                "is a `referral.v1.ErrorReason` name without the `ERROR_REASON_` prefix), a "
                "`google.rpc.BadRequest` for invalid fields, a `google.rpc.RetryInfo` when retrying "
                "later helps, and a `google.rpc.RequestInfo` whose `requestId` is in the server's "
                "logs."
            ),
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "status", "details"],
                    "properties": {
                        "code": {
                            "type": "integer",
                            "description": "The HTTP status code.",
                            "examples": [400],
                        },
                        "message": {"type": "string", "description": "A developer-facing message."},
                        "status": {
                            "type": "string",
                            "description": "The gRPC status code name (google.rpc.Code).",
                            "enum": list(code_pb2.Code.keys()),
                        },
                        "details": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["@type"],
                                "properties": {
                                    "@type": {
                                        "type": "string",
                                        "examples": ["type.googleapis.com/google.rpc.ErrorInfo"],
                                    }
                                },
                                "additionalProperties": True,
                            },
                        },
                    },
                }
            },
        }
        return _ref(ERROR_SCHEMA)


def _value_name(enum: EnumDescriptor, value: str) -> str:
    scope = enum.full_name.rsplit(".", 1)[0]
    return f"{scope}.{value}"


def _query_parameters(builder: _Builder, message: Any, exclude: set[str], prefix: str = "") -> list[Any]:
    """Query parameters for the fields not bound by the path (nested messages flattened with
    dots, as the transcoder accepts them)."""
    params: list[Any] = []
    for field in message.fields:
        name = f"{prefix}{field.name}"
        if name in exclude:
            continue
        is_message = field.type == F.TYPE_MESSAGE and field.message_type.full_name not in _WELL_KNOWN
        if is_message and not field.is_repeated:
            params.extend(_query_parameters(builder, field.message_type, exclude, f"{name}."))
            continue
        schema = builder.field(field)
        param: dict[str, Any] = {
            "name": f"{prefix}{field.json_name}",
            "in": "query",
            "required": "REQUIRED" in descriptors.behaviors(field),
            "schema": schema,
        }
        text = descriptors.comment(field.full_name)
        if text:
            param["description"] = text
        if field.is_repeated:
            param["explode"] = True
        params.append(param)
    return params


def document(title: str = "referral-service API") -> dict[str, Any]:
    builder = _Builder()
    error_ref = builder.error()
    paths: dict[str, dict[str, Any]] = {}
    tags = []
    for service in descriptors.SERVICES:
        tags.append({"name": service.name, "description": descriptors.comment(service.full_name)})
    for binding in descriptors.bindings():
        method = binding.method
        template = compile_template(binding.template)
        path_fields = {field_path for field_path, _ in template.variables}
        parameters: list[Any] = []
        for field_path, _ in template.variables:
            field = _resolve(method.input_type, field_path)
            param = {
                "name": field_path,
                "in": "path",
                "required": True,
                "schema": builder.field(field),
            }
            text = descriptors.comment(field.full_name)
            if text:
                param["description"] = text
            parameters.append(param)
        operation: dict[str, Any] = {
            "operationId": f"{method.containing_service.name}_{method.name}",
            "tags": [method.containing_service.name],
            "summary": descriptors.summary(method.full_name),
            "description": descriptors.comment(method.full_name)
            + f"\n\ngRPC: `{method.full_name}`; access: `{descriptors.access_text(method)}`.",
        }
        if binding.body == "*":
            if path_fields:
                schema = builder.object(method.input_type, exclude=sorted(path_fields))
            else:
                schema = builder.message(method.input_type)
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        else:
            if binding.body:
                field = _resolve(method.input_type, binding.body)
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": builder.field(field)}},
                }
                path_fields.add(field.name)
            parameters.extend(_query_parameters(builder, method.input_type, path_fields))
        if parameters:
            operation["parameters"] = parameters
        response_schema = (
            builder.field(method.output_type.fields_by_name[binding.response_body])
            if binding.response_body
            else builder.message(method.output_type)
        )
        ok: dict[str, Any] = {
            "description": "OK",
            "content": {"application/json": {"schema": response_schema}},
        }
        if method.server_streaming:
            ok = {
                "description": "A stream of messages: newline-delimited JSON (one message per line), or "
                "server-sent events (`data:` lines) when the request sends `Accept: text/event-stream`. An "
                "error after the stream started is a last line (event `error`) holding the error envelope.",
                "content": {
                    "application/x-ndjson": {"schema": response_schema},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            }
        operation["responses"] = {
            "200": ok,
            "default": {
                "description": "An error (AIP-193 envelope).",
                "content": {"application/json": {"schema": error_ref}},
            },
        }
        operation["security"] = _security(method)
        paths.setdefault(template.openapi_path, {})[binding.verb.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": _version(),
            "description": (
                "HTTP/JSON interface of referral-service, transcoded to its gRPC API "
                "(package `referral.v1`). Field names are lowerCamelCase (the original "
                "snake_case names are accepted too); 64-bit integers are strings; timestamps "
                "are RFC 3339. Send `Authorization: Bearer <accessToken>` (from `POST "
                "/v1/auth/login`) on operations that show a lock. Errors use the AIP-193 "
                "envelope."
            ),
        },
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": dict(sorted(builder.schemas.items())),
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "The accessToken from POST /v1/auth/login or /v1/auth/refresh.",
                },
                SERVICE: {
                    "type": "oauth2",
                    "description": (
                        "Service accounts (OAuth 2.0 client credentials). The token endpoint takes "
                        "JSON: {clientId, clientSecret, scopes}; send the accessToken it returns as "
                        "`Authorization: Bearer <accessToken>`."
                    ),
                    "flows": {
                        "clientCredentials": {
                            "tokenUrl": "/v1/auth/service-token",
                            "scopes": _scopes(),
                        }
                    },
                },
            },
        },
    }


def _security(method: MethodDescriptor) -> list[dict[str, list[str]]]:
    """Who may call: nobody in particular (``[]``), a user's bearer token, a service token with
    the RPC's scope, or (an empty requirement first) anyone, services served as such."""
    level = method.GetOptions().Extensions[options_pb2.access]
    scope = descriptors.scope(method)
    service = [{SERVICE: [scope]}] if scope else []
    if level == options_pb2.ACCESS_PUBLIC:
        return [{}, *service] if service else []
    if level == options_pb2.ACCESS_SERVICE:
        return service
    return [{BEARER: []}, *service]


def _scopes() -> dict[str, str]:
    """Each scope the RPCs declare, described by the RPCs it opens."""
    opened: dict[str, list[str]] = {}
    for service in descriptors.SERVICES:
        for method in service.methods:
            if scope := descriptors.scope(method):
                opened.setdefault(scope, []).append(f"{service.name}.{method.name}")
    return {scope: "Call " + ", ".join(methods) for scope, methods in sorted(opened.items())}


def _version() -> str:
    try:
        return importlib.metadata.version("referral-service")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


def _resolve(message: Descriptor, dotted: str) -> FieldDescriptor:
    current: Descriptor | None = message
    field: FieldDescriptor | None = None
    for part in dotted.split("."):
        assert current is not None
        field = current.fields_by_name.get(part) or next(
            (item for item in current.fields if item.json_name == part), None
        )
        if field is None:
            raise ValueError(f"{message.full_name} has no field {dotted!r}")
        current = field.message_type
    assert field is not None
    return field
