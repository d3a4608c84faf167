"""The ``Store`` port on SQLAlchemy Core (SQLite or PostgreSQL).

``read()`` hands out a unit of work on a pooled connection in autocommit mode: each statement
sees committed data, with no BEGIN/COMMIT round trips and no ORM session bookkeeping (which cost
as much as the query itself on the hot reads). ``transact(work)`` runs ``work`` in one
transaction on the writer: ``BEGIN IMMEDIATE`` on SQLite (see ``db.py``), committed when
``work`` returns, rolled back when it raises.

On SQLite a caller cancelled meanwhile (deadline, client gone) does not interrupt the
transaction: it runs to its end (commit or rollback) before the cancellation propagates. With
aiosqlite an interrupted transaction can leave its connection holding SQLite's write lock until
it is garbage-collected, blocking every later write. PostgreSQL rolls an interrupted
transaction back itself when its connection is dropped.

Errors that mean the database cannot be used now (``errors.py``) become ``Unavailable``, wherever
they happen: opening the connection, in a statement, at commit. A rollback that fails because
the connection was lost changes nothing (the server discards the transaction with the
connection), so the error that stopped the work stays the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncTransaction

from referral_service.domain.ports import MAIL_RETENTION, UnitOfWork
from referral_service.storage.codes import SqlCodes
from referral_service.storage.core import EMAIL_TOKENS, MAILS, REQUESTS, REVOCATIONS, SESSIONS, at
from referral_service.storage.db import Database
from referral_service.storage.events import SqlEvents
from referral_service.storage.mail import SqlEmailTokens, SqlMails
from referral_service.storage.profiles import SqlProfiles
from referral_service.storage.referrals import SqlReferrals
from referral_service.storage.requests import SqlRequests
from referral_service.storage.rewards import SqlRewards
from referral_service.storage.service_accounts import SqlServiceAccounts
from referral_service.storage.sessions import SqlSessions
from referral_service.storage.users import SqlUsers

if TYPE_CHECKING:
    from referral_service.domain import ports

T = TypeVar("T")

#: What can no longer matter: revocations of tokens past their expiry, forgotten request ids,
#: sessions past their refresh token's expiry (revoked ones are kept until then), expired email
#: tokens.
_PURGE = tuple(
    delete(table).where(table.c.expire_time <= at("now"))
    for table in (REVOCATIONS, REQUESTS, SESSIONS, EMAIL_TOKENS)
)
_PURGE_MAILS = delete(MAILS).where(MAILS.c.state != "pending", MAILS.c.update_time <= at("cutoff"))


class SqlUnitOfWork:
    """The repositories of one connection: a transaction (``transact``) or autocommit reads
    (``read``). Each is a small object over the connection, made when a use case first asks
    for it (a hot read touches one or two of the six)."""

    def __init__(self, connection: AsyncConnection, dialect: str) -> None:
        self.connection = connection
        self._dialect = dialect

    @cached_property
    def users(self) -> SqlUsers:
        return SqlUsers(self.connection)

    @cached_property
    def codes(self) -> SqlCodes:
        return SqlCodes(self.connection, self._dialect)

    @cached_property
    def referrals(self) -> SqlReferrals:
        return SqlReferrals(self.connection)

    @cached_property
    def sessions(self) -> SqlSessions:
        return SqlSessions(self.connection, self._dialect)

    @cached_property
    def requests(self) -> SqlRequests:
        return SqlRequests(self.connection)

    @cached_property
    def profiles(self) -> SqlProfiles:
        return SqlProfiles(self.connection)

    @cached_property
    def service_accounts(self) -> SqlServiceAccounts:
        return SqlServiceAccounts(self.connection)

    @cached_property
    def email_tokens(self) -> SqlEmailTokens:
        return SqlEmailTokens(self.connection)

    @cached_property
    def mails(self) -> SqlMails:
        return SqlMails(self.connection)

    @cached_property
    def rewards(self) -> SqlRewards:
        return SqlRewards(self.connection, self._dialect)

    @cached_property
    def events(self) -> SqlEvents:
        return SqlEvents(self.connection, self._dialect)

    @property
    def appended_events(self) -> bool:
        """Whether this unit of work appended an event (looked up without making the repo)."""
        events = self.__dict__.get("events")
        return events is not None and events.appended

    async def purge_expired(self, now: datetime) -> int:
        deleted = 0
        for statement in _PURGE:
            deleted += (await self.connection.execute(statement, {"now": now})).rowcount
        cutoff = now - MAIL_RETENTION
        deleted += (await self.connection.execute(_PURGE_MAILS, {"cutoff": cutoff})).rowcount
        return deleted


class SqlStore:
    """The ``Store`` port on a ``Database`` (whose engines, pools and outage handling it uses)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._dialect = database.dialect
        self._read_engine = database.read_engine
        self._write_engine = database.write_engine
        self._finish_when_cancelled = database.dialect == "sqlite"
        #: Called after a transaction that appended events has committed (the event feed's
        #: nudge, so that watchers in this process see it at once).
        self.on_events: Callable[[], None] | None = None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[SqlUnitOfWork]:
        try:
            async with self._read_engine.connect() as conn:
                yield SqlUnitOfWork(conn, self._dialect)
        except Exception as error:
            self.database.raise_if_unavailable(error)
            raise

    async def transact(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        if not self._finish_when_cancelled:
            return await self._transact(work)
        task = asyncio.ensure_future(self._transact(work))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller has gone: let the transaction end first (through further cancels),
            # then tell the caller. Its outcome goes unread (shield marks it retrieved).
            while not task.done():
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(task)
            raise

    async def _transact(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        try:
            async with self._write_engine.connect() as conn:
                transaction = await conn.begin()
                uow = SqlUnitOfWork(conn, self._dialect)
                try:
                    result = await work(uow)
                except BaseException:
                    await self._roll_back(transaction)
                    raise
                await transaction.commit()
                if uow.appended_events and self.on_events is not None:
                    self.on_events()
                return result
        except Exception as error:
            self.database.raise_if_unavailable(error)
            raise

    async def _roll_back(self, transaction: AsyncTransaction) -> None:
        """Roll back after ``work`` failed. If the connection is lost meanwhile the server has
        discarded the transaction itself: what stopped ``work`` (a conflict, a cancellation) is
        still the answer, not the failed rollback."""
        try:
            await transaction.rollback()
        except Exception as error:
            if not self.database.found_unavailable(error):
                raise

    async def ping(self) -> bool:
        return await self.database.ping()


if TYPE_CHECKING:

    def _implements_the_port(store: SqlStore, uow: SqlUnitOfWork) -> tuple[ports.Store, ports.UnitOfWork]:
        return store, uow
