"""The HTTP/JSON gateway through the wire: a real server (gRPC + HTTP in one loop), called with
an HTTP client. The flow runs on SQLite and PostgreSQL+Redis; the transcoding and error tests,
which do not depend on storage, on SQLite only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from referral_service.app import SERVICES
from referral_service.gateway import descriptors
from referral_service.gateway.paths import TemplateError, compile_template
from tests.conftest import PASSWORD, Api, Stack, start_api, stop_api


@pytest.fixture
async def http(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    assert api.app.http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}", timeout=30) as client:
        yield client


def details(body: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [d for d in body["error"]["details"] if d["@type"] == f"type.googleapis.com/google.rpc.{kind}"]


def reason(response: httpx.Response) -> str:
    infos = details(response.json(), "ErrorInfo")
    assert len(infos) == 1, response.text
    return str(infos[0]["reason"])


def violations(response: httpx.Response) -> dict[str, str]:
    (bad,) = details(response.json(), "BadRequest")
    return {item["field"]: item.get("reason", "") for item in bad["fieldViolations"]}


def assert_envelope(response: httpx.Response, http_status: int, status: str) -> dict[str, Any]:
    assert response.status_code == http_status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "status", "details"}
    assert body["error"]["code"] == http_status
    assert body["error"]["status"] == status
    assert body["error"]["message"]
    (info,) = details(body, "RequestInfo")
    assert info["requestId"] == response.headers["x-request-id"]
    return body


async def login(http: httpx.AsyncClient, email: str) -> dict[str, str]:
    response = await http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['accessToken']}"}


async def test_the_whole_flow_over_http(api: Api, http: httpx.AsyncClient) -> None:
    alice = api.unique_email("alice")
    response = await http.post("/v1/auth/register", json={"email": alice, "password": PASSWORD})
    assert response.status_code == 200, response.text
    user = response.json()["user"]
    assert user["email"] == alice
    assert isinstance(user["id"], str)  # int64 is a JSON string
    assert user["isActive"] is True
    assert "password" not in response.text
    assert response.headers["cache-control"] == "no-store"

    tokens = (await http.post("/v1/auth/login", json={"email": alice, "password": PASSWORD})).json()
    assert tokens["tokenType"] == "Bearer"
    auth = {"Authorization": f"Bearer {tokens['accessToken']}"}
    me = (await http.get("/v1/users/me", headers=auth)).json()["user"]
    assert me["id"] == user["id"]

    created = await http.post(
        "/v1/users/me/referral-code", headers=auth, json={"ttl": "604800s", "maxUses": 100}
    )
    assert created.status_code == 200, created.text
    code = created.json()["referralCode"]
    assert code["state"] == "STATE_ACTIVE"
    assert code["maxUses"] == 100

    mine = (await http.get("/v1/users/me/referral-code", headers=auth)).json()
    assert mine["referralCode"]["code"] == code["code"]
    looked_up = await http.get(f"/v1/referral-codes/by-email/{alice.upper()}")
    assert looked_up.status_code == 200, looked_up.text
    assert looked_up.json()["referralCode"]["code"] == code["code"]

    for index in range(3):
        bob = await http.post(
            "/v1/auth/register",
            json={
                "email": api.unique_email(f"bob{index}"),
                "password": PASSWORD,
                "referralCode": code["code"],
            },
        )
        assert bob.status_code == 200, bob.text
        assert bob.json()["user"]["referrerId"] == user["id"]

    first = await http.get(f"/v1/users/{user['id']}/referrals", params={"pageSize": 2}, headers=auth)
    assert first.status_code == 200, first.text
    page = first.json()
    assert len(page["referrals"]) == 2
    assert page["totalSize"] == 3
    assert page["nextPageToken"]
    second = await http.get(
        f"/v1/users/{user['id']}/referrals",
        params={"page_size": 2, "page_token": page["nextPageToken"]},  # proto names work too
        headers=auth,
    )
    assert [r["code"] for r in second.json()["referrals"]] == [code["code"]]
    assert second.json()["nextPageToken"] == ""

    refreshed = await http.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})
    assert refreshed.status_code == 200, refreshed.text
    auth = {"Authorization": f"Bearer {refreshed.json()['accessToken']}"}
    assert (await http.delete("/v1/users/me/referral-code", headers=auth)).json() == {}
    gone = await http.get(f"/v1/referral-codes/by-email/{alice}")
    assert_envelope(gone, 404, "NOT_FOUND")
    assert reason(gone) == "REFERRAL_CODE_NOT_FOUND"

    assert (await http.post("/v1/auth/logout", headers=auth, json={})).status_code == 200
    revoked = await http.get("/v1/users/me", headers=auth)
    assert_envelope(revoked, 401, "UNAUTHENTICATED")
    assert reason(revoked) == "TOKEN_REVOKED"
    assert revoked.headers["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in revoked.headers["www-authenticate"]


@pytest.mark.one_stack
async def test_server_errors_keep_their_details(api: Api, http: httpx.AsyncClient) -> None:
    email = api.unique_email()
    await api.register(email)
    duplicate = await http.post(
        "/v1/auth/register",
        json={"email": email, "password": PASSWORD},
        headers={"x-request-id": "my-request-1"},
    )
    body = assert_envelope(duplicate, 409, "ALREADY_EXISTS")
    assert reason(duplicate) == "EMAIL_ALREADY_REGISTERED"
    assert duplicate.headers["x-request-id"] == "my-request-1"
    assert details(body, "ErrorInfo")[0]["domain"] == "referral-service"

    weak = await http.post("/v1/auth/register", json={"email": "not-an-email", "password": "short"})
    assert_envelope(weak, 400, "INVALID_ARGUMENT")
    assert reason(weak) == "VALIDATION_FAILED"
    assert set(violations(weak)) == {"email", "password"}

    missing = await http.get("/v1/users/me")
    assert_envelope(missing, 401, "UNAUTHENTICATED")
    assert reason(missing) == "TOKEN_MISSING"
    assert missing.headers["www-authenticate"] == 'Bearer realm="referral-service"'

    _, token = await api.user_with_token()
    other = await http.get("/v1/users/999999/referrals", headers={"Authorization": f"Bearer {token}"})
    assert_envelope(other, 403, "PERMISSION_DENIED")


@pytest.mark.one_stack
async def test_the_pipeline_runs_once_per_http_request(
    api: Api, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    email = api.unique_email()
    await api.register(email)
    auth = await login(http, email)
    with caplog.at_level(logging.INFO, logger="referral_service.access"):
        response = await http.get("/v1/users/me", headers={**auth, "x-request-id": "once-123"})
    assert response.status_code == 200
    # (The login's own line may land inside the block: it is written after its response.)
    records = [
        r
        for r in caplog.records
        if r.name == "referral_service.access" and getattr(r, "request_id", None) == "once-123"
    ]
    assert [r.method for r in records] == ["/referral.v1.AuthService/GetCurrentUser"]  # type: ignore[attr-defined]


@pytest.mark.one_stack
async def test_one_access_line_per_http_request_with_the_route_and_no_email(
    api: Api, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Every HTTP request, whether it reached an RPC or not, has exactly one access line with its
    request id, the route template (never the raw path) and the HTTP status; no email from a path
    or a query reaches the log. uvicorn's own access log is off."""
    email = api.unique_email("secret.person")
    _, token = await api.user_with_token(email)
    auth = {"Authorization": f"Bearer {token}"}
    requests: list[tuple[str, str, dict[str, Any], int, str, str]] = [
        # (verb, path, extra request arguments, HTTP status, route, method)
        (
            "GET",
            f"/v1/referral-codes/by-email/{email}",
            {},
            404,
            "GET /v1/referral-codes/by-email/{email}",
            "/referral.v1.ReferralService/GetReferralCodeByEmail",
        ),
        (
            "GET",
            "/v1/users/me",
            {"headers": auth},
            200,
            "GET /v1/users/me",
            "/referral.v1.AuthService/GetCurrentUser",
        ),
        ("GET", "/v1/users/me", {}, 401, "GET /v1/users/me", "/referral.v1.AuthService/GetCurrentUser"),
        (
            "POST",
            f"/v1/auth/login?email={email}",
            {"json": {}},
            400,
            "POST /v1/auth/login",
            "/referral.v1.AuthService/Login",
        ),
        (
            "GET",
            "/v1/users/x/referrals",
            {"params": {"pageToken": email}, "headers": auth},
            400,
            "GET /v1/users/{referrer_id}/referrals",
            "/referral.v1.ReferralService/ListReferrals",
        ),
        ("GET", f"/v1/nothing/{email}", {}, 404, "GET (no route)", ""),
        ("PUT", "/v1/users/me/referral-code", {"json": {}}, 405, "PUT /v1/users/me/referral-code", ""),
        ("GET", "/healthz", {}, 200, "GET /healthz", ""),
        ("GET", "/openapi.json", {}, 200, "GET /openapi.json", ""),
    ]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # /healthz is logged at DEBUG
        for index, (verb, path, kwargs, status, _, _) in enumerate(requests):
            headers = {**kwargs.pop("headers", {}), "x-request-id": f"line-{index}"}
            response = await http.request(verb, path, headers=headers, **kwargs)
            assert response.status_code == status, (path, response.text)
            assert response.headers["x-request-id"] == f"line-{index}"
    records = [r for r in caplog.records if r.name == "referral_service.access"]
    assert sorted(r.request_id for r in records) == sorted(  # type: ignore[attr-defined]
        f"line-{index}" for index in range(len(requests))
    )
    by_id = {r.request_id: r for r in records}  # type: ignore[attr-defined]
    for index, (_, _, _, status, route, method) in enumerate(requests):
        record = by_id[f"line-{index}"]
        assert record.transport == "http"  # type: ignore[attr-defined]
        assert record.route == route  # type: ignore[attr-defined]
        assert record.http_status == status  # type: ignore[attr-defined]
        if method:
            assert record.method == method  # type: ignore[attr-defined]
        assert record.peer.startswith("ipv4:127.0.0.1:")  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.name.startswith("uvicorn.access")]
    formatter = logging.Formatter()
    server_records = [r for r in caplog.records if r.name.startswith(("referral_service", "uvicorn"))]
    logged = "\n".join(formatter.format(r) + repr(vars(r)) for r in server_records)
    assert "secret.person" not in logged


@pytest.mark.one_stack
async def test_the_gateway_needs_no_grpc_server(stack: Stack) -> None:
    """The gateway calls the RPCs in-process: with the gRPC server stopped, HTTP still serves
    every RPC (so it opens no gRPC channel, and no other server on the same ports can answer
    for it)."""
    api = await start_api(stack)
    try:
        await api.app.server.stop(0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as http:
            email = api.unique_email()
            registered = await http.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
            assert registered.status_code == 200, registered.text
            auth = await login(http, email)
            me = await http.get("/v1/users/me", headers=auth)
            assert me.json()["user"]["email"] == email
            assert (await http.get("/healthz")).json() == {"status": "SERVING"}
    finally:
        await stop_api(api)


def test_the_gateway_and_the_pipeline_do_not_import_the_grpc_transport() -> None:
    """The gateway gets what it needs from app.py; the pipeline is transport-neutral."""
    import ast
    from pathlib import Path

    import referral_service

    root = Path(referral_service.__file__).parent
    forbidden = {
        "gateway": ("grpc", "referral_service.api"),
        "pipeline": ("grpc", "referral_service.api", "referral_service.gateway"),
    }
    for package, prefixes in forbidden.items():
        for path in (root / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for name in names:
                    assert not any(name == p or name.startswith(p + ".") for p in prefixes), (path, name)


@pytest.mark.one_stack
async def test_an_rpc_past_the_http_timeout_is_504(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """REFERRAL_HTTP_TIMEOUT_SECONDS bounds the RPC behind an HTTP request (a registration hashes
    its password for far longer than a millisecond): 504 DEADLINE_EXCEEDED in the usual envelope."""
    api = await start_api(stack, http_timeout_seconds=0.001)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as http:
            with caplog.at_level(logging.INFO, logger="referral_service.access"):
                response = await http.post(
                    "/v1/auth/register", json={"email": api.unique_email(), "password": PASSWORD}
                )
        assert_envelope(response, 504, "DEADLINE_EXCEEDED")
        assert reason(response) == "CANCELLED"
        (record,) = [r for r in caplog.records if r.name == "referral_service.access"]
        assert (record.code, record.http_status) == ("DEADLINE_EXCEEDED", 504)  # type: ignore[attr-defined]
    finally:
        await stop_api(api)


@pytest.mark.one_stack
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"email": "a@example.com", "password": ', {"": "MALFORMED"}),
        ("[1, 2]", {"": "MALFORMED"}),
        (
            '{"email": "a@example.com", "password": "x", "isSuperuser": true}',
            {"isSuperuser": "UNKNOWN_FIELD"},
        ),
        ('{"email": 12, "password": ["x"]}', {"email": "INVALID", "password": "INVALID"}),
        ('{"email": "a@example.com", "password": NaN}', {"": "MALFORMED"}),
    ],
)
async def test_bad_json_is_400_with_field_violations(
    http: httpx.AsyncClient, body: str, expected: dict[str, str]
) -> None:
    response = await http.post(
        "/v1/auth/register", content=body, headers={"content-type": "application/json"}
    )
    assert_envelope(response, 400, "INVALID_ARGUMENT")
    assert reason(response) == "VALIDATION_FAILED"
    assert violations(response) == expected


@pytest.mark.one_stack
async def test_request_mapping_errors(api: Api, http: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {(await api.user_with_token())[1]}"}
    both = await http.post(
        "/v1/users/me/referral-code",
        headers=auth,
        json={"ttl": "60s", "expireTime": "2031-01-01T00:00:00Z", "maxUses": "many"},
    )
    assert_envelope(both, 400, "INVALID_ARGUMENT")
    assert violations(both) == {"expire_time": "ONEOF_CONFLICT", "max_uses": "INVALID"}

    bad_id = await http.get("/v1/users/abc/referrals", headers=auth)
    assert violations(bad_id) == {"referrer_id": "INVALID"}
    unknown_query = await http.get("/v1/users/1/referrals", params={"pagesize": 2}, headers=auth)
    assert violations(unknown_query) == {"pagesize": "UNKNOWN_FIELD"}
    twice = await http.get("/v1/users/1/referrals?pageSize=1&pageSize=2", headers=auth)
    assert_envelope(twice, 400, "INVALID_ARGUMENT")
    body_on_get = await http.request("GET", "/v1/users/me", content=b'{"a": 1}', headers=auth)
    assert violations(body_on_get) == {"": "UNEXPECTED_BODY"}
    query_on_post = await http.post("/v1/auth/login?email=a@example.com", json={})
    assert_envelope(query_on_post, 400, "INVALID_ARGUMENT")

    xml = await http.post("/v1/auth/login", content=b"<login/>", headers={"content-type": "text/xml"})
    assert_envelope(xml, 415, "INVALID_ARGUMENT")
    assert reason(xml) == "HTTP_UNSUPPORTED_MEDIA_TYPE"
    huge = await http.post("/v1/auth/login", json={"email": "a" * 300_000, "password": "x"})
    assert_envelope(huge, 413, "RESOURCE_EXHAUSTED")
    assert reason(huge) == "HTTP_REQUEST_TOO_LARGE"


@pytest.mark.one_stack
async def test_unknown_paths_and_wrong_verbs(http: httpx.AsyncClient) -> None:
    unknown = await http.get("/v1/nothing-here")
    assert_envelope(unknown, 404, "NOT_FOUND")
    assert reason(unknown) == "HTTP_ROUTE_NOT_FOUND"
    wrong = await http.put("/v1/users/me/referral-code", json={})
    assert_envelope(wrong, 405, "UNIMPLEMENTED")
    assert reason(wrong) == "HTTP_METHOD_NOT_ALLOWED"
    assert wrong.headers["allow"] == "DELETE, GET, OPTIONS, POST"
    options = await http.options("/v1/users/me")
    assert options.status_code == 204
    assert options.headers["allow"] == "GET, OPTIONS"
    assert "access-control-allow-origin" not in options.headers


@pytest.mark.one_stack
async def test_percent_encoded_path_variables(api: Api, http: httpx.AsyncClient) -> None:
    email = api.unique_email("o'neil+tag")
    _, token = await api.user_with_token(email)
    auth = {"Authorization": f"Bearer {token}"}
    assert (
        await http.post("/v1/users/me/referral-code", headers=auth, json={"ttl": "60s"})
    ).status_code == 200
    encoded = email.replace("@", "%40").replace("+", "%2B").replace("'", "%27")
    response = await http.get(f"/v1/referral-codes/by-email/{encoded}")
    assert response.status_code == 200, response.text


@pytest.mark.one_stack
async def test_openapi_document_is_valid_and_complete(http: httpx.AsyncClient) -> None:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    operations = {
        (verb.upper(), path): operation
        for path, item in document["paths"].items()
        for verb, operation in item.items()
    }
    bindings = descriptors.bindings()
    every_rpc = sum(len(service.methods) for service in SERVICES)
    assert len(operations) == len(bindings) == every_rpc
    for binding in bindings:
        path = compile_template(binding.template).openapi_path
        operation = operations[(binding.verb, path)]
        assert operation["summary"], binding.method.full_name
        assert operation["responses"]["default"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
        scope = descriptors.scope(binding.method)
        service = [{"serviceAuth": [scope]}] if scope else []
        if descriptors.access_name(binding.method) == "ACCESS_SERVICE":
            expected = service
        elif descriptors.needs_token(binding.method):
            expected = [{"bearerAuth": []}, *service]
        else:
            expected = [{}, *service] if service else []
        assert operation["security"] == expected, binding.method.full_name
    # The client-credentials flow names every scope with the RPCs it opens.
    flow = document["components"]["securitySchemes"]["serviceAuth"]["flows"]["clientCredentials"]
    assert flow["tokenUrl"] == "/v1/auth/service-token"
    assert flow["scopes"]["users:read"] == "Call AuthService.GetUser"
    assert sorted(flow["scopes"]) == [
        "conversions:write",
        "events:read",
        "referrals:read",
        "referrals:review",
        "rewards:read",
        "sessions:revoke",
        "tokens:introspect",
        "users:read",
        "users:register",
        "webhooks:manage",
    ]
    lookup = operations[("GET", "/v1/users:lookup")]
    assert lookup["security"] == [{"serviceAuth": ["users:read"]}]
    schemas = document["components"]["schemas"]
    register = schemas["referral.v1.RegisterRequest"]
    assert register["required"] == ["email", "password"]
    assert register["properties"]["password"]["writeOnly"] is True
    assert register["additionalProperties"] is False
    assert "8 to 128 characters" in register["properties"]["password"]["description"]
    user = schemas["referral.v1.User"]["properties"]
    assert user["id"]["readOnly"] is True
    assert user["id"]["type"] == "string"
    assert user["createTime"]["format"] == "date-time"
    lookup = operations[("GET", "/v1/referral-codes/by-email/{email}")]
    assert [p["name"] for p in lookup["parameters"]] == ["email"]
    listing = operations[("GET", "/v1/users/{referrer_id}/referrals")]
    assert [(p["name"], p["in"]) for p in listing["parameters"]] == [
        ("referrer_id", "path"),
        ("pageSize", "query"),
        ("pageToken", "query"),
        ("state", "query"),
    ]


@pytest.mark.one_stack
async def test_docs_page_health_and_assets(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs")
    assert page.status_code == 200
    assert "swagger-ui-bundle.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/init.js"):
        response = await http.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 100
    assert (await http.get("/docs/../pyproject.toml")).status_code == 404
    root = await http.get("/")
    assert root.status_code == 307
    assert root.headers["location"] == "/docs"
    health = await http.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "SERVING"}


@pytest.mark.one_stack
async def test_cors_for_configured_origins(stack: Stack) -> None:
    api = await start_api(stack, http_cors_origins="https://app.example.com")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as http:
            preflight = await http.options(
                "/v1/auth/login",
                headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
            assert "POST" in preflight.headers["access-control-allow-methods"]
            assert "authorization" in preflight.headers["access-control-allow-headers"]
            error = await http.get("/v1/users/me", headers={"Origin": "https://app.example.com"})
            assert error.headers["access-control-allow-origin"] == "https://app.example.com"
            assert "x-request-id" in error.headers["access-control-expose-headers"]
            stranger = await http.get("/v1/users/me", headers={"Origin": "https://evil.example.com"})
            assert "access-control-allow-origin" not in stranger.headers
    finally:
        await stop_api(api)


@pytest.mark.one_stack
async def test_gateway_can_be_disabled(stack: Stack) -> None:
    api = await start_api(stack, http_enabled=False)
    try:
        assert api.app.http is None
        assert api.app.http_port is None
    finally:
        await stop_api(api)


@pytest.mark.one_stack
async def test_gateway_stops_with_the_app(stack: Stack) -> None:
    api = await start_api(stack)
    port = api.app.http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.get("/healthz")).status_code == 200
    await stop_api(api)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/healthz")


# --- path templates (pure functions) -------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/v1/users/me", "/v1/users/me", {}),
        ("/v1/users/{id}/referrals", "/v1/users/42/referrals", {"id": "42"}),
        ("/v1/users/{id}/referrals", "/v1/users/42/referrals/x", None),
        ("/v1/codes/{email}", "/v1/codes/a%2Fb%40x.com", {"email": "a/b@x.com"}),
        ("/v1/{name=shelves/*/books/*}", "/v1/shelves/s1/books/b%202", {"name": "shelves/s1/books/b 2"}),
        ("/v1/{name=files/**}", "/v1/files/a/b%2Fc/d", {"name": "files/a/b/c/d"}),
        ("/v1/{name=files/**}", "/v1/files/", None),
        ("/v1/things/{id}:cancel", "/v1/things/7:cancel", {"id": "7"}),
        ("/v1/things/{id}:cancel", "/v1/things/7", None),
        ("/v1/*/x", "/v1/anything/x", {}),
        ("/v1/{a.b}/c", "/v1/z/c", {"a.b": "z"}),
    ],
)
def test_path_templates(template: str, path: str, expected: dict[str, str] | None) -> None:
    assert compile_template(template).match(path) == expected


@pytest.mark.parametrize("template", ["v1/x", "/v1/{", "/v1/{1a}", "/v1/a b", "/v1/{x=a/{y}}"])
def test_bad_path_templates_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        compile_template(template)


def test_openapi_path_of_a_template() -> None:
    assert compile_template("/v1/{name=shelves/*}/books").openapi_path == "/v1/{name}/books"
