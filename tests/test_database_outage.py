"""PostgreSQL down (refusing or hanging, cut with a loopback proxy): calls fail fast with
UNAVAILABLE and a RetryInfo (never INTERNAL, never a hang), health reports NOT_SERVING, the
service recovers by itself, and no committed write is lost. Plus: client deadlines cancel the
server's work without leaving half-written rows."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2
from referral.v1 import auth_pb2, referral_pb2
from sqlalchemy import make_url

from tests.conftest import PASSWORD, Api, Stack, bearer, start_api, stop_api
from tests.errors import expect_error
from tests.invariants import check_invariants, count_rows
from tests.proxy import Proxy

DEADLINE = 5.0  # every call below answers within this, database up or not
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _ttl(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


@pytest.fixture
async def proxied_db(stack: Stack) -> AsyncIterator[tuple[Api, Proxy]]:
    url = make_url(stack.database_url)
    proxy = await Proxy(url.host or "127.0.0.1", url.port or 5432).start()
    api = await start_api(
        stack, database_url=proxy.database_url(stack.database_url), database_timeout_seconds=1.0
    )
    try:
        yield api, proxy
    finally:
        proxy.restore()
        await stop_api(api)
        await proxy.close()


async def _health(api: Api, service: str = "") -> int:
    response = await api.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
    return int(response.status)


async def _wait_for_health(api: Api, status: int) -> None:
    for _ in range(100):
        if await _health(api) == status:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"health never became {status}")


def _register(api: Api, email: str, request_id: str = "") -> grpc.aio.UnaryUnaryCall:  # type: ignore[type-arg]
    return api.auth.Register(
        auth_pb2.RegisterRequest(email=email, password=PASSWORD, request_id=request_id), timeout=DEADLINE
    )


@pytest.mark.postgres_stacks
@pytest.mark.parametrize("failure", ["refuse", "hang"])
async def test_database_down_fails_fast_reports_not_serving_and_recovers(
    proxied_db: tuple[Api, Proxy], failure: str
) -> None:
    api, proxy = proxied_db
    owner = api.unique_email()
    await api.register(owner)
    tokens = await api.login(owner)
    created = await api.referral.CreateReferralCode(
        referral_pb2.CreateReferralCodeRequest(ttl=_ttl(3600)), metadata=bearer(tokens.access_token)
    )
    assert await _health(api) == health_pb2.HealthCheckResponse.SERVING

    getattr(proxy, failure)()
    calls = {
        "register": _register(api, api.unique_email()),
        "login": api.auth.Login(auth_pb2.LoginRequest(email=owner, password=PASSWORD), timeout=DEADLINE),
        "lookup (uncached)": api.referral.GetReferralCodeByEmail(
            referral_pb2.GetReferralCodeByEmailRequest(email=api.unique_email()), timeout=DEADLINE
        ),
        "my code": api.referral.GetMyReferralCode(
            referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(tokens.access_token), timeout=DEADLINE
        ),
    }
    for name, call in calls.items():
        error = await expect_error(call, UNAVAILABLE, "SERVICE_UNAVAILABLE")
        assert error.retry_seconds, name
        assert "database" in error.message
    for service in ("", "referral.v1.AuthService", "referral-service.database"):
        assert await _health(api, service) == health_pb2.HealthCheckResponse.NOT_SERVING

    proxy.restore()
    await _wait_for_health(api, health_pb2.HealthCheckResponse.SERVING)
    await api.login(owner)  # works again, no restart
    mine = await api.referral.GetMyReferralCode(
        referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(tokens.access_token)
    )
    assert mine.referral_code.code == created.referral_code.code  # committed before the outage
    await check_invariants(api.app.db)


@pytest.mark.postgres_stacks
async def test_a_database_restart_while_the_pool_is_idle_costs_no_call(
    proxied_db: tuple[Api, Proxy],
) -> None:
    """Pooled connections that idled through a restart are checked (and replaced) before a call
    uses them: no call sees the restart. Busy connections skip the check (see db.py)."""
    from referral_service.storage.db import PING_AFTER_IDLE_SECONDS

    api, proxy = proxied_db
    owner = api.unique_email()
    user = await api.register(owner)
    tokens = await api.login(owner)
    for _ in range(3):  # several pooled connections, each used and returned
        await asyncio.gather(*(api.login(owner) for _ in range(4)))
    proxy.restore()  # the server "restarted": every open connection is gone, new ones work
    await asyncio.sleep(PING_AFTER_IDLE_SECONDS + 0.2)
    results = await asyncio.gather(
        *(api.login(owner) for _ in range(4)),
        *(
            api.referral.ListReferrals(
                referral_pb2.ListReferralsRequest(referrer_id=user.id),
                metadata=bearer(tokens.access_token),
                timeout=DEADLINE,
            )
            for _ in range(4)
        ),
    )
    assert len(results) == 8  # every call answered OK


@pytest.mark.postgres_stacks
async def test_no_committed_write_is_lost_across_an_outage(proxied_db: tuple[Api, Proxy]) -> None:
    """Registrations under load while the database goes away and comes back: every call that
    answered OK has its row; every failed one, retried with its request_id, yields exactly one
    user (the first result if its commit had landed)."""
    api, proxy = proxied_db
    request_ids = [str(uuid.uuid4()) for _ in range(30)]
    emails = [api.unique_email() for _ in request_ids]
    ok: set[int] = set()

    async def one(index: int) -> None:
        await asyncio.sleep(index * 0.02)
        try:
            await _register(api, emails[index], request_ids[index])
            ok.add(index)
        except grpc.aio.AioRpcError as error:
            assert error.code() == UNAVAILABLE, error

    async def cut() -> None:
        await asyncio.sleep(0.2)
        proxy.refuse()
        await asyncio.sleep(0.3)
        proxy.restore()

    await asyncio.gather(cut(), *(one(i) for i in range(len(request_ids))))
    await _wait_for_health(api, health_pb2.HealthCheckResponse.SERVING)
    users_before_retry = await count_rows(api.app.db, "users")
    assert users_before_retry >= len(ok)
    retried = await asyncio.gather(*(_register(api, e, r) for e, r in zip(emails, request_ids, strict=True)))
    assert len({response.user.id for response in retried}) == len(request_ids)
    assert await count_rows(api.app.db, "users") == len(request_ids)
    await check_invariants(api.app.db)


async def test_a_client_deadline_cancels_the_work_and_leaves_no_half_written_row(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """Registrations with a referral code (a user, a code use, a counter and a request id in one
    transaction) under deadlines too short to finish: the server sees the cancellation, and
    afterwards every registration exists whole or not at all."""
    owner = api.unique_email()
    await api.register(owner)
    tokens = await api.login(owner)
    code = (
        await api.referral.CreateReferralCode(
            referral_pb2.CreateReferralCodeRequest(ttl=_ttl(3600)), metadata=bearer(tokens.access_token)
        )
    ).referral_code.code
    attempts = [(api.unique_email(), str(uuid.uuid4())) for _ in range(12)]
    deadline_errors = 0
    with caplog.at_level(logging.INFO, logger="referral_service.access"):
        for index, (email, request_id) in enumerate(attempts):
            try:
                await api.auth.Register(
                    auth_pb2.RegisterRequest(
                        email=email, password=PASSWORD, referral_code=code, request_id=request_id
                    ),
                    timeout=0.002 * (index + 1),
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                deadline_errors += 1
        await asyncio.sleep(0.5)  # let cancelled handlers unwind
    assert deadline_errors > 0
    cancelled = [r for r in caplog.records if getattr(r, "code", "") == "CANCELLED"]
    assert cancelled, "the server never saw a cancellation"
    await check_invariants(api.app.db)
    # a retry returns the first result when the first call did commit, or registers now
    for email, request_id in attempts:
        await api.auth.Register(
            auth_pb2.RegisterRequest(
                email=email, password=PASSWORD, referral_code=code, request_id=request_id
            )
        )
    assert await count_rows(api.app.db, "users") == len(attempts) + 1
    await check_invariants(api.app.db)
