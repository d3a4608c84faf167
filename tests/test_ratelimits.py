"""Rate limits through the wire: per account and per client address, failures counted for Login,
RESOURCE_EXHAUSTED with RetryInfo and quota metadata, shared by replicas through Redis, atomic
under concurrency, still enforced (per process) while Redis is down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from referral.v1 import auth_pb2, referral_pb2

from referral_service.app import SERVICES
from referral_service.config import Rate, parse_rate
from referral_service.domain.models import Principal
from referral_service.pipeline.address import ClientAddress, parse_peer
from referral_service.pipeline.context import principal_var
from referral_service.pipeline.limits import declared_rules
from tests.conftest import PASSWORD, REDIS_URL, Api, Stack, start_api, stop_api
from tests.errors import RichError, expect_error
from tests.proxy import Proxy

LIMITED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
async def limited(stack: Stack, request: pytest.FixtureRequest) -> AsyncIterator[Api]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    api = await start_api(stack, **overrides)
    try:
        yield api
    finally:
        await stop_api(api)


def limits(**values: Any) -> Any:
    return pytest.mark.parametrize("limited", [values], indirect=True)


def assert_quota(error: RichError, name: str, value: int) -> None:
    assert error.reason == "RATE_LIMITED"
    assert error.metadata["quota_limit"] == name
    assert error.metadata["quota_limit_value"] == str(value)
    assert error.retry_seconds is not None
    assert error.retry_seconds > 0
    assert int(error.metadata["retry_after_seconds"]) >= 1
    # the standard QuotaFailure detail names the same limit
    assert error.quota == [(error.metadata["quota_subject"], name, value)]


def login(api: Api, email: str, password: str = PASSWORD, **kw: Any) -> Any:
    return api.auth.Login(auth_pb2.LoginRequest(email=email, password=password), **kw)


def from_client(client: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a call relayed by the trusted proxy (127.0.0.0/8) for ``client``."""
    return (("x-forwarded-for", client),)


@limits(rate_limit_login_account_address="3/1h", rate_limit_trusted_proxies=["127.0.0.0/8"])
async def test_failed_logins_are_limited_per_account_and_client_address(limited: Api) -> None:
    api = limited
    victim, other = api.unique_email(), api.unique_email()
    await api.register(victim)
    await api.register(other)
    attacker, owner = from_client("198.51.100.6"), from_client("203.0.113.1")
    for _ in range(10):  # successful logins never count
        await api.auth.Login(auth_pb2.LoginRequest(email=victim, password=PASSWORD), metadata=attacker)
    for _ in range(3):
        await expect_error(
            login(api, victim, "wrong password!", metadata=attacker), UNAUTH, "INVALID_CREDENTIALS"
        )
    error = await expect_error(login(api, victim, metadata=attacker), LIMITED)  # even the right password
    assert_quota(error, "login-account-address", 3)
    assert error.metadata["quota_subject"] == "account_and_client_address"
    # the email is compared like at login: another spelling is the same account
    await expect_error(login(api, victim.upper(), metadata=attacker), LIMITED, "RATE_LIMITED")
    # The attacker's failures are theirs: the owner, elsewhere, logs in; other accounts from
    # the attacker's address are not affected.
    await api.auth.Login(auth_pb2.LoginRequest(email=victim, password=PASSWORD), metadata=owner)
    await api.auth.Login(auth_pb2.LoginRequest(email=other, password=PASSWORD), metadata=attacker)
    # an unknown email is limited exactly like a known one (no account probing)
    for _ in range(3):
        await expect_error(login(api, "nobody@example.com", "wrong password!", metadata=attacker), UNAUTH)
    await expect_error(login(api, "nobody@example.com", metadata=attacker), LIMITED, "RATE_LIMITED")


@limits(rate_limit_login_account="3/1h", rate_limit_trusted_proxies=["127.0.0.0/8"])
async def test_an_account_under_attack_from_everywhere_stays_open_to_its_owners_devices(limited: Api) -> None:
    """The security review's targeted lockout: failures from many addresses reach the account's
    ceiling. Addresses that logged in to the account before still get in with the right
    password; new ones wait, whatever password they send."""
    api = limited
    victim = api.unique_email()
    await api.register(victim)
    home = from_client("203.0.113.1")
    await api.auth.Login(auth_pb2.LoginRequest(email=victim, password=PASSWORD), metadata=home)
    for n in range(3):  # a botnet: one failure from each address
        bot = from_client(f"198.51.100.{n + 10}")
        await expect_error(login(api, victim, "wrong password!", metadata=bot), UNAUTH, "INVALID_CREDENTIALS")
    for n in range(3):  # ... and now every new address is refused before the password is checked
        error = await expect_error(login(api, victim, metadata=from_client(f"198.51.100.{n + 50}")), LIMITED)
        assert_quota(error, "login-account", 3)
        assert error.metadata["quota_subject"] == "account"
    # The owner's device keeps working, again and again, and its own mistakes do not lock it.
    for _ in range(3):
        await api.auth.Login(auth_pb2.LoginRequest(email=victim, password=PASSWORD), metadata=home)
    await expect_error(login(api, victim, "wrong password!", metadata=home), UNAUTH, "INVALID_CREDENTIALS")
    await api.auth.Login(auth_pb2.LoginRequest(email=victim, password=PASSWORD), metadata=home)
    # Trust is per account: the owner's address gains nothing at another attacked account.
    target = api.unique_email()
    await api.register(target)
    for n in range(3):
        bot = from_client(f"198.51.100.{n + 10}")
        await expect_error(login(api, target, "wrong password!", metadata=bot), UNAUTH, "INVALID_CREDENTIALS")
    await expect_error(login(api, target, metadata=home), LIMITED, "RATE_LIMITED")


@limits(rate_limit_login_success_account="3/1h")
async def test_successful_logins_are_limited_per_account(limited: Api) -> None:
    api = limited
    email = api.unique_email()
    await api.register(email)
    for _ in range(5):  # failures do not count here
        await expect_error(login(api, email, "wrong password!"), UNAUTH, "INVALID_CREDENTIALS")
    for _ in range(3):
        await api.login(email)
    error = await expect_error(login(api, email), LIMITED)
    assert_quota(error, "login-success-account", 3)
    assert error.metadata["quota_subject"] == "account"
    await api.login(await _fresh(api))  # other accounts are not affected


async def _fresh(api: Api) -> str:
    email = api.unique_email()
    await api.register(email)
    return email


@limits(rate_limit_login_calls_address="4/1h", rate_limit_refresh_address="2/1h")
async def test_every_login_and_refresh_is_limited_per_client_address(limited: Api) -> None:
    api = limited
    email = api.unique_email()
    await api.register(email)
    first = await api.login(email)
    await api.login(email)
    await expect_error(login(api, email, "wrong password!"), UNAUTH, "INVALID_CREDENTIALS")
    await api.login(email)
    error = await expect_error(login(api, email), LIMITED)
    assert_quota(error, "login-calls-address", 4)
    refreshed = await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=first.refresh_token))
    await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=refreshed.refresh_token))
    error = await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token="whatever")), LIMITED
    )
    assert_quota(error, "refresh-address", 2)


@limits(rate_limit_login_address="4/1h")
async def test_failed_logins_are_limited_per_client_address(limited: Api) -> None:
    api = limited
    for _ in range(4):
        await expect_error(login(api, api.unique_email(), "wrong password!"), UNAUTH, "INVALID_CREDENTIALS")
    error = await expect_error(login(api, api.unique_email(), "wrong password!"), LIMITED)
    assert_quota(error, "login-address", 4)
    assert error.metadata["quota_subject"] == "client_address"


@limits(rate_limit_login_account_address="5/1h")
async def test_concurrent_failed_logins_never_exceed_the_limit(limited: Api) -> None:
    api = limited
    email = api.unique_email()
    await api.register(email)
    results = await asyncio.gather(
        *(login(api, email, "wrong password!") for _ in range(16)), return_exceptions=True
    )
    codes = [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(codes) == 16
    assert codes.count(UNAUTH) == 5
    assert codes.count(LIMITED) == 11


@limits(rate_limit_register_address="3/1h")
async def test_registrations_are_limited_per_client_address(limited: Api) -> None:
    api = limited
    await api.register()
    await api.register()
    await expect_error(  # invalid attempts count too
        api.auth.Register(auth_pb2.RegisterRequest(email="nope", password=PASSWORD)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    error = await expect_error(api.register(), LIMITED)
    assert_quota(error, "register-address", 3)
    # a spoofed x-forwarded-for from an untrusted peer changes nothing
    await expect_error(
        api.auth.Register(
            auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD),
            metadata=(("x-forwarded-for", "203.0.113.9"),),
        ),
        LIMITED,
        "RATE_LIMITED",
    )


@limits(rate_limit_register_address="2/1h", rate_limit_trusted_proxies=["127.0.0.0/8"])
async def test_a_trusted_proxy_header_names_the_client(limited: Api) -> None:
    api = limited

    def register(client: str) -> Any:
        return api.auth.Register(
            auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD),
            metadata=(("x-forwarded-for", f"198.51.100.77, {client}"),),
        )

    for client in ("203.0.113.1", "203.0.113.2"):
        await register(client)
        await register(client)
        await expect_error(register(client), LIMITED, "RATE_LIMITED")
    # without the header the proxy itself is the client, with a budget of its own
    await api.register()


@limits(rate_limit_lookup_address="5/1h")
async def test_lookups_by_email_are_limited_per_client_address(limited: Api) -> None:
    api = limited
    for _ in range(5):
        await expect_error(
            api.referral.GetReferralCodeByEmail(
                referral_pb2.GetReferralCodeByEmailRequest(email=api.unique_email())
            ),
            grpc.StatusCode.NOT_FOUND,
        )
    error = await expect_error(
        api.referral.GetReferralCodeByEmail(
            referral_pb2.GetReferralCodeByEmailRequest(email="a@example.com")
        ),
        LIMITED,
    )
    assert_quota(error, "lookup-address", 5)


@limits(rate_limit_code_check_address="2/1h")
async def test_guessing_referral_codes_is_limited_per_client_address(limited: Api) -> None:
    api = limited

    def register(code: str) -> Any:
        return api.auth.Register(
            auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD, referral_code=code)
        )

    for guess in ("GUESS1", "GUESS2"):
        await expect_error(register(guess), grpc.StatusCode.INVALID_ARGUMENT, "REFERRAL_CODE_UNKNOWN")
    error = await expect_error(register("GUESS3"), LIMITED)
    assert_quota(error, "code-check-address", 2)
    await api.register()  # registering without a code is not affected


@limits(rate_limits_enabled=False)
async def test_limits_can_be_switched_off(limited: Api) -> None:
    email = limited.unique_email()
    for _ in range(12):
        await expect_error(login(limited, email, "wrong password!"), UNAUTH, "INVALID_CREDENTIALS")


@pytest.mark.redis_stacks
async def test_replicas_share_one_budget_through_redis(stack: Stack) -> None:
    one = await start_api(stack, rate_limit_login_account="4/1h")
    two = await start_api(stack, rate_limit_login_account="4/1h")
    try:
        email = one.unique_email()
        await one.register(email)
        for api in (one, two, one, two):
            await expect_error(login(api, email, "wrong password!"), UNAUTH, "INVALID_CREDENTIALS")
        for api in (one, two):
            await expect_error(login(api, email), LIMITED, "RATE_LIMITED")
    finally:
        await stop_api(one)
        await stop_api(two)


@pytest.mark.redis_stacks
async def test_limits_hold_per_process_while_redis_is_down(stack: Stack) -> None:
    """Policy: with Redis unreachable the limiter falls back to the in-process store, so limits
    stay in force and correct logins keep working."""
    target = urlsplit(REDIS_URL)
    proxy = await Proxy(target.hostname or "127.0.0.1", target.port or 6379).start()
    api = await start_api(stack, redis_url=proxy.url, rate_limit_login_account="3/1h")
    try:
        email = api.unique_email()
        await api.register(email)
        proxy.refuse()
        await api.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD), timeout=3)
        for _ in range(3):
            await expect_error(login(api, email, "wrong password!", timeout=3), UNAUTH, "INVALID_CREDENTIALS")
        await expect_error(login(api, email, timeout=3), LIMITED, "RATE_LIMITED")
    finally:
        await stop_api(api)
        await proxy.close()


# --- pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10/15m", Rate(10, 900)), ("300/1m", Rate(300, 60)), ("5/30s", Rate(5, 30)), ("7/2", Rate(7, 2))],
)
def test_rates_parse(text: str, expected: Rate) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["10", "x/1m", "10/1y", "-1/1m", "10/0s"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


LIMIT_NAMES = (
    "verify-email-address",
    "verification-resend-account",
    "verification-resend-address",
    "password-reset-account",
    "password-reset-address",
    "password-reset-confirm-address",
    "login-account-address",
    "login-account",
    "login-address",
    "login-success-account",
    "login-calls-address",
    "refresh-address",
    "register-address",
    "register-service",
    "service-token-address",
    "password-change-user",
    "code-check-address",
    "lookup-address",
    "code-create-user",
    "vanity-code-user",
    "code-delete-user",
)


def test_the_limits_are_declared_in_the_proto() -> None:
    """The (referral.v1.rate_limit) options reproduce the table in docs/security.md, in order."""
    rules = declared_rules(SERVICES, {name: Rate(5, 60) for name in LIMIT_NAMES})
    table = {
        method: [
            (
                rule.name,
                rule.subject,
                sorted(rule.counted_failures),
                rule.successes_only,
                rule.exempt_trusted_clients,
            )
            for rule in found
        ]
        for method, found in rules.items()
    }
    failures = ["INVALID_CREDENTIALS"]
    assert table == {
        "/referral.v1.AuthService/Login": [
            ("login-account-address", "account_and_client_address", failures, False, False),
            ("login-account", "account", failures, False, True),
            ("login-address", "client_address", failures, False, False),
            ("login-success-account", "account", [], True, False),
            ("login-calls-address", "client_address", [], False, False),
        ],
        "/referral.v1.AuthService/RefreshToken": [("refresh-address", "client_address", [], False, False)],
        "/referral.v1.AuthService/VerifyEmail": [
            ("verify-email-address", "client_address", ["EMAIL_TOKEN_INVALID"], False, False)
        ],
        "/referral.v1.AuthService/ResendVerificationEmail": [
            ("verification-resend-account", "account", [], False, False),
            ("verification-resend-address", "client_address", [], False, False),
        ],
        "/referral.v1.AuthService/RequestPasswordReset": [
            ("password-reset-account", "account", [], False, False),
            ("password-reset-address", "client_address", [], False, False),
        ],
        "/referral.v1.AuthService/ResetPassword": [
            ("password-reset-confirm-address", "client_address", ["EMAIL_TOKEN_INVALID"], False, False)
        ],
        "/referral.v1.AuthService/ChangePassword": [
            ("password-change-user", "user", ["INVALID_CREDENTIALS"], False, False)
        ],
        "/referral.v1.AuthService/IssueServiceToken": [
            ("service-token-address", "client_address", ["INVALID_CLIENT"], False, False)
        ],
        "/referral.v1.AuthService/Register": [
            ("register-service", "service_account", [], False, False),
            ("register-address", "client_address", [], False, False),
            ("code-check-address", "client_address", ["REFERRAL_CODE_UNKNOWN"], False, False),
        ],
        "/referral.v1.ReferralService/GetReferralCodeByEmail": [
            ("lookup-address", "client_address", [], False, False)
        ],
        "/referral.v1.ReferralService/CreateReferralCode": [
            ("code-create-user", "user", [], False, False),
            ("vanity-code-user", "user", [], True, False),
        ],
        "/referral.v1.ReferralService/DeleteReferralCode": [("code-delete-user", "user", [], False, False)],
    }
    register = rules["/referral.v1.AuthService/Register"]
    request = auth_pb2.RegisterRequest(email="a@example.com")
    assert register[2].key_of(request, "192.0.2.1") is None  # no code named: not counted
    request.referral_code = "ABC"
    assert register[2].key_of(request, "192.0.2.1") == "192.0.2.1"
    login = rules["/referral.v1.AuthService/Login"][0]
    key = login.key_of(auth_pb2.LoginRequest(email="Someone@Example.com"), "192.0.2.1")
    assert key is not None
    assert "someone" not in key.lower()  # hashed: no emails in limiter keys
    assert key.endswith(":192.0.2.1")
    # caller limits count the authenticated user (the auth stage ran first); the vanity limit
    # only requests that name a code
    create = rules["/referral.v1.ReferralService/CreateReferralCode"]
    when = datetime(2030, 1, 1, tzinfo=UTC)
    token = principal_var.set(Principal(user_id=42, token_id="t", session_id="s", expire_time=when))
    try:
        assert create[0].key_of(referral_pb2.CreateReferralCodeRequest(), "192.0.2.1") == "42"
        assert create[1].key_of(referral_pb2.CreateReferralCodeRequest(), "192.0.2.1") is None
        assert create[1].key_of(referral_pb2.CreateReferralCodeRequest(code="BRAND"), "192.0.2.1") == "42"
    finally:
        principal_var.reset(token)
    # a limit switched off is left out
    off = declared_rules(
        SERVICES, {**{name: Rate(5, 60) for name in LIMIT_NAMES}, "lookup-address": Rate(0, 60)}
    )
    assert "/referral.v1.ReferralService/GetReferralCodeByEmail" not in off


def test_a_declared_limit_without_a_rate_stops_start_up() -> None:
    rates = {name: Rate(5, 60) for name in LIMIT_NAMES if name != "login-account"}
    with pytest.raises(RuntimeError, match="login-account"):
        declared_rules(SERVICES, rates)
    with pytest.raises(RuntimeError, match="typo-address"):
        declared_rules(SERVICES, {**rates, "login-account": Rate(1, 1), "typo-address": Rate(1, 1)})


def test_a_caller_limit_needs_an_authenticated_rpc_and_a_string_field() -> None:
    """KEY_KIND_CALLER counts the caller: declared on a public RPC, or naming a field that is not
    a string field, the server does not start."""
    from referral.v1 import options_pb2

    from referral_service.pipeline.limits import _rule

    service = referral_pb2.DESCRIPTOR.services_by_name["ReferralService"]
    caller = options_pb2.RateLimit.KEY_KIND_CALLER
    with pytest.raises(RuntimeError, match="ACCESS_AUTHENTICATED"):
        _rule(
            service.methods_by_name["GetReferralCodeByEmail"],
            options_pb2.RateLimit(name="probe-user", key_kind=caller),
            Rate(1, 1),
        )
    with pytest.raises(RuntimeError, match="max_uses"):
        _rule(
            service.methods_by_name["CreateReferralCode"],
            options_pb2.RateLimit(name="probe-user", key_kind=caller, field="max_uses"),
            Rate(1, 1),
        )


def test_client_address_rules() -> None:
    plain = ClientAddress([], "x-forwarded-for", 64)
    assert plain.resolve("ipv4:192.0.2.7:5555", ["203.0.113.1"]) == "192.0.2.7"
    assert plain.resolve("ipv6:[2001:db8:1:2:3:4:5:6]:443", []) == "2001:db8:1:2::/64"
    assert plain.resolve("ipv6:[::ffff:192.0.2.9]:443", []) == "192.0.2.9"
    assert plain.resolve("unix:/tmp/socket", []) == "unix:/tmp/socket"
    proxied = ClientAddress(["10.0.0.0/8"], "x-forwarded-for", 64)
    # right-most untrusted hop wins; a client cannot push a fake address in front
    assert proxied.resolve("ipv4:10.1.1.1:1", ["6.6.6.6, 198.51.100.4, 10.2.2.2"]) == "198.51.100.4"
    assert proxied.resolve("ipv4:10.1.1.1:1", ["garbage, 198.51.100.4"]) == "198.51.100.4"
    assert proxied.resolve("ipv4:10.1.1.1:1", []) == "10.1.1.1"
    assert proxied.resolve("ipv4:192.0.2.1:1", ["198.51.100.4"]) == "192.0.2.1"  # untrusted peer
    assert parse_peer("ipv4:127.0.0.1:80") is not None


async def test_limits_through_the_http_gateway_apply_per_http_client(stack: Stack) -> None:
    """Per-address limits count each HTTP client separately (here: two loopback source
    addresses), not the gateway as one; a gRPC client sending the old gateway metadata gains
    nothing."""
    import httpx

    api = await start_api(stack, rate_limit_register_address="2/1h")
    try:
        base = f"http://127.0.0.1:{api.app.http_port}"

        async def register(source: str, email: str) -> httpx.Response:
            transport = httpx.AsyncHTTPTransport(local_address=source)
            async with httpx.AsyncClient(base_url=base, transport=transport) as client:
                return await client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})

        first = [await register("127.0.0.2", api.unique_email()) for _ in range(3)]
        assert [r.status_code for r in first] == [200, 200, 429]
        assert first[2].json()["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert int(first[2].headers["retry-after"]) > 0
        other = await register("127.0.0.3", api.unique_email())
        assert other.status_code == 200
        # a gRPC client cannot claim to be someone else: the metadata the gateway once sent
        # (x-referral-gateway-*) means nothing, its own address is limited
        for _ in range(2):
            await api.register()
        forged = (("x-referral-gateway-client", "10.9.9.9"), ("x-referral-gateway-auth", "guess"))
        await expect_error(
            api.auth.Register(
                auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD), metadata=forged
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )
    finally:
        await stop_api(api)


async def test_http_clients_behind_a_trusted_load_balancer_are_limited_one_by_one(stack: Stack) -> None:
    """Behind an HTTP load balancer every request comes from the balancer's address: with the
    balancer in REFERRAL_RATE_LIMIT_TRUSTED_PROXIES, its X-Forwarded-For names the client (as for
    gRPC). From an untrusted address the header is ignored, so a client cannot pick its key."""
    import httpx

    api = await start_api(
        stack, rate_limit_register_address="2/1h", rate_limit_trusted_proxies=["127.0.0.2/32"]
    )
    try:
        base = f"http://127.0.0.1:{api.app.http_port}"

        async def register(source: str, forwarded: str) -> int:
            transport = httpx.AsyncHTTPTransport(local_address=source)
            async with httpx.AsyncClient(base_url=base, transport=transport) as client:
                response = await client.post(
                    "/v1/auth/register",
                    json={"email": api.unique_email(), "password": PASSWORD},
                    headers={"x-forwarded-for": forwarded},
                )
                return response.status_code

        # the balancer (127.0.0.2, trusted) forwards two clients: each has its own budget
        for client in ("203.0.113.10", "203.0.113.11"):
            assert [await register("127.0.0.2", f"198.51.100.1, {client}") for _ in range(3)] == [
                200,
                200,
                429,
            ]
        # an untrusted client (127.0.0.3) claiming other addresses is limited as itself
        codes = [await register("127.0.0.3", f"203.0.113.{20 + n}") for n in range(3)]
        assert codes == [200, 200, 429]
    finally:
        await stop_api(api)
