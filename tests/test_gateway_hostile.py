"""Hostile HTTP input through the wire (issue 12, items 5 and 11): a real server, real HTTP
requests (httpx, or raw bytes on a socket where httpx would refuse to send them). Every answer is
the AIP-193 envelope with the right status, never a plain-text 500 or a logged traceback, and a
refused registration creates nothing.

- JSON nested deeper than 32 levels, invalid UTF-8, a non-object top level, duplicate keys,
  numbers beyond a double or out of range for int32/int64 fields, lone surrogates: 400.
- Authorization that is not visible ASCII: 401; X-Forwarded-For that is not: never believed.
- Bodies not labelled ``application/json`` (forms, ``text/plain``, multipart, none): 415, so a
  web page cannot make its visitors' browsers register accounts (no CORS preflight guards those).
- Bad percent-encoding in the path or query, unknown query parameters: 400; a declared
  Content-Length over the limit: 413 at once; a request that is not HTTP/1.1: 400 envelope.
- Whatever else goes wrong inside the gateway: 500 INTERNAL envelope, logged once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from google.protobuf import json_format
from hypothesis import strategies as st

from referral_service.gateway import descriptors, transcoder
from referral_service.gateway.paths import compile_template
from tests.conftest import PASSWORD, Api, Stack, start_api, stop_api
from tests.test_fuzz import draw, message_strategy
from tests.test_gateway import assert_envelope, reason, violations

pytestmark = pytest.mark.one_stack


@pytest.fixture
async def http(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    assert api.app.http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}", timeout=30) as client:
        yield client


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing in the test may log an error (uvicorn logs 'Exception in ASGI application' with a
    traceback when the application raises)."""
    with caplog.at_level(logging.WARNING):
        yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def assert_not_registered(api: Api, email: str) -> None:
    """The email is still free: registering it over gRPC works."""
    user = await api.register(email)
    assert user.email == email


def register_body(email: str, **extra: Any) -> dict[str, Any]:
    return {"email": email, "password": PASSWORD, **extra}


# --- item 5: bodies -------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def body_with(email: str, tail: bytes = b"", password: bytes | None = None) -> bytes:
    """A registration body as raw bytes: the email, the password (raw JSON string contents) and
    ``tail`` (raw members after them)."""
    secret = PASSWORD.encode() if password is None else password
    return b'{"email": "' + email.encode() + b'", "password": "' + secret + b'"' + tail + b"}"


@pytest.mark.parametrize(
    "make_body",
    [
        pytest.param(lambda email: nested(1100), id="arrays-1100-deep"),
        pytest.param(
            lambda email: body_with(email, b', "referralCode": ' + b'{"a": ' * 1100 + b"1" + b"}" * 1100),
            id="objects-1100-deep-in-a-field",
        ),
        pytest.param(lambda email: body_with(email, b', "referralCode": ' + nested(32)), id="33-levels"),
    ],
)
async def test_deeply_nested_json_is_400_naming_the_limit(
    api: Api, http: httpx.AsyncClient, no_tracebacks: None, make_body: Any
) -> None:
    email = api.unique_email()
    response = await http.post(
        "/v1/auth/register", content=make_body(email), headers={"content-type": "application/json"}
    )
    body = assert_envelope(response, 400, "INVALID_ARGUMENT")
    assert reason(response) == "VALIDATION_FAILED"
    assert violations(response) == {"": "TOO_DEEP"}
    assert "deeper than 32 levels" in body["error"]["message"]
    await assert_not_registered(api, email)


async def test_nesting_up_to_the_limit_is_read_as_json(api: Api, http: httpx.AsyncClient) -> None:
    """32 levels parse (and then fail field validation like any wrong type, not as too deep)."""
    body = body_with("a@example.com", b', "referralCode": ' + nested(31))
    response = await http.post(
        "/v1/auth/register", content=body, headers={"content-type": "application/json"}
    )
    assert_envelope(response, 400, "INVALID_ARGUMENT")
    assert violations(response) == {"referral_code": "INVALID"}


@pytest.mark.parametrize(
    ("make_body", "expected"),
    [
        pytest.param(
            lambda email: body_with(email, password=b"\xff\xfe"), {"": "MALFORMED"}, id="invalid-utf8"
        ),
        pytest.param(lambda email: b'"' + email.encode() + b'"', {"": "MALFORMED"}, id="top-level-string"),
        pytest.param(lambda email: b"42", {"": "MALFORMED"}, id="top-level-number"),
        pytest.param(lambda email: b"null", {"": "MALFORMED"}, id="top-level-null"),
        pytest.param(lambda email: b"true", {"": "MALFORMED"}, id="top-level-bool"),
        pytest.param(lambda email: b"[" + body_with(email) + b"]", {"": "MALFORMED"}, id="top-level-array"),
        pytest.param(
            lambda email: b'{"email": "someone-else@example.com", ' + body_with(email)[1:],
            {"": "MALFORMED"},
            id="duplicate-key",
        ),
        pytest.param(
            lambda email: body_with(email, b', "\\ud800": 1'), {"": "MALFORMED"}, id="lone-surrogate-in-a-key"
        ),
        pytest.param(
            lambda email: body_with(email, password=b"\\udfff" + PASSWORD.encode()),
            {"password": "INVALID"},
            id="lone-surrogate-in-a-value",
        ),
        pytest.param(
            lambda email: body_with(email, b', "referralCode": 1e400'),
            {"": "MALFORMED"},
            id="number-beyond-a-double",
        ),
        pytest.param(
            lambda email: body_with(email, b', "referralCode": 1' + b"0" * 5000),
            {"": "MALFORMED"},
            id="integer-of-5000-digits",
        ),
        pytest.param(
            lambda email: b"\xef\xbb\xbf" + body_with(email), {"": "MALFORMED"}, id="byte-order-mark"
        ),
    ],
)
async def test_hostile_json_bodies_are_400(
    api: Api, http: httpx.AsyncClient, no_tracebacks: None, make_body: Any, expected: dict[str, str]
) -> None:
    email = api.unique_email()
    response = await http.post(
        "/v1/auth/register", content=make_body(email), headers={"content-type": "application/json"}
    )
    assert_envelope(response, 400, "INVALID_ARGUMENT")
    assert reason(response) == "VALIDATION_FAILED"
    assert violations(response) == expected
    await assert_not_registered(api, email)


async def test_duplicate_keys_are_named(http: httpx.AsyncClient) -> None:
    """Two parsers could disagree on which duplicate wins (a proxy checks one, we use the other):
    a duplicate is refused and named."""
    response = await http.post(
        "/v1/auth/login",
        content=b'{"email": "a@example.com", "password": "x", "password": "y"}',
        headers={"content-type": "application/json"},
    )
    body = assert_envelope(response, 400, "INVALID_ARGUMENT")
    assert "'password' appears more than once" in body["error"]["message"]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (2**31, "max_uses"),
        (-(2**31) - 1, "max_uses"),
        (10**30, "max_uses"),
        (1.5, "max_uses"),
        ("12abc", "max_uses"),
        (1e300, "max_uses"),
    ],
)
async def test_numbers_out_of_range_for_int32_fields_are_400(
    api: Api, http: httpx.AsyncClient, no_tracebacks: None, value: Any, field: str
) -> None:
    _, token = await api.user_with_token()
    auth = {"Authorization": f"Bearer {token}"}
    response = await http.post(
        "/v1/users/me/referral-code", headers=auth, json={"ttl": "60s", "maxUses": value}
    )
    assert_envelope(response, 400, "INVALID_ARGUMENT")
    assert violations(response) == {field: "INVALID"}
    mine = await http.get("/v1/users/me/referral-code", headers=auth)
    assert_envelope(mine, 404, "NOT_FOUND")  # no code was created


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/v1/users/{2**63}/referrals", {"referrer_id": "INVALID"}),
        (f"/v1/users/{-(2**63) - 1}/referrals", {"referrer_id": "INVALID"}),
        (f"/v1/users/1{'0' * 5000}/referrals", {"referrer_id": "INVALID"}),
        (f"/v1/users/1/referrals?pageSize={2**31}", {"page_size": "INVALID"}),
        ("/v1/users/1/referrals?pageSize=1.5", {"page_size": "INVALID"}),
        ("/v1/users/1/referrals?pageSize=NaN", {"page_size": "INVALID"}),
        ("/v1/users/1/referrals?pageSizes=1", {"pageSizes": "UNKNOWN_FIELD"}),
        ("/v1/users/1/referrals?page_size.x=1", {"page_size.x": "UNKNOWN_FIELD"}),
        ("/v1/users/1/referrals?" + ".".join(["a"] * 2000) + "=1", {".".join(["a"] * 2000): "UNKNOWN_FIELD"}),
        ("/v1/referral-codes/by-email/a%ZZ@example.com", {"": "MALFORMED"}),
        ("/v1/referral-codes/by-email/a%ff%fe@example.com", {"": "MALFORMED"}),
        ("/v1/referral-codes/by-email/a%C3@example.com", {"": "MALFORMED"}),
        ("/v1/referral-codes/by-email/a%@example.com", {"": "MALFORMED"}),
        ("/v1/users/1/referrals?pageToken=%ff", {"": "MALFORMED"}),
        ("/v1/users/1/referrals?pageSize=%zz", {"": "MALFORMED"}),
        ("/v1/users/1/referrals?%=1", {"": "MALFORMED"}),
    ],
)
async def test_hostile_paths_and_queries_are_400(
    api: Api, http: httpx.AsyncClient, no_tracebacks: None, path: str, expected: dict[str, str]
) -> None:
    _, token = await api.user_with_token()
    response = await http.get(path, headers={"Authorization": f"Bearer {token}"})
    assert_envelope(response, 400, "INVALID_ARGUMENT")
    assert reason(response) == "VALIDATION_FAILED"
    assert violations(response) == expected


async def test_long_urls_and_header_values_get_envelopes(
    http: httpx.AsyncClient, no_tracebacks: None
) -> None:
    long_path = await http.get("/v1/referral-codes/by-email/" + "a" * 12_000 + "@example.com")
    assert_envelope(long_path, 400, "INVALID_ARGUMENT")
    long_token = await http.get("/v1/users/me", headers={"Authorization": "Bearer " + "a" * 12_000})
    assert_envelope(long_token, 401, "UNAUTHENTICATED")
    assert reason(long_token) == "TOKEN_INVALID"
    long_id = await http.get("/healthz", headers={"x-request-id": "r" * 12_000})
    assert long_id.status_code == 200
    assert len(long_id.headers["x-request-id"]) <= 128  # a fresh id, not the caller's


# --- item 5: headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer \xff\xfe",
        b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.\xe9",
        b"Bearer a\tb",
        b"Bearer\tabc",
        b"Bearer \x80",
    ],
    ids=["non-ascii", "non-ascii-in-a-jwt", "tab-in-token", "tab-after-scheme", "obs-text"],
)
async def test_authorization_that_is_not_visible_ascii_is_401(
    api: Api, http: httpx.AsyncClient, no_tracebacks: None, value: bytes
) -> None:
    me = await http.get("/v1/users/me", headers={"authorization": value})
    assert_envelope(me, 401, "UNAUTHENTICATED")
    assert reason(me) == "TOKEN_INVALID"
    assert me.headers["www-authenticate"].startswith("Bearer ")
    logout = await http.post("/v1/auth/logout", json={}, headers={"authorization": value})
    assert_envelope(logout, 401, "UNAUTHENTICATED")
    # a public method does not read the header, but a corrupt one is refused all the same
    email = api.unique_email()
    register = await http.post(
        "/v1/auth/register", json=register_body(email), headers={"authorization": value}
    )
    assert_envelope(register, 401, "UNAUTHENTICATED")
    await assert_not_registered(api, email)


async def test_authorization_with_a_control_character_is_401(api: Api, no_tracebacks: None) -> None:
    """h11 lets control characters through in header values; httpx will not send them."""
    assert api.app.http_port
    status, headers, body = await exchange(
        api.app.http_port,
        b"GET /v1/users/me HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"authorization: Bearer \x01\x1b[0m\r\n\r\n",
    )
    data = raw_envelope(status, headers, body, 401, "UNAUTHENTICATED")
    assert data["error"]["details"][0]["reason"] == "TOKEN_INVALID"


async def test_a_forwarded_address_that_is_not_visible_ascii_is_not_believed(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """From a trusted proxy, X-Forwarded-For names the client; a value that is not visible ASCII
    is ignored (the proxy itself is the client), so odd bytes cannot mint new addresses (a
    no-break space or NEL around an address used to be stripped and the address believed)."""
    api = await start_api(
        stack, rate_limit_register_address="2/1h", rate_limit_trusted_proxies=["127.0.0.2/32"]
    )
    try:
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{api.app.http_port}", transport=transport
        ) as client:
            statuses = []
            for index, forwarded in enumerate(
                [b"203.0.113.1\xa0", b"\x85203.0.113.2", b"[fe80::1%\xff]", b"203.0.113.4\t\xc3\xa9"]
            ):
                response = await client.post(
                    "/v1/auth/register",
                    json=register_body(api.unique_email(f"fwd{index}")),
                    headers={"x-forwarded-for": forwarded},
                )
                statuses.append(response.status_code)
                if response.status_code != 200:
                    assert_envelope(response, 429, "RESOURCE_EXHAUSTED")
            # all four counted against the proxy's own address: two pass, the rest are limited
            assert statuses[:2] == [200, 200]
            assert set(statuses[2:]) == {429}
    finally:
        await stop_api(api)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_origin_that_is_not_visible_ascii_is_not_echoed(stack: Stack) -> None:
    """With CORS open to any origin, the request's Origin is echoed back: only a sane one."""
    api = await start_api(stack, http_cors_origins="*")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as client:
            good = await client.get("/healthz", headers={"origin": "https://app.example.com"})
            assert good.headers["access-control-allow-origin"] == "https://app.example.com"
            odd = await client.get("/healthz", headers={"origin": b"https://\xe9vil.example\tx"})
            assert odd.status_code == 200
            assert "access-control-allow-origin" not in odd.headers
    finally:
        await stop_api(api)


# --- item 11: only JSON bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",
        "text/plain",
        "text/plain; charset=utf-8",
        "multipart/form-data; boundary=xyz",
        None,
        "",
        "application/json; charset=iso-8859-1",
        "application/json; charset=utf-16",
        "application/jsonp",
        "application/json-patch",
        "text/json",
        "application/x-json",
    ],
)
async def test_a_json_body_not_labelled_json_is_415_and_registers_nobody(
    api: Api, http: httpx.AsyncClient, no_tracebacks: None, content_type: str | None
) -> None:
    """What a cross-site HTML form (or fetch without preflight) can send: the JSON text as a form,
    text/plain or multipart body. It is refused before it is read; no account is created."""
    email = api.unique_email("csrf")
    headers = {} if content_type is None else {"content-type": content_type}
    response = await http.post("/v1/auth/register", content=json.dumps(register_body(email)), headers=headers)
    body = assert_envelope(response, 415, "INVALID_ARGUMENT")
    assert reason(response) == "HTTP_UNSUPPORTED_MEDIA_TYPE"
    assert "application/json" in body["error"]["message"]
    await assert_not_registered(api, email)


async def test_forms_are_refused_whatever_their_shape(
    api: Api, http: httpx.AsyncClient, no_tracebacks: None
) -> None:
    """A real HTML form (urlencoded or multipart) is what a cross-site page posts: refused."""
    email = api.unique_email("form")
    await api.register(email)
    form = await http.post("/v1/auth/login", data={"email": email, "password": PASSWORD})
    assert_envelope(form, 415, "INVALID_ARGUMENT")
    multipart = await http.post(
        "/v1/auth/login", data={"email": email, "password": PASSWORD}, files={"f": b"x"}
    )
    assert_envelope(multipart, 415, "INVALID_ARGUMENT")
    new = api.unique_email("form")
    registered = await http.post("/v1/auth/register", data=register_body(new))
    assert_envelope(registered, 415, "INVALID_ARGUMENT")
    await assert_not_registered(api, new)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        'Application/JSON;charset="UTF-8"',
        "application/vnd.example+json",
    ],
)
async def test_json_bodies_labelled_json_are_read(
    api: Api, http: httpx.AsyncClient, content_type: str
) -> None:
    email = api.unique_email()
    response = await http.post(
        "/v1/auth/register", content=json.dumps(register_body(email)), headers={"content-type": content_type}
    )
    assert response.status_code == 200, response.text
    assert response.json()["user"]["email"] == email


async def test_no_body_is_an_empty_request_whatever_the_content_type(
    api: Api, http: httpx.AsyncClient
) -> None:
    """A POST without a body (``curl -X POST``) is the empty request ``{}``: there is nothing to
    misread, so no Content-Type is needed. Logout needs no fields; Register says what is missing."""
    _, token = await api.user_with_token()
    auth = {"Authorization": f"Bearer {token}"}
    logout = await http.post("/v1/auth/logout", headers=auth)
    assert logout.status_code == 200, logout.text
    empty = await http.post("/v1/auth/register", headers={"content-type": "text/plain"})
    assert_envelope(empty, 400, "INVALID_ARGUMENT")
    assert set(violations(empty)) == {"email", "password"}


# --- item 5: below and beside the JSON --------------------------------------------------------


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; read the response until the server closes the connection. The time limit
    only turns a hang (the server waiting for a body that never comes) into a failure."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        chunks = b""
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            chunks, body = chunks + body[:size], body[size + 2 :]
        body = chunks
    return int(status_line.split()[1]), headers, body


def raw_envelope(
    status: int, headers: dict[str, str], body: bytes, http_status: int, code: str
) -> dict[str, Any]:
    assert status == http_status, body
    assert headers["content-type"] == "application/json"
    data = json.loads(body)
    assert set(data) == {"error"}
    assert data["error"]["code"] == http_status
    assert data["error"]["status"] == code
    request_info = [d for d in data["error"]["details"] if d["@type"].endswith("RequestInfo")]
    assert request_info[0]["requestId"] == headers["x-request-id"]
    return dict(data)


async def test_a_declared_body_over_the_limit_is_413_without_reading_it(
    api: Api, no_tracebacks: None
) -> None:
    """Content-Length past REFERRAL_HTTP_MAX_BODY_BYTES is answered at once: the server does not
    wait for gigabytes that never come (this request sends one byte of them)."""
    port = api.app.http_port
    assert port
    for length in (b"99999999999999999999", b"262145"):
        status, headers, body = await exchange(
            port,
            b"POST /v1/auth/register HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + length + b"\r\n\r\n{",
        )
        data = raw_envelope(status, headers, body, 413, "RESOURCE_EXHAUSTED")
        assert data["error"]["details"][0]["reason"] == "HTTP_REQUEST_TOO_LARGE"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/referral-codes/by-email/\xff@example.com HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /v1/users/me HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n",
        b"POST /v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"POST /v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
        b"POST /v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-length: " + b"9" * 100 + b"\r\n\r\n{}",
    ],
    ids=[
        "request-line",
        "non-ascii-path",
        "header-without-colon",
        "negative-length",
        "two-lengths",
        "absurd-length",
    ],
)
async def test_requests_that_are_not_http_get_an_envelope(
    api: Api, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    """h11 refuses these before the application sees them; the answer is still the envelope (not
    uvicorn's plain text), with a request id and an access line."""
    port = api.app.http_port
    assert port
    with caplog.at_level(logging.INFO, logger="referral_service.access"):
        status, headers, body = await exchange(port, request_bytes)
    data = raw_envelope(status, headers, body, 400, "INVALID_ARGUMENT")
    assert data["error"]["details"][0]["reason"] == "VALIDATION_FAILED"
    lines = [r for r in caplog.records if r.name == "referral_service.access"]
    assert [(r.route, r.http_status, r.request_id) for r in lines] == [  # type: ignore[attr-defined]
        ("(malformed HTTP)", 400, headers["x-request-id"])
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- the last resort --------------------------------------------------------------------------


async def test_an_unexpected_error_before_the_rpc_is_a_500_envelope_logged_once(
    api: Api, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the gateway itself (simulated: building the request message raises) is a 500
    INTERNAL envelope with the request id, nothing about the error; the traceback is logged
    once, by the gateway (uvicorn logs nothing); nothing is registered."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail of a gateway bug")

    monkeypatch.setattr(transcoder, "to_message", broken)
    email = api.unique_email()
    with caplog.at_level(logging.INFO):
        response = await http.post(
            "/v1/auth/register", json=register_body(email), headers={"x-request-id": "bug-1"}
        )
    body = assert_envelope(response, 500, "INTERNAL")
    assert reason(response) == "INTERNAL_ERROR"
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    assert "bug-1" in body["error"]["message"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.exc_info is not None) for r in errors] == [("referral_service.gateway", True)]
    assert "secret detail of a gateway bug" in caplog.text
    (line,) = [r for r in caplog.records if r.name == "referral_service.access"]
    assert (line.code, line.reason, line.http_status) == ("INTERNAL", "INTERNAL_ERROR", 500)  # type: ignore[attr-defined]
    monkeypatch.undo()
    await assert_not_registered(api, email)


async def test_an_unexpected_error_past_the_pipeline_is_a_500_envelope(
    api: Api, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that escapes the method's chain (simulated: the invoker raises) is a 500
    envelope too, logged once."""
    assert api.app.http is not None
    gateway = api.app.http.app

    async def broken(request: Any, call: Any) -> Any:
        raise KeyError("secret-key-name")

    monkeypatch.setitem(gateway._invokers, "/referral.v1.AuthService/GetJwks", broken)
    with caplog.at_level(logging.WARNING):
        response = await http.get("/.well-known/jwks.json")
    assert_envelope(response, 500, "INTERNAL")
    assert "secret" not in response.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["referral_service.gateway"]


# --- fuzz: whatever arrives, an envelope ------------------------------------------------------

#: JSON values of every shape, NaN and infinities included (json.dumps writes them).
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
#: Header values h11 lets through (no control characters but TAB; obs-text allowed).
HEADER_BYTES = st.binary(max_size=40).map(
    lambda raw: bytes(c for c in raw if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")
)


def _json_of(message: Any) -> bytes | None:
    """The message as JSON; None when it holds a value JSON cannot express (the message
    strategies also make out-of-range Durations and Timestamps, which only the binary form can
    carry: the fuzz of tests/test_fuzz.py sends those)."""
    try:
        return json.dumps(json_format.MessageToDict(message)).encode()
    except (json_format.SerializeToJsonError, ValueError):
        return None


def _body(binding: descriptors.Binding) -> st.SearchStrategy[bytes]:
    shaped = message_strategy(binding.method.input_type).map(_json_of).filter(lambda body: body is not None)
    return st.one_of(
        shaped,
        JSON_VALUES.map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=200),
        st.integers(0, 60).map(lambda depth: b'{"email": ' + b"[" * depth * 20 + b"]" * depth * 20 + b"}"),
    )


def _path(binding: descriptors.Binding) -> st.SearchStrategy[str]:
    template = compile_template(binding.template).openapi_path
    segment = st.one_of(
        st.text(max_size=30).map(lambda text: quote(text, safe="")),
        st.text(alphabet="%abcdefABCDEF0123456789@.+ ", max_size=30),
        st.sampled_from(["1", "me", str(2**63), "-1", "%", "%ff", "%C3"]),
    )
    names = re.findall(r"\{([^}]+)\}", template)
    query = st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=3).map(urlencode)

    def build(values: list[str], query_string: str) -> str:
        path = template
        for name, value in zip(names, values, strict=True):
            path = path.replace("{" + name + "}", value or "x", 1)
        return path + ("?" + query_string if query_string and binding.body != "*" else "")

    return st.builds(build, st.lists(segment, min_size=len(names), max_size=len(names)), query)


@pytest.mark.parametrize("binding", descriptors.bindings(), ids=lambda b: f"{b.verb} {b.template}")
async def test_fuzzed_http_requests_always_get_an_envelope(
    api: Api, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, binding: descriptors.Binding
) -> None:
    """Random paths, queries, bodies, content types and Authorization / X-Forwarded-For values
    on every route: the answer is JSON, success or the envelope, never a 5xx; nothing logs an
    error."""
    _, token = await api.user_with_token()
    requests = st.tuples(
        _path(binding),
        _body(binding) if binding.body else st.just(b""),
        st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", None]),
        st.one_of(st.just(b"Bearer " + token.encode()), st.none(), HEADER_BYTES),
        st.one_of(st.none(), HEADER_BYTES),
    )
    with caplog.at_level(logging.WARNING):
        for path, body, content_type, authorization, forwarded in draw(requests):
            headers: dict[str, Any] = {}
            if content_type:
                headers["content-type"] = content_type
            if authorization:
                headers["authorization"] = authorization
            if forwarded:
                headers["x-forwarded-for"] = forwarded
            what = (binding.verb, path, body[:200], headers)
            response = await http.request(binding.verb, path, content=body or None, headers=headers)
            assert response.status_code < 500, what
            assert response.headers["content-type"] == "application/json", what
            data = response.json()
            if response.status_code != 200:
                assert set(data) == {"error"}, what
                assert set(data["error"]) == {"code", "message", "status", "details"}, what
                assert data["error"]["code"] == response.status_code, what
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (await http.get("/healthz")).json() == {"status": "SERVING"}
