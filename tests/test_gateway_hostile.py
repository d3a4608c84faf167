"""Hostile HTTP input through the wire (issue 12, item 11): a real server, real HTTP requests.
Every answer is the AIP-193 envelope with the right status, and a refused registration creates
nothing.

- Bodies not labelled ``application/json`` (forms, ``text/plain``, multipart, none): 415, so a
  web page cannot make its visitors' browsers register accounts (no CORS preflight guards those).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import PASSWORD, Api
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
