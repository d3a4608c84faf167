"""Migrations (upgrade from empty, downgrade to empty, on both databases), the schema matching
the models, configuration and the CLI."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import sys
from pathlib import Path

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydantic import ValidationError
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from referral_service import cli
from referral_service.config import Profile, Settings
from referral_service.storage import migrate
from referral_service.storage.tables import Base
from tests.conftest import PASSWORD, Stack, start_api, stop_api

EXPECTED_TABLES = {
    "users",
    "referral_codes",
    "sessions",
    "revocations",
    "idempotency_keys",
    "user_profiles",
    "email_tokens",
    "mail_outbox",
    "service_accounts",
    "referral_states",
    "conversions",
    "reward_entries",
    "referrer_counters",
    "events",
    "event_retention",
    "webhook_endpoints",
    "webhook_deliveries",
    "webhook_attempts",
    "webhook_dispatch",
}


def _tables(url: str) -> set[str]:
    async def run() -> set[str]:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url)
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        await engine.dispose()
        return names - {"alembic_version"}

    return asyncio.run(run())


def _diff(url: str) -> list[object]:
    async def run() -> list[object]:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url)
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
        await engine.dispose()
        return list(diff)

    return asyncio.run(run())


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path, postgres_available: bool):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        return
    from tests.conftest import PG_URL, _need, _pg_admin

    _need("PostgreSQL", postgres_available)
    import uuid

    from sqlalchemy import make_url

    name = f"referral_mig_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_migrations_upgrade_downgrade_and_match_the_models(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    assert _tables(empty_database) == EXPECTED_TABLES
    assert _diff(empty_database) == []
    migrate.downgrade(empty_database)
    assert _tables(empty_database) == set()
    migrate.upgrade(empty_database)  # and up again
    assert _tables(empty_database) == EXPECTED_TABLES


def _sql(url: str, *statements: str) -> list[list[tuple[object, ...]]]:
    """Run statements in one transaction; the rows of each."""

    async def run() -> list[list[tuple[object, ...]]]:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                results = []
                for statement in statements:
                    result = await conn.execute(text(statement))
                    results.append([tuple(row) for row in result] if result.returns_rows else [])
                return results
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_the_reclaim_migration_keeps_codes_and_their_constraints(empty_database: str) -> None:
    """0004 (a closed code may give its key to a newer code of its owner) on a database with
    codes: rows, the partial open-slot index and the key's uniqueness survive (SQLite rebuilds the
    table), a keyless open code is refused, and a downgrade gives keyless codes untypable keys."""
    migrate.upgrade(empty_database, "0003")
    when = "'2030-01-01 00:00:00'"
    _sql(
        empty_database,
        "INSERT INTO users (id, email, email_key, password_hash, create_time, update_time) "
        f"VALUES (1, 'a@example.com', 'a@example.com', 'x', {when}, {when})",
        "INSERT INTO referral_codes (id, code, code_key, owner_id, create_time, expire_time, close_time) "
        f"VALUES (1, 'OLD1', 'OLD1', 1, {when}, {when}, {when}), "
        f"(2, 'NEW1', 'NEW1', 1, {when}, {when}, NULL)",
    )
    migrate.upgrade(empty_database)
    assert _diff(empty_database) == []
    _sql(empty_database, "UPDATE referral_codes SET code_key = NULL WHERE id = 1")
    [[rows]] = _sql(empty_database, "SELECT COUNT(*) FROM referral_codes WHERE code_key IS NULL")
    assert rows == (1,)
    refused = [
        "UPDATE referral_codes SET code_key = NULL WHERE id = 2",  # open: must keep its key
        "UPDATE referral_codes SET code_key = 'NEW1' WHERE id = 1",  # one code per key
        "UPDATE referral_codes SET close_time = NULL WHERE id = 1",  # keyless: stays closed
        "INSERT INTO referral_codes (id, code, code_key, owner_id, create_time, expire_time) "
        f"VALUES (3, 'THIRD1', 'THIRD1', 1, {when}, {when})",  # one open code per owner
    ]
    for statement in refused:
        with pytest.raises(IntegrityError):
            _sql(empty_database, statement)
    migrate.downgrade(empty_database, "0003")
    [keys] = _sql(empty_database, "SELECT id, code, code_key FROM referral_codes ORDER BY id")
    assert keys == [(1, "OLD1", "#1"), (2, "NEW1", "NEW1")]
    migrate.downgrade(empty_database)


def test_upgrade_is_idempotent(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    migrate.upgrade(empty_database)
    assert _tables(empty_database) == EXPECTED_TABLES


# --- configuration ---------------------------------------------------------------------------------


def test_production_refuses_insecure_defaults() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, profile=Profile.PRODUCTION)  # type: ignore[call-arg]
    text = str(info.value)
    assert "REFERRAL_JWT_SECRET" in text
    assert "PostgreSQL" in text
    assert "REFERRAL_REDIS_URL" in text
    assert "REFERRAL_CLIENT_SECRET_KEY" in text
    assert "REFERRAL_SMTP_URL" in text
    assert "REFERRAL_PUBLIC_URL" in text
    Settings(  # type: ignore[call-arg]
        _env_file=None,
        profile=Profile.PRODUCTION,
        jwt_secret="s" * 40,
        client_secret_key="k" * 40,
        database_url="postgresql+asyncpg://db/referral",
        redis_url="redis://cache:6379/0",
        smtp_url="smtps://mailer:p%40ss@smtp.example.com",
        public_url="https://referrals.example.com",
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://smtp.example.com", "must start with smtp:// or smtps://"),
        ("smtp://", "names no host"),
        ("smtp://host:port", "bad port"),
        ("smtp://host?starttls=maybe", "starttls must be auto, required or off"),
        ("smtps://host?starttls=required", "does not apply to smtps://"),
        ("smtp://host?tls=1", "unknown parameters: tls"),
    ],
)
def test_a_bad_smtp_url_is_named_without_its_password(url: str, message: str) -> None:
    from referral_service.config import describe

    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, smtp_url=url.replace("://", "://user:hunter2@", 1))  # type: ignore[call-arg]
    (line,) = describe(info.value)  # what the operator reads: one line, naming the variable
    assert line.startswith("REFERRAL_SMTP_URL")
    assert message in line
    assert "hunter2" not in line


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, jwt_secret="too-short")  # type: ignore[call-arg]


def test_environment_variables_configure_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFERRAL_GRPC_PORT", "6000")
    monkeypatch.setenv("REFERRAL_ACCESS_TOKEN_TTL", "PT5M")
    monkeypatch.setenv("REFERRAL_REDIS_URL", "")
    monkeypatch.setenv("REFERRAL_CODE_CACHE_TTL", "90")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.server.grpc_port == 6000
    assert settings.jwt.access_token_ttl.total_seconds() == 300
    assert settings.redis.url is None
    assert settings.codes.cache_ttl.total_seconds() == 90


#: Every environment variable the service reads: public names, which never change (the settings
#: are grouped in code, ``settings.database.url``; the names stay flat).
PUBLIC_NAMES = {
    "ACCESS_TOKEN_TTL", "ARGON2_MEMORY_KIB", "ARGON2_PARALLELISM", "ARGON2_TIME_COST",
    "CLIENT_SECRET_KEY", "CODE_CACHE_TTL", "CODE_MAX_HORIZON", "CODE_NEGATIVE_CACHE_TTL",
    "DATABASE_POOL_SIZE", "DATABASE_STARTUP_TIMEOUT_SECONDS", "REWARDS_RULES_FILE",
    "DATABASE_TIMEOUT_SECONDS", "DATABASE_URL", "DATA_DIR", "DISPOSABLE_DOMAINS_ALLOWED",
    "DISPOSABLE_DOMAINS_EXTRA", "ENRICHMENT_API_KEY", "ENRICHMENT_BASE_URL",
    "EVENTS_RETENTION", "EVENTS_POLL_SECONDS", "EVENTS_PROGRESS_SECONDS",
    "WEBHOOKS_ALLOW_PRIVATE", "WEBHOOKS_MAX_ATTEMPTS", "WEBHOOKS_RETRY_BACKOFF", "WEBHOOKS_RETRY_MAX",
    "WEBHOOKS_DISABLE_AFTER_FAILURES", "WEBHOOKS_POLL_SECONDS", "WEBHOOKS_CONCURRENCY",
    "WEBHOOKS_TIMEOUT_SECONDS",
    "ENRICHMENT_BREAKER_RESET_SECONDS", "ENRICHMENT_BREAKER_THRESHOLD", "ENRICHMENT_CONCURRENCY",
    "ENRICHMENT_CONNECT_TIMEOUT_SECONDS", "ENRICHMENT_LEASE", "ENRICHMENT_MAX_ATTEMPTS",
    "ENRICHMENT_POLL_SECONDS", "ENRICHMENT_PROVIDER", "ENRICHMENT_READ_TIMEOUT_SECONDS",
    "ENRICHMENT_RETRY_BACKOFF", "ENRICHMENT_RETRY_MAX", "EVENT_LOOP", "GRPC_HOST", "GRPC_PORT",
    "HASH_QUEUE", "HASH_WORKERS", "HEALTH_PROBE_INTERVAL_SECONDS", "HOUSEKEEPING_INTERVAL",
    "HTTP_CORS_ORIGINS", "HTTP_DOCS_ENABLED",
    "HTTP_ENABLED", "HTTP_HOST", "HTTP_MAX_BODY_BYTES", "HTTP_PORT", "HTTP_TIMEOUT_SECONDS",
    "HUNTER_API_KEY", "HUNTER_BASE_URL", "HUNTER_BREAKER_RESET_SECONDS", "HUNTER_BREAKER_THRESHOLD",
    "HUNTER_CACHE_TTL", "HUNTER_CONNECT_TIMEOUT_SECONDS", "HUNTER_MAX_ATTEMPTS", "HUNTER_POLICY",
    "HUNTER_READ_TIMEOUT_SECONDS", "HUNTER_RETRY_BACKOFF_SECONDS", "HUNTER_TOTAL_TIMEOUT_SECONDS",
    "JWT_ALGORITHM", "JWT_AUDIENCE", "JWT_ISSUER", "JWT_LEEWAY_SECONDS", "JWT_PREVIOUS_PUBLIC_KEYS",
    "JWT_PREVIOUS_SECRETS", "JWT_PRIVATE_KEY", "JWT_PRIVATE_KEY_FILE", "JWT_SECRET",
    "LIST_DEFAULT_PAGE_SIZE", "LIST_MAX_PAGE_SIZE", "LOG_FORMAT", "LOG_LEVEL", "MAX_MESSAGE_BYTES",
    "MAX_SESSIONS_PER_USER", "METRICS_ENABLED", "METRICS_HOST", "METRICS_PORT",
    "PROFILE", "RATE_LIMITS_ENABLED", "RATE_LIMIT_CLIENT_ADDRESS_HEADER",
    "RATE_LIMIT_CODE_CHECK_ADDRESS", "RATE_LIMIT_CODE_CREATE_USER", "RATE_LIMIT_CODE_DELETE_USER",
    "RATE_LIMIT_IPV6_PREFIX", "RATE_LIMIT_LOGIN_ACCOUNT",
    "RATE_LIMIT_LOGIN_ACCOUNT_ADDRESS", "RATE_LIMIT_LOGIN_ADDRESS", "RATE_LIMIT_LOGIN_CALLS_ADDRESS",
    "RATE_LIMIT_LOGIN_SUCCESS_ACCOUNT", "RATE_LIMIT_LOOKUP_ADDRESS", "RATE_LIMIT_PASSWORD_CHANGE_USER",
    "RATE_LIMIT_REFRESH_ADDRESS",
    "RATE_LIMIT_REGISTER_ADDRESS", "RATE_LIMIT_REGISTER_SERVICE", "RATE_LIMIT_SERVICE_RATES",
    "RATE_LIMIT_SERVICE_TOKEN_ADDRESS", "RATE_LIMIT_TRUST_TTL",
    "RATE_LIMIT_TRUSTED_PROXIES", "RATE_LIMIT_VANITY_CODE_USER",
    "REDIS_BREAKER_RESET_SECONDS", "REDIS_BREAKER_THRESHOLD",
    "REDIS_KEY_PREFIX", "REDIS_TIMEOUT_SECONDS", "REDIS_URL", "REFRESH_TOKEN_TTL",
    "REJECT_DISPOSABLE_EMAILS", "REQUEST_ID_TTL", "SHUTDOWN_DRAIN_SECONDS", "SHUTDOWN_GRACE_SECONDS",
    "SO_REUSEPORT", "TRACING_ENABLED", "WORKERS",
    "TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE", "TLS_CLIENT_AUTH", "HTTP_TLS_CLIENT_AUTH",
    "TLS_SERVICE_ACCOUNTS",
    "SMTP_URL", "SMTP_CA_FILE", "SMTP_TIMEOUT_SECONDS", "MAIL_FROM", "MAIL_PRODUCT_NAME", "MAIL_DIR",
    "PUBLIC_URL", "EMAIL_VERIFY_LINK", "PASSWORD_RESET_LINK", "EMAIL_VERIFICATION_TTL",
    "PASSWORD_RESET_TTL", "MAIL_RETRY_BACKOFF", "MAIL_RETRY_MAX", "MAIL_MAX_ATTEMPTS",
    "MAIL_CONCURRENCY", "MAIL_POLL_SECONDS", "MAIL_LEASE",
    "RATE_LIMIT_VERIFY_EMAIL_ADDRESS", "RATE_LIMIT_VERIFICATION_RESEND_ACCOUNT",
    "RATE_LIMIT_VERIFICATION_RESEND_ADDRESS", "RATE_LIMIT_PASSWORD_RESET_ACCOUNT",
    "RATE_LIMIT_PASSWORD_RESET_ADDRESS", "RATE_LIMIT_PASSWORD_RESET_CONFIRM_ADDRESS",
}  # fmt: skip


def test_the_environment_variable_names_are_the_public_ones() -> None:
    from referral_service.config import FLAT_NAMES

    assert {name.upper() for name in FLAT_NAMES} | {"PROFILE", "DATA_DIR"} == PUBLIC_NAMES


def test_every_grouped_setting_is_read_from_its_flat_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "REFERRAL_HTTP_PORT": ("8181", lambda s: s.http.port == 8181),
        "REFERRAL_DATABASE_POOL_SIZE": ("3", lambda s: s.database.pool_size == 3),
        "REFERRAL_REDIS_KEY_PREFIX": ("x:", lambda s: s.redis.key_prefix == "x:"),
        "REFERRAL_JWT_LEEWAY_SECONDS": ("5", lambda s: s.jwt.leeway_seconds == 5),
        "REFERRAL_ARGON2_TIME_COST": ("3", lambda s: s.passwords.argon2_time_cost == 3),
        "REFERRAL_LIST_MAX_PAGE_SIZE": ("500", lambda s: s.codes.list_max_page_size == 500),
        "REFERRAL_HUNTER_MAX_ATTEMPTS": ("2", lambda s: s.hunter.max_attempts == 2),
        "REFERRAL_ENRICHMENT_POLL_SECONDS": ("2.5", lambda s: s.enrichment.poll_seconds == 2.5),
        "REFERRAL_RATE_LIMITS_ENABLED": ("false", lambda s: not s.rate_limits.enabled),
        "REFERRAL_RATE_LIMIT_LOGIN_ACCOUNT": ("5/1m", lambda s: str(s.rate_limits.login_account) == "5/60s"),
        "REFERRAL_RATE_LIMIT_TRUSTED_PROXIES": (
            '["10.0.0.0/8"]',
            lambda s: s.rate_limits.trusted_proxies == ["10.0.0.0/8"],
        ),
        "REFERRAL_DISPOSABLE_DOMAINS_EXTRA": (
            '["spam.example"]',
            lambda s: s.registration.disposable_domains_extra == ["spam.example"],
        ),
        "REFERRAL_LOG_FORMAT": ("json", lambda s: s.logging.format.value == "json"),
        "REFERRAL_SO_REUSEPORT": ("true", lambda s: s.server.so_reuseport),
    }
    for name, (value, _check) in values.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    for name, (_value, check) in values.items():
        assert check(settings), name
    # A flat keyword (as the CLI passes its flags) wins over the environment.
    assert Settings(_env_file=None, http_port=9191).http.port == 9191  # type: ignore[call-arg]


def test_a_dotenv_file_sets_the_same_names(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("REFERRAL_GRPC_PORT=6001\nREFERRAL_CODE_CACHE_TTL=PT2M\nREFERRAL_REDIS_URL=\n")
    settings = Settings(_env_file=env)  # type: ignore[call-arg]
    assert settings.server.grpc_port == 6001
    assert settings.codes.cache_ttl.total_seconds() == 120
    assert settings.redis.url is None


def test_configuration_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("REFERRAL_HTTP_PORT", "eighty")
    monkeypatch.setenv("REFERRAL_ENRICHMENT_PROVIDER", "clearbit")
    assert cli.main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert "REFERRAL_HTTP_PORT: Input should be a valid integer" in err
    assert "REFERRAL_ENRICHMENT_PROVIDER=clearbit needs REFERRAL_ENRICHMENT_API_KEY" in err
    assert "http.port" not in err  # the grouping in code is not the user's business


def test_development_secret_is_generated_once_and_private(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    first = settings.resolve_jwt_secret()
    second = Settings(_env_file=None, data_dir=tmp_path).resolve_jwt_secret()  # type: ignore[call-arg]
    assert first == second
    assert len(first) >= 32
    mode = stat.S_IMODE(os.stat(tmp_path / "jwt-secret").st_mode)
    assert mode == 0o600
    other = Settings(_env_file=None, data_dir=tmp_path / "elsewhere").resolve_jwt_secret()  # type: ignore[call-arg]
    assert other != first


# --- CLI ------------------------------------------------------------------------------------------------


def test_cli_migrate_and_create_superuser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("REFERRAL_"):
            monkeypatch.delenv(name)
    assert cli.main(["migrate"]) == 0
    assert (tmp_path / "data" / "referral.db").exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    assert cli.main(["create-superuser", "--email", "Ops@Example.com", "--password-stdin"]) == 0
    assert "created superuser" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("password\n"))
    assert cli.main(["create-superuser", "--email", "weak@example.com", "--password-stdin"]) == 1
    assert "common" in capsys.readouterr().err
    # An existing account is refused, and left as it was.
    monkeypatch.setattr(sys, "stdin", io.StringIO("another long passphrase\n"))
    assert cli.main(["create-superuser", "--email", "ops@example.com", "--password-stdin"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err
    assert "--promote-existing" in err


async def test_a_created_superuser_can_log_in_and_is_flagged(stack: Stack) -> None:
    api = await start_api(stack)
    try:
        user, created = await api.app.auth.create_superuser("root@example.com", PASSWORD)
        assert created
        assert user.is_superuser
        tokens = await api.login("root@example.com")
        from referral.v1 import auth_pb2

        from tests.conftest import bearer

        me = await api.auth.GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)
        )
        assert me.user.is_superuser
    finally:
        await stop_api(api)


def test_serve_reports_a_busy_port_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import socket

    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("REFERRAL_"):
            monkeypatch.delenv(name)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--workers", "1", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_integrations_migration_keeps_users_both_ways(empty_database: str) -> None:
    """0002 adds columns to users (batch mode rebuilds the table on SQLite) and a table; going
    down to 0001 and up again keeps every user."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run(sql: str) -> list[tuple[object, ...]]:
        engine = create_async_engine(empty_database)
        async with engine.begin() as conn:
            result = await conn.execute(text(sql))
            rows = [tuple(row) for row in result] if result.returns_rows else []
        await engine.dispose()
        return rows

    migrate.upgrade(empty_database, "0001")
    asyncio.run(
        run(
            "INSERT INTO users (email, email_key, password_hash, create_time, update_time) "
            "VALUES ('a@example.com', 'a@example.com', 'x', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
        )
    )
    migrate.upgrade(empty_database)
    assert asyncio.run(run("SELECT email, email_verification, email_verify_time FROM users")) == [
        ("a@example.com", None, None)
    ]
    asyncio.run(
        run(
            "INSERT INTO user_profiles (user_id, state, create_time, update_time) "
            "SELECT id, 'pending', create_time, create_time FROM users"
        )
    )
    migrate.downgrade(empty_database, "0001")
    assert "user_profiles" not in _tables(empty_database)
    assert asyncio.run(run("SELECT email FROM users")) == [("a@example.com",)]
    migrate.upgrade(empty_database)
    assert _diff(empty_database) == []


def test_sessions_migration_carries_every_session_over(empty_database: str) -> None:
    """0003 turns refresh-token rows into one row per session: the newest token is current,
    a session with any revoked token (even one a racing refresh inserted after the revocation)
    stays revoked; going down and up again keeps them."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run(*statements: str) -> list[tuple[object, ...]]:
        engine = create_async_engine(empty_database)
        rows: list[tuple[object, ...]] = []
        async with engine.begin() as conn:
            for sql in statements:
                result = await conn.execute(text(sql))
                rows = [tuple(row) for row in result] if result.returns_rows else []
        await engine.dispose()
        return rows

    migrate.upgrade(empty_database, "0002")
    t1, t2, t3, late = (
        "'2026-01-01 00:00:00'",
        "'2026-01-02 00:00:00'",
        "'2026-01-03 00:00:00'",
        "'2036-01-01 00:00:00'",
    )
    asyncio.run(
        run(
            "INSERT INTO users (email, email_key, password_hash, create_time, update_time) "
            f"VALUES ('a@example.com', 'a@example.com', 'x', {t1}, {t1})",
            "INSERT INTO refresh_tokens "
            "(jti, session_id, user_id, create_time, expire_time, used_time, revoke_time) VALUES "
            f"('a', 's1', 1, {t1}, {late}, {t2}, NULL), ('b', 's1', 1, {t2}, {late}, NULL, NULL), "
            f"('c', 's2', 1, {t1}, {late}, NULL, {t2}), "
            f"('d', 's3', 1, {t1}, {late}, {t2}, {t3}), ('e', 's3', 1, {t2}, {late}, NULL, NULL)",
        )
    )
    migrate.upgrade(empty_database)
    query = (
        "SELECT id, refresh_jti, refresh_time IS NOT NULL, revoke_time IS NOT NULL, revoke_reason "
        "FROM sessions ORDER BY id"
    )
    assert asyncio.run(run(query)) == [
        ("s1", "b", True, False, None),
        ("s2", "c", False, True, "logout"),
        ("s3", "e", True, True, "logout"),
    ]
    migrate.downgrade(empty_database, "0002")
    assert asyncio.run(run("SELECT jti, revoke_time IS NOT NULL FROM refresh_tokens ORDER BY jti")) == [
        ("b", False),
        ("c", True),
        ("e", True),
    ]
    migrate.upgrade(empty_database)
    assert [row[:2] for row in asyncio.run(run(query))] == [("s1", "b"), ("s2", "c"), ("s3", "e")]
    assert _diff(empty_database) == []


async def test_housekeeping_purges_only_what_has_expired(stack: Stack) -> None:
    from datetime import timedelta

    from referral.v1 import auth_pb2
    from sqlalchemy import func, select

    from referral_service.domain.clock import utcnow
    from referral_service.domain.ports import UnitOfWork
    from referral_service.storage.tables import IdempotencyRow, RevocationRow, SessionRow
    from tests.conftest import bearer
    from tests.errors import expect_error

    api = await start_api(stack)
    try:
        email = api.unique_email()
        user = await api.register(email)
        tokens = await api.login(email)
        await api.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(tokens.access_token))
        past = utcnow() - timedelta(days=2)

        async def expired_rows(uow: UnitOfWork) -> None:
            await uow.sessions.add_revocations([("jti:long-gone", past)])
            await uow.sessions.add(
                session_id="old", user_id=user.id, refresh_jti="old", now=past, expire_time=past
            )
            await uow.requests.remember(
                scope="register",
                request_id="00000000-0000-4000-8000-000000000000",
                fingerprint="x",
                resource_id=user.id,
                now=past,
                expire_time=past,
            )

        await api.app.store.transact(expired_rows)

        async def count(table: type) -> int:
            async with api.app.db.read() as session:
                return int((await session.execute(select(func.count()).select_from(table))).scalar_one())

        before = {t: await count(t) for t in (RevocationRow, SessionRow, IdempotencyRow)}
        assert await api.app.housekeeping() == 3
        after = {t: await count(t) for t in (RevocationRow, SessionRow, IdempotencyRow)}
        assert {t: before[t] - after[t] for t in before} == {
            RevocationRow: 1,
            SessionRow: 1,
            IdempotencyRow: 1,
        }
        # the live revocation is kept: the logged-out token stays refused
        await expect_error(
            api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )
    finally:
        await stop_api(api)
