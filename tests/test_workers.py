"""Multi-process serving and stateless replicas, with real ``serve`` processes."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from referral.v1 import auth_pb2, auth_pb2_grpc, referral_pb2, referral_pb2_grpc
from sqlalchemy import make_url

from tests.conftest import PASSWORD, REDIS_URL, TEST_SECRET, bearer, truncate_postgres
from tests.errors import expect_error
from tests.live import LiveServer


def _children(pid: int) -> list[int]:
    """The worker processes of the supervisor ``pid`` (not multiprocessing's resource tracker)."""
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"--multiprocessing-fork" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(int(entry.name))
    return workers


async def _healthy(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_workers_share_the_port_are_replaced_when_they_die_and_drain_on_sigterm(tmp_path: Path) -> None:
    server = LiveServer(tmp_path, "--migrate", "--workers", "2").start()
    try:
        assert server.process is not None
        for _ in range(30):
            if len(_children(server.process.pid)) >= 2:
                break
            await asyncio.sleep(0.2)
        # Both workers serve (a worker dying before it served stops the server instead).
        await asyncio.to_thread(server.wait_for_log, "with 2 workers")
        workers = _children(server.process.pid)
        assert len(workers) >= 2
        for _ in range(20):
            await _healthy(server.target)
        os.kill(workers[0], signal.SIGKILL)
        for _ in range(100):
            current = _children(server.process.pid)
            if len(current) >= 2 and workers[0] not in current:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the dead worker was not replaced")
        for _ in range(20):
            await _healthy(server.target)
    finally:
        output = server.stop()
    assert server.returncode == 0, output
    assert "exited with code -9" in output
    assert "replacing it" in output
    assert output.count("stopped worker=") >= 1
    assert "all workers stopped" in output


async def test_every_call_is_in_the_access_log_after_a_graceful_stop(tmp_path: Path) -> None:
    """Access-log lines are written in batches; none is lost when the process stops on SIGTERM,
    from the worker processes of a multi-worker server too."""
    server = LiveServer(tmp_path, "--migrate", "--workers", "2").start()
    ids = [f"log-check-{n}" for n in range(25)]
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = referral_pb2_grpc.ReferralServiceStub(channel)
            for request_id in ids:
                await expect_error(
                    stub.GetReferralCodeByEmail(
                        referral_pb2.GetReferralCodeByEmailRequest(email=f"{request_id}@example.com"),
                        metadata=(("x-request-id", request_id),),
                        timeout=5,
                    ),
                    grpc.StatusCode.NOT_FOUND,
                )
    finally:
        output = server.stop()
    assert server.returncode == 0, output
    access = [line for line in output.splitlines() if "GetReferralCodeByEmail NOT_FOUND" in line]
    for request_id in ids:
        assert sum(f"request_id={request_id} " in line for line in access) == 1, request_id


@pytest.fixture
async def replicas(
    tmp_path: Path, postgres_database: str | None, redis_available: bool
) -> AsyncIterator[tuple[LiveServer, LiveServer]]:
    from tests.conftest import _need

    _need("PostgreSQL", postgres_database is not None)
    _need("Redis", redis_available)
    assert postgres_database is not None
    await truncate_postgres(postgres_database)
    env = {
        "REFERRAL_DATABASE_URL": make_url(postgres_database).render_as_string(hide_password=False),
        "REFERRAL_REDIS_URL": REDIS_URL,
        "REFERRAL_REDIS_KEY_PREFIX": f"replicas:{os.getpid()}:{tmp_path.name}:",
        "REFERRAL_JWT_SECRET": TEST_SECRET,
        "REFERRAL_WORKERS": "1",
    }
    one = LiveServer(tmp_path / "one", env=env).start()
    two = LiveServer(tmp_path / "two", env=env).start()
    try:
        yield one, two
    finally:
        for server in (one, two):
            output = server.stop()
            assert server.returncode == 0, output


async def test_two_replicas_behave_as_one_service(replicas: tuple[LiveServer, LiveServer]) -> None:
    one, two = replicas
    async with grpc.aio.insecure_channel(one.target) as a, grpc.aio.insecure_channel(two.target) as b:
        auth_a, auth_b = auth_pb2_grpc.AuthServiceStub(a), auth_pb2_grpc.AuthServiceStub(b)
        ref_a, ref_b = referral_pb2_grpc.ReferralServiceStub(a), referral_pb2_grpc.ReferralServiceStub(b)
        await auth_a.Register(auth_pb2.RegisterRequest(email="replica@example.com", password=PASSWORD))
        tokens = await auth_b.Login(auth_pb2.LoginRequest(email="replica@example.com", password=PASSWORD))
        ttl = duration_pb2.Duration()
        ttl.FromTimedelta(timedelta(hours=1))
        code = (
            await ref_a.CreateReferralCode(
                referral_pb2.CreateReferralCodeRequest(ttl=ttl), metadata=bearer(tokens.access_token)
            )
        ).referral_code
        lookup = referral_pb2.GetReferralCodeByEmailRequest(email="replica@example.com")
        assert (await ref_b.GetReferralCodeByEmail(lookup)).referral_code.code == code.code  # cached by b
        await ref_a.DeleteReferralCode(
            referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(tokens.access_token)
        )
        await expect_error(ref_b.GetReferralCodeByEmail(lookup), grpc.StatusCode.NOT_FOUND)
        # a token revoked on one replica is rejected by the other
        await auth_b.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token))
        await auth_a.Logout(auth_pb2.LogoutRequest(), metadata=bearer(tokens.access_token))
        await expect_error(
            auth_b.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )


async def test_sessions_listed_and_revoked_across_replicas(replicas: tuple[LiveServer, LiveServer]) -> None:
    """Sessions opened on one process are listed, and ended, from the other: the session rows are
    in the database and revocations reach every process (Redis, with the database as record)."""
    one, two = replicas
    async with grpc.aio.insecure_channel(one.target) as a, grpc.aio.insecure_channel(two.target) as b:
        auth_a, auth_b = auth_pb2_grpc.AuthServiceStub(a), auth_pb2_grpc.AuthServiceStub(b)
        email = "sessions-replica@example.com"
        await auth_a.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD))
        login = auth_pb2.LoginRequest(email=email, password=PASSWORD)
        on_a = [await auth_a.Login(login) for _ in range(2)]
        on_b = await auth_b.Login(login)
        listed = await auth_b.ListSessions(auth_pb2.ListSessionsRequest(), metadata=bearer(on_b.access_token))
        assert len(listed.sessions) == 3
        assert [s.current for s in listed.sessions] == [False, False, True]
        # Ended on b: a's first session stops working on a, at once.
        first = listed.sessions[0].id
        await auth_b.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=first), metadata=bearer(on_b.access_token)
        )
        await expect_error(
            auth_a.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(on_a[0].access_token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )
        await expect_error(
            auth_a.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=on_a[0].refresh_token)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        # "Sign out everywhere else" from a ends b's session on b.
        ended = await auth_a.RevokeOtherSessions(
            auth_pb2.RevokeOtherSessionsRequest(), metadata=bearer(on_a[1].access_token)
        )
        assert ended.sessions_revoked == 1
        await expect_error(
            auth_b.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(on_b.access_token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )
        left = await auth_b.ListSessions(
            auth_pb2.ListSessionsRequest(), metadata=bearer(on_a[1].access_token)
        )
        assert [s.current for s in left.sessions] == [True]
