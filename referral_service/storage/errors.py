"""The one rule for "the database cannot be reached now": which errors from SQLAlchemy, asyncpg
and sqlite3 mean the caller should retry shortly (``Unavailable``: gRPC UNAVAILABLE with a
RetryInfo, health NOT_SERVING) rather than a bug (INTERNAL), wherever they happen: opening a
connection, running a statement, committing or rolling back, reading or writing.

Two questions, asked in two places:

- ``is_connection_lost(error)``: does a driver error say the connection is gone or could not be
  made? ``watch(engine)`` asks it in SQLAlchemy's ``handle_error`` hook, on top of the dialect's
  own ``is_disconnect``, which misses some: asyncpg reports a connection cut while it opens or a
  server that ends the session (SQLSTATE class 08, 57P01-57P05) as errors SQLAlchemy wraps in a
  bare ``DBAPIError``, and its disconnect test looks at whether the socket has been seen closed
  yet, which races the server's own goodbye message. With the flag set, SQLAlchemy discards the
  connection (and the pool's older ones) and marks the error ``connection_invalidated``.
- ``is_unavailable(error)``: does an error that ended a unit of work mean the database cannot be
  used now? Yes for every disconnect SQLAlchemy flagged (``connection_invalidated``), for a
  lost connection it could not flag (asyncpg errors raised by SQLAlchemy's own connect hooks,
  which bypass its error handling), for network errors and timeouts (connect, statement, pool
  checkout), for a PostgreSQL short of resources (SQLSTATE class 53: too many connections, disk
  full, out of memory), and for SQLite's busy, locked, I/O, full and cannot-open results. No for
  everything else: constraint violations, SQL errors, a missing table are bugs, and a retry
  would not help.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator

from sqlalchemy import event, exc
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from referral_service.domain.errors import DomainError, Reason, Unavailable

#: PostgreSQL SQLSTATEs after which the session is gone: class 08 (connection exception) and the
#: server ending it: 57P01 admin_shutdown (pg_terminate_backend, fast shutdown), 57P02
#: crash_shutdown, 57P03 cannot_connect_now (starting up, shutting down, in recovery), 57P04
#: database_dropped, 57P05 idle_session_timeout.
_LOST_CLASSES = ("08",)
_LOST_STATES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})
#: SQLSTATE class 53, insufficient resources (53300 too_many_connections, 53100 disk_full,
#: 53200 out_of_memory): the server is up but cannot serve the call now.
_BUSY_CLASSES = ("53",)

#: SQLite result codes (primary code: the low byte of the extended code) that mean the database
#: file cannot be used now: another writer holds it past the busy timeout, I/O failed, the disk
#: is full, the file cannot be opened, memory ran out.
_SQLITE_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)

#: What the client is told, and how long it should wait before retrying.
MESSAGE = "the database is unavailable; retry shortly"
RETRY_AFTER_SECONDS = 1.0


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it wraps: SQLAlchemy's ``orig``, then each explicit ``__cause__``
    (SQLAlchemy's adapters raise their DB-API error ``from`` the driver's)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        current = current.__cause__ or (orig if isinstance(orig, BaseException) else None)


def _sqlstate(error: BaseException) -> str:
    """The PostgreSQL SQLSTATE an error carries (asyncpg and SQLAlchemy's adapter: ``sqlstate``;
    psycopg2: ``pgcode``), or ""."""
    for name in ("sqlstate", "pgcode"):
        value = getattr(error, name, None)
        if isinstance(value, str) and value:
            return value
    return ""


def _asyncpg_lost(error: BaseException) -> bool:
    """asyncpg errors that say its connection cannot be used again, without a SQLSTATE:

    - ``InterfaceError`` for a call on a closed connection. SQLAlchemy's connect hooks (the
      asyncpg dialect's type codecs) call asyncpg directly, so when the connection dies while the
      pool opens it this error arrives unwrapped, never seen by ``is_disconnect``; it is known by
      the words SQLAlchemy's asyncpg dialect looks for (``is_disconnect`` with no connection).
    - ``InternalClientError``: asyncpg's protocol state no longer matches the server's. A server
      ending the session sends a FATAL error before closing the socket; read while the
      connection was idle, and the next statement sent before the socket's end is seen, it
      leaves asyncpg waiting for a ReadyForQuery that never comes ("cannot switch to state 15;
      another operation (2) is in progress").

    asyncpg is only consulted once something has imported it."""
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is None:
        return False
    if isinstance(error, asyncpg.InternalClientError):
        return True
    return isinstance(error, asyncpg.InterfaceError) and "connection is closed" in str(error)


def _lost(error: BaseException) -> bool:
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, exc.DisconnectionError):
        return True
    if isinstance(error, OSError) and not isinstance(error, TimeoutError):
        return True  # refused, reset, unreachable: no connection (a timeout may leave it usable)
    state = _sqlstate(error)
    if state.startswith(_LOST_CLASSES) or state in _LOST_STATES:
        return True
    return _asyncpg_lost(error)


def is_connection_lost(error: BaseException) -> bool:
    """True when ``error`` (or a driver error it wraps) says the connection is gone or could not
    be opened: the connection must not be used again."""
    return any(_lost(item) for item in _chain(error))


def is_unavailable(error: BaseException) -> bool:
    """True when ``error``, which ended a unit of work, means the database cannot be used now (see
    the module's docstring); False for domain errors and bugs."""
    if isinstance(error, DomainError):
        return False
    for item in _chain(error):
        if _lost(item):
            return True
        if isinstance(item, (TimeoutError, exc.TimeoutError)):
            return True  # connect or statement timeout; no pooled connection free in time
        if _sqlstate(item).startswith(_BUSY_CLASSES):
            return True
        code = getattr(item, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in _SQLITE_UNAVAILABLE:
            return True
    return False


def unavailable() -> Unavailable:
    """The domain's answer for a database that cannot be used now."""
    return Unavailable(Reason.SERVICE_UNAVAILABLE, MESSAGE, retry_after_seconds=RETRY_AFTER_SECONDS)


def watch(engine: AsyncEngine) -> None:
    """Let SQLAlchemy treat every lost connection as a disconnect (see the module's docstring)."""

    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        if not context.is_disconnect and is_connection_lost(context.original_exception):
            context.is_disconnect = True
