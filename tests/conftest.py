"""Test harness: the real server in-process on 127.0.0.1:0, called through generated stubs.

Stacks (database + cache) a test runs on:
- ``sqlite-memory`` and ``postgres-redis`` for every test that takes the ``api`` fixture;
- all four combinations for tests marked ``@pytest.mark.all_stacks`` (cache, revocation).

PostgreSQL and Redis come from ``REFERRAL_TEST_POSTGRES_URL`` / ``REFERRAL_TEST_REDIS_URL``
(default: this machine's 127.0.0.1:5432 database ``test`` and 127.0.0.1:6379). When one is not
reachable its tests are skipped with the reason shown in the summary, unless
``REFERRAL_TEST_REQUIRE_BACKENDS=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from referral.v1 import auth_pb2, auth_pb2_grpc, referral_pb2_grpc
from sqlalchemy import make_url

from referral_service.app import App, build_app
from referral_service.config import RateLimitSettings, Settings
from referral_service.storage import migrate

PG_URL = os.environ.get("REFERRAL_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("REFERRAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE = os.environ.get("REFERRAL_TEST_REQUIRE_BACKENDS") == "1"

DEFAULT_STACKS = ["sqlite-memory", "postgres-redis"]
ALL_STACKS = ["sqlite-memory", "sqlite-redis", "postgres-memory", "postgres-redis"]
TEST_SECRET = "test-secret-" + "x" * 40
PASSWORD = "correct horse battery staple"


REDIS_STACKS = ["sqlite-redis", "postgres-redis"]
POSTGRES_STACKS = ["postgres-redis"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "all_stacks: run on every database x cache combination")
    config.addinivalue_line("markers", "redis_stacks: run on both databases with Redis")
    config.addinivalue_line(
        "markers", "sqlite_stack: run on SQLite with the in-process cache only (stack-independent logic)"
    )
    config.addinivalue_line("markers", "one_stack: run on sqlite-memory only (storage-independent tests)")
    config.addinivalue_line("markers", "postgres_stacks: run on PostgreSQL with Redis only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "stack" in metafunc.fixturenames:
        if metafunc.definition.get_closest_marker("all_stacks"):
            stacks = ALL_STACKS
        elif metafunc.definition.get_closest_marker("redis_stacks"):
            stacks = REDIS_STACKS
        elif metafunc.definition.get_closest_marker("sqlite_stack") or metafunc.definition.get_closest_marker(
            "one_stack"
        ):
            stacks = ["sqlite-memory"]
        elif metafunc.definition.get_closest_marker("postgres_stacks"):
            stacks = POSTGRES_STACKS
        else:
            stacks = DEFAULT_STACKS
        metafunc.parametrize("stack", stacks, indirect=True)


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url.replace("+asyncpg", ""))
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def _need(name: str, ok: bool) -> None:
    if ok:
        return
    message = (
        f"{name} is not reachable; its tests are skipped "
        "(set REFERRAL_TEST_REQUIRE_BACKENDS=1 to fail instead)"
    )
    if REQUIRE:
        pytest.fail(
            f"{name} is required (REFERRAL_TEST_REQUIRE_BACKENDS=1) but not reachable",
            pytrace=False,
        )
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    return _reachable(PG_URL, 5432)


@pytest.fixture(scope="session")
def redis_available() -> bool:
    return _reachable(REDIS_URL, 6379)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file, copied for each test."""
    path = tmp_path_factory.mktemp("template") / "referral.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    return path


async def _pg_admin(sql: str) -> None:
    import asyncpg

    url = make_url(PG_URL)
    conn = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database=url.database,
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_database(postgres_available: bool) -> Iterator[str | None]:
    """A fresh database for this test session, migrated once, dropped at the end."""
    if not postgres_available:
        yield None
        return
    name = f"referral_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    yield url
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def truncate_postgres(url: str) -> None:
    import asyncpg

    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host,
        port=parsed.port or 5432,
        user=parsed.username,
        password=parsed.password,
        database=parsed.database,
    )
    try:
        await conn.execute(
            "TRUNCATE users, referral_codes, sessions, revocations, idempotency_keys, user_profiles, "
            "service_accounts, events, webhook_endpoints, webhook_deliveries, webhook_attempts "
            "RESTART IDENTITY CASCADE"
        )
        await conn.execute("UPDATE event_retention SET purged_through = 0")
        await conn.execute("UPDATE webhook_dispatch SET cursor = 0")
    finally:
        await conn.close()


@dataclass
class Stack:
    name: str
    database_url: str
    redis_url: str | None
    data_dir: Path
    redis_prefix: str

    @property
    def postgres(self) -> bool:
        return self.database_url.startswith("postgresql")

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "_env_file": None,
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "http_host": "127.0.0.1",
            "http_port": 0,
            "data_dir": self.data_dir,
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "redis_key_prefix": self.redis_prefix,
            "jwt_secret": TEST_SECRET,
            "shutdown_grace_seconds": 2.0,
            "shutdown_drain_seconds": 0.1,
            "hash_workers": 2,
            "workers": 1,
            # Tests register many users from 127.0.0.1: generous limits, so the limiter runs
            # on every call without getting in the way (tests/test_ratelimits.py uses small ones).
            **RateLimitSettings.every_rate("100000/1h"),
        }
        values.update(overrides)
        return Settings(**values)


@pytest.fixture
async def stack(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sqlite_template: Path,
    postgres_database: str | None,
    redis_available: bool,
) -> AsyncIterator[Stack]:
    database, cache = request.param.split("-")
    if database == "postgres":
        _need("PostgreSQL", postgres_database is not None)
        assert postgres_database is not None
        await truncate_postgres(postgres_database)
        url = postgres_database
    else:
        db_path = tmp_path / "referral.db"
        shutil.copy(sqlite_template, db_path)
        url = f"sqlite+aiosqlite:///{db_path}"
    redis_url = None
    if cache == "redis":
        _need("Redis", redis_available)
        redis_url = REDIS_URL
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    yield Stack(request.param, url, redis_url, tmp_path, prefix)
    if redis_url:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@dataclass
class Api:
    """A running server and stubs bound to it."""

    app: App
    channel: grpc.aio.Channel
    auth: auth_pb2_grpc.AuthServiceStub
    referral: referral_pb2_grpc.ReferralServiceStub
    health: health_pb2_grpc.HealthStub
    stack: Stack
    _counter: list[int] = field(default_factory=lambda: [0])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def unique_email(self, prefix: str = "user") -> str:
        self._counter[0] += 1
        return f"{prefix}{self._counter[0]}-{uuid.uuid4().hex[:6]}@example.com"

    async def register(self, email: str | None = None, password: str = PASSWORD, **kw: Any) -> auth_pb2.User:
        response = await self.auth.Register(
            auth_pb2.RegisterRequest(email=email or self.unique_email(), password=password, **kw)
        )
        return response.user

    async def login(self, email: str, password: str = PASSWORD) -> auth_pb2.LoginResponse:
        return await self.auth.Login(auth_pb2.LoginRequest(email=email, password=password))

    @property
    def mail_dir(self) -> Path:
        return self.app.settings.resolve_mail_dir()

    def mailbox(self) -> list[Any]:
        """The messages the server wrote to its development Maildir."""
        from tests.mail import maildir_messages

        return maildir_messages(self.mail_dir)

    async def verify(self, email: str) -> auth_pb2.User:
        """Follow the link of the verification message sent to ``email``."""
        from tests.mail import token_of, wait_for

        (message, *_) = await wait_for(self.mailbox, email, "verify_email")
        response = await self.auth.VerifyEmail(auth_pb2.VerifyEmailRequest(token=token_of(message)))
        return response.user

    async def verified_user(self, email: str | None = None) -> auth_pb2.User:
        email = email or self.unique_email()
        await self.register(email)
        return await self.verify(email)

    async def user_with_token(self, email: str | None = None) -> tuple[auth_pb2.User, str]:
        email = email or self.unique_email()
        user = await self.register(email)
        tokens = await self.login(email)
        return user, tokens.access_token


def token_claims(user_id: int, **changes: Any) -> dict[str, Any]:
    """The claims of a valid access token for ``user_id``; ``changes`` override or (with None)
    remove claims, for forging tokens in attack tests."""
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": "referral-service",
        "aud": "referral-service",
        "sub": str(user_id),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "sid": uuid.uuid4().hex,
    }
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def start_api(stack: Stack, **overrides: Any) -> Api:
    app = await build_app(stack.settings(**overrides))
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return Api(
        app=app,
        channel=channel,
        auth=auth_pb2_grpc.AuthServiceStub(channel),
        referral=referral_pb2_grpc.ReferralServiceStub(channel),
        health=health_pb2_grpc.HealthStub(channel),
        stack=stack,
    )


async def stop_api(api: Api) -> None:
    await api.channel.close()
    await api.app.stop(0, drain=0)


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    server = await start_api(stack)
    try:
        yield server
    finally:
        await stop_api(server)
