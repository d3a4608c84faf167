"""Engines, pools and outages; ``store.SqlStore`` runs the use cases' units of work on them.

Reads run on ``read_engine`` in autocommit mode (no BEGIN/COMMIT round trips for what are
mostly single statements). Writes run on ``write_engine``: on PostgreSQL the same pool; on
SQLite a second engine with a single connection that starts every transaction with ``BEGIN
IMMEDIATE``: writers queue in the process instead of failing with "database is locked" when two
deferred transactions both try to upgrade to a write lock; WAL mode keeps readers running
meanwhile.

Errors that mean the database cannot be used now (a lost or refused connection, a timeout, a
lock wait; the rule is in ``errors.py``) become ``Unavailable`` (gRPC UNAVAILABLE), never INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc, make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from referral_service import metrics
from referral_service.domain.backoff import backoff_delay
from referral_service.files import private_directory, private_file
from referral_service.storage import errors

log = logging.getLogger("referral_service.db")


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def private_sqlite_file(url: str) -> None:
    """Before SQLite opens the database of ``url``: its directory created 0700, the file itself
    created empty with mode 0600 (an empty file is an empty database), earlier files tightened.
    SQLite creates its -wal, -shm and -journal files with the database file's mode, so they are
    0600 too, whatever the process umask."""
    path = _sqlite_path(url)
    if path is None:
        return
    private_directory(path.parent)
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        private_file(path.with_name(path.name + suffix), create=False)


def _configure_sqlite(engine: AsyncEngine, begin: str | None, timeout: float) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        cursor.close()

    if begin is not None:

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql(begin)


#: A pooled connection returned more recently than this is handed out without a ping.
PING_AFTER_IDLE_SECONDS = 0.5


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """Pre-ping only connections that sat idle in the pool (HikariCP's "alive bypass window"):
    ``pool_pre_ping`` pings at every checkout, a round trip that cost a third of a token check
    on PostgreSQL. A connection used half a second ago is alive or fails like any query would
    (and a failed query invalidates the pool); one that idled through a database restart is
    replaced before a call sees it."""

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["returned"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("returned")
        if returned is None or time.monotonic() - returned < PING_AFTER_IDLE_SECONDS:
            return  # new (just connected) or recently used
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            # The pool discards this connection and checks out (or opens) another.
            raise exc.DisconnectionError(f"stale pooled connection: {error}") from error


def _count_checkouts(engine: AsyncEngine, pool: str) -> None:
    """``referral_db_pool_checked_out_connections{pool}`` follows the pool's checkouts."""
    gauge = metrics.DB_POOL_CHECKED_OUT.labels(pool=pool)

    @event.listens_for(engine.sync_engine, "checkout")
    def _out(_dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        gauge.inc()

    @event.listens_for(engine.sync_engine, "checkin")
    def _in(_dbapi_connection: Any, _record: Any) -> None:
        gauge.dec()


def create_engine(url: str, *, pool_size: int, timeout: float, writer: bool = False) -> AsyncEngine:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        private_sqlite_file(url)
        engine = create_async_engine(
            url,
            pool_size=1 if writer else pool_size,
            max_overflow=0,
            pool_timeout=timeout,
            connect_args={"timeout": timeout},
            hide_parameters=True,  # no emails or password hashes in error messages and logs
        )
        # Writers: BEGIN IMMEDIATE. Readers: autocommit, each statement its own snapshot (no
        # BEGIN/COMMIT round trips through aiosqlite's thread on the hot read paths).
        _configure_sqlite(engine, "BEGIN IMMEDIATE" if writer else None, timeout)
        errors.watch(engine)
        _count_checkouts(engine, "writer" if writer else "main")
        return engine
    if backend == "postgresql":
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=timeout,
            connect_args={"timeout": timeout, "command_timeout": timeout},
            hide_parameters=True,
        )
        _ping_idle_connections(engine)
        errors.watch(engine)
        _count_checkouts(engine, "main")
        return engine
    raise ValueError(f"unsupported database: {backend} (use sqlite+aiosqlite or postgresql+asyncpg)")


class DatabaseUnreachable(ConnectionError):
    """The database did not answer within the start-up wait; the message says where and why."""


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def describe_error(error: BaseException) -> str:
    """A connection error in one line: the driver's words, without a traceback."""
    cause: BaseException = error
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        cause = error.orig
    text = " ".join(str(cause).split()) or type(cause).__name__
    return f"{type(cause).__name__}: {text}"[:300]


class Database:
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        timeout: float = 5.0,
        on_unavailable: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._on_unavailable = on_unavailable
        self.dialect = make_url(url).get_backend_name()
        self.engine = create_engine(url, pool_size=pool_size, timeout=timeout)
        self.write_engine = (
            create_engine(url, pool_size=1, timeout=timeout, writer=True)
            if self.dialect == "sqlite"
            else self.engine
        )
        # Reads run in autocommit mode (SQLite's reader engine never begins a transaction); a
        # use case that needs one consistent snapshot reads in a transaction.
        self.read_engine = (
            self.engine
            if self.dialect == "sqlite"
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        #: (pool label, most connections) of each pool, for the metrics.
        self._capacity = [("main", pool_size if self.dialect == "sqlite" else 2 * pool_size)]
        if self.write_engine is not self.engine:
            self._capacity.append(("writer", 1))
        for pool, most in self._capacity:
            metrics.DB_POOL_MAX.labels(pool=pool).inc(most)
        self._read = async_sessionmaker(self.read_engine, expire_on_commit=False, autoflush=False)
        self._write = async_sessionmaker(self.write_engine, expire_on_commit=False, autoflush=False)

    @asynccontextmanager
    async def _session(self, factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
        try:
            async with factory() as session, session.begin():
                yield session
        except Exception as error:
            self.raise_if_unavailable(error)
            raise

    def found_unavailable(self, error: BaseException) -> bool:
        """Whether ``error`` says the database cannot be used now (``errors.is_unavailable``);
        if so it is logged and ``on_unavailable`` told (health turns NOT_SERVING until the
        database answers again)."""
        if not errors.is_unavailable(error):
            return False
        log.warning("database unavailable: %s: %s", type(error).__name__, error)
        if self._on_unavailable is not None:
            self._on_unavailable()
        return True

    def raise_if_unavailable(self, error: BaseException) -> None:
        """Raise ``Unavailable`` when ``error`` says the database cannot be used now; return
        otherwise, for the caller to re-raise ``error``."""
        if self.found_unavailable(error):
            raise errors.unavailable() from error

    def read(self) -> AbstractAsyncContextManager[AsyncSession]:
        """An ORM session in autocommit mode, for tests and maintenance scripts that look at
        rows directly (the service itself goes through ``SqlStore``)."""
        return self._session(self._read)

    def write(self) -> AbstractAsyncContextManager[AsyncSession]:
        """An ORM session in one transaction (committed when the block exits without an error),
        for tests and maintenance scripts; the service itself goes through ``SqlStore``."""
        return self._session(self._write)

    async def ping(self) -> bool:
        return await self.check() is None

    async def check(self, within: float | None = None) -> str | None:
        """None when the database answers ``SELECT 1`` within ``within`` seconds (default: the
        database timeout), else why not, in a few words (no URL, so no password)."""
        try:
            async with asyncio.timeout(self.timeout if within is None else within):
                async with self.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except TimeoutError:
            return "no answer in time"
        except Exception as error:
            return describe_error(error)
        return None

    async def wait_until_reachable(self, seconds: float) -> None:
        """At start-up: wait up to ``seconds`` for the database to answer (retrying with
        back-off); raise ``DatabaseUnreachable`` saying why not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        attempt = 0
        waiting_logged = False
        while True:
            remaining = deadline - loop.time()
            problem = await self.check(max(min(self.timeout, remaining), 0.1))
            if problem is None:
                if waiting_logged:
                    log.info("database reachable")
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DatabaseUnreachable(
                    f"cannot reach the database at {safe_url(self.url)} after {seconds:g}s: {problem}"
                )
            if not waiting_logged:
                log.debug(
                    "waiting up to %gs for the database at %s (%s)", seconds, safe_url(self.url), problem
                )
                waiting_logged = True
            attempt += 1
            await asyncio.sleep(min(backoff_delay(attempt, 0.1, 1.0), remaining))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.write_engine is not self.engine:
            await self.write_engine.dispose()
        for pool, most in self._capacity:
            metrics.DB_POOL_MAX.labels(pool=pool).dec(most)
        self._capacity = []
