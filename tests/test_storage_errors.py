"""The storage adapter's one rule for "the database cannot be used now" (storage/errors.py),
checked against the errors SQLAlchemy, asyncpg and sqlite3 really raise: real failures where they
are cheap to cause (a refused port, a terminated session, a held write lock, a role out of
connections), driver exception instances for states a test cannot cause (a crash, a server still
starting). The wire-level tests are in test_database_outage.py."""

from __future__ import annotations

import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, exc, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

from referral_service.domain.errors import InvalidArgument, Reason
from referral_service.storage.db import create_engine
from referral_service.storage.errors import is_connection_lost, is_unavailable, unavailable
from tests.conftest import _need


async def _raised(awaitable: Any) -> BaseException:
    try:
        await awaitable
    except Exception as error:
        return error
    pytest.fail("no error raised")


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def pg_url(postgres_database: str | None) -> str:
    _need("PostgreSQL", postgres_database is not None)
    assert postgres_database is not None
    return postgres_database


async def _admin(url: str, **changes: Any) -> asyncpg.Connection:
    parsed = make_url(url).set(**changes)
    return await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
    )


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[tuple[AsyncEngine, asyncpg.Connection]]:
    """The adapter's engine (with its error hook) and an admin connection to cut its sessions."""
    engine = create_engine(pg_url, pool_size=2, timeout=5.0)
    admin = await _admin(pg_url)
    try:
        yield engine, admin
    finally:
        await admin.close()
        await engine.dispose()


async def _terminate(admin: asyncpg.Connection, pid: int) -> None:
    # With a timeout, pg_terminate_backend returns once the session has ended.
    assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_a_refused_connection_is_unavailable(pg_url: str, closed_port: int) -> None:
    url = make_url(pg_url).set(port=closed_port).render_as_string(hide_password=False)
    engine = create_engine(url, pool_size=1, timeout=5.0)
    try:
        error = await _raised(engine.connect())
    finally:
        await engine.dispose()
    assert isinstance(error, ConnectionRefusedError)
    assert is_unavailable(error)
    assert is_connection_lost(error)


async def test_a_session_ended_by_the_server_is_lost_in_the_next_statement(
    pg: tuple[AsyncEngine, asyncpg.Connection],
) -> None:
    engine, admin = pg
    async with engine.connect() as conn:
        await _terminate(admin, (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        error = await _raised(conn.execute(text("SELECT 1")))
        assert conn.invalidated  # SQLAlchemy will not use it again
    assert isinstance(error, exc.DBAPIError)
    assert error.connection_invalidated
    assert is_connection_lost(error)
    assert is_unavailable(error)


async def test_a_session_ended_before_commit_is_lost_at_commit(
    pg: tuple[AsyncEngine, asyncpg.Connection],
) -> None:
    engine, admin = pg
    async with engine.connect() as conn:
        transaction = await conn.begin()
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await _terminate(admin, pid)
        error = await _raised(transaction.commit())
    assert isinstance(error, exc.DBAPIError)
    assert error.connection_invalidated
    assert is_unavailable(error)


async def test_a_session_ended_while_the_pool_opens_it_is_lost(
    pg: tuple[AsyncEngine, asyncpg.Connection],
) -> None:
    """SQLAlchemy's asyncpg dialect runs set-up queries on every new connection, some calling
    asyncpg directly (type codecs: its errors arrive unwrapped, never seen by SQLAlchemy's error
    handling). Which error a cut brings depends on what asyncpg has read of the server's goodbye
    (a FATAL message, then the socket's end) when the next query goes out; each is a lost
    connection. Five cuts, so that more than one of them is likely met."""
    engine, admin = pg

    def cut(dbapi_connection: Any, _record: Any) -> None:
        await_only(_terminate(admin, dbapi_connection.driver_connection.get_server_pid()))

    event.listen(engine.sync_engine, "connect", cut, insert=True)  # before the dialect's hooks
    for _ in range(5):
        error = await _raised(engine.connect())
        assert is_connection_lost(error), repr(error)
        assert is_unavailable(error)


async def test_a_role_out_of_connections_is_unavailable(pg_url: str) -> None:
    role = f"outage_{uuid.uuid4().hex[:10]}"
    admin = await _admin(pg_url)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
    engine = create_engine(make_url(pg_url).set(username=role).render_as_string(), pool_size=1, timeout=5.0)
    try:
        error = await _raised(engine.connect())
    finally:
        await engine.dispose()
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()
    assert isinstance(error, exc.DBAPIError)
    assert isinstance(error.orig.__cause__, asyncpg.TooManyConnectionsError)  # SQLSTATE 53300
    assert is_unavailable(error)
    assert not is_connection_lost(error)


async def test_no_free_pooled_connection_in_time_is_unavailable(pg_url: str) -> None:
    engine = create_async_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.01)
    try:
        async with engine.connect():
            error = await _raised(engine.connect())
    finally:
        await engine.dispose()
    assert isinstance(error, exc.TimeoutError)
    assert is_unavailable(error)


async def test_sql_errors_and_constraint_violations_are_not_unavailable(
    pg: tuple[AsyncEngine, asyncpg.Connection],
) -> None:
    engine, _admin_conn = pg
    async with engine.connect() as conn:
        errors = [await _raised(conn.execute(text("SELEC 1")))]
        await conn.rollback()
        errors.append(await _raised(conn.execute(text("SELECT 1 / 0"))))
        await conn.rollback()
        await conn.execute(text("CREATE TEMPORARY TABLE t (id int PRIMARY KEY)"))
        await conn.execute(text("INSERT INTO t VALUES (1)"))
        errors.append(await _raised(conn.execute(text("INSERT INTO t VALUES (1)"))))
        assert not conn.invalidated
    assert isinstance(errors[2], exc.IntegrityError)
    for error in errors:
        assert not is_unavailable(error), error
        assert not is_connection_lost(error), error


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), True),
        (asyncpg.ConnectionFailureError("connection failure"), True),
        (asyncpg.ClientCannotConnectError("cannot connect"), True),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), True),
        (asyncpg.CrashShutdownError("terminating connection because of crash of another process"), True),
        (asyncpg.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.IdleSessionTimeoutError("terminating connection due to idle-session timeout"), True),
        (
            asyncpg.InterfaceError("cannot call Transaction.commit(): the underlying connection is closed"),
            True,
        ),
        (
            asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
            True,
        ),
        (asyncpg.TooManyConnectionsError("sorry, too many clients already"), False),
        (asyncpg.DiskFullError("could not extend file"), False),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (TimeoutError(), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_driver_errors_that_mean_the_database_cannot_be_used_now(error: BaseException, lost: bool) -> None:
    assert is_unavailable(error)
    assert is_connection_lost(error) is lost
    # as SQLAlchemy hands them on: wrapped in a DBAPIError whose orig is the adapter's error
    wrapped = exc.DBAPIError("SELECT 1", None, error)  # type: ignore[arg-type]
    assert is_unavailable(wrapped)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.UniqueViolationError("duplicate key value violates unique constraint"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        ValueError("a bug"),
        InvalidArgument(Reason.VALIDATION_FAILED, "bad input"),
        unavailable(),  # already the domain's answer: the pipeline maps it, nothing to classify
    ],
    ids=lambda value: type(value).__name__,
)
def test_other_errors_are_not_unavailable(error: BaseException) -> None:
    assert not is_unavailable(error)
    assert not is_connection_lost(error)


def test_the_answer_is_unavailable_with_a_retry_hint() -> None:
    answer = unavailable()
    assert answer.reason is Reason.SERVICE_UNAVAILABLE
    assert answer.retry_after_seconds
    assert "database" in answer.message


# --- SQLite --------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "referral.db"
    path.write_bytes(sqlite_template.read_bytes())
    return f"sqlite+aiosqlite:///{path}"


async def test_sqlite_locked_by_another_writer_is_unavailable(sqlite_url: str) -> None:
    holder = create_engine(sqlite_url, pool_size=1, timeout=5.0, writer=True)
    waiter = create_engine(sqlite_url, pool_size=1, timeout=0.0, writer=True)  # no busy wait
    try:
        async with holder.begin():  # BEGIN IMMEDIATE: the write lock
            error = await _raised(waiter.begin().__aenter__())
    finally:
        await waiter.dispose()
        await holder.dispose()
    assert isinstance(error, exc.OperationalError)
    assert error.orig.sqlite_errorcode == sqlite3.SQLITE_BUSY  # type: ignore[union-attr]
    assert is_unavailable(error)


def test_sqlite_file_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    # sqlite3 itself (aiosqlite raises its errors): no worker thread left behind by a failed open
    with pytest.raises(sqlite3.OperationalError) as raised:
        sqlite3.connect(tmp_path)  # a directory
    assert raised.value.sqlite_errorcode == sqlite3.SQLITE_CANTOPEN
    assert is_unavailable(raised.value)
    assert is_unavailable(exc.OperationalError(None, None, raised.value))  # as SQLAlchemy wraps it


async def test_sqlite_sql_errors_and_constraint_violations_are_not_unavailable(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url, pool_size=1, timeout=5.0)
    try:
        async with engine.connect() as conn:
            missing = await _raised(conn.execute(text("SELECT * FROM no_such_table")))
            await conn.execute(text("CREATE TEMPORARY TABLE t (id INTEGER PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO t VALUES (1)"))
            duplicate = await _raised(conn.execute(text("INSERT INTO t VALUES (1)")))
    finally:
        await engine.dispose()
    assert isinstance(missing, exc.OperationalError)  # what the old rule took for an outage
    assert isinstance(duplicate, exc.IntegrityError)
    assert not is_unavailable(missing)
    assert not is_unavailable(duplicate)
