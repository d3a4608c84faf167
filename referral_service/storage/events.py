"""The outbox (``Events`` port): events appended in the transaction of their change.

Cursors must increase in commit order, or a watcher that has read cursor 11 could later miss
cursor 10 committed after it. SQLite has one writer at a time (``BEGIN IMMEDIATE``), so its
AUTOINCREMENT rowid is in commit order already. On PostgreSQL a sequence is not (two
transactions take 10 and 11 and commit in the other order), so the first append of a
transaction takes a transaction-scoped advisory lock before drawing its cursor: appends
serialise from there to the commit (use cases append last, so the lock is held for a commit's
time). The same append sends ``NOTIFY referral_events``, delivered at commit to the other
workers' feeds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.models import Event, EventDraft
from referral_service.storage.core import EVENT_RETENTION, EVENTS, at

#: The PostgreSQL notification channel of new events.
CHANNEL = "referral_events"
#: The advisory lock key that orders appends (any constant; "refevent" in ASCII).
_LOCK_KEY = 0x7265666576656E74

_C = EVENTS.c
_COLUMNS = (_C.id, _C.cursor, _C.type, _C.time, _C.data)
_INSERT = insert(EVENTS)
_HEAD = select(func.coalesce(func.max(_C.cursor), 0))
_PURGED = select(EVENT_RETENTION.c.purged_through).where(EVENT_RETENTION.c.id == 1)
_LOCK = text(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
_NOTIFY = text(f"NOTIFY {CHANNEL}")


def _event(row: Any) -> Event:
    id_, cursor, type_, time, data = row
    return Event(id=id_, cursor=cursor, type=type_, time=time, data=json.loads(data))


class SqlEvents:
    """The ``Events`` port. ``appended`` tells the store to nudge the feed after the commit."""

    __slots__ = ("_conn", "_postgres", "appended")

    def __init__(self, conn: AsyncConnection, dialect: str) -> None:
        self._conn = conn
        self._postgres = dialect == "postgresql"
        self.appended = False

    async def append(self, draft: EventDraft, now: datetime) -> None:
        if self._postgres and not self.appended:
            await self._conn.execute(_LOCK)
            await self._conn.execute(_NOTIFY)
        await self._conn.execute(
            _INSERT,
            {
                "id": draft.id,
                "type": draft.type,
                "time": now,
                "data": json.dumps(dict(draft.data), separators=(",", ":")),
            },
        )
        self.appended = True

    async def after(
        self, cursor: int, types: Sequence[str], limit: int, upto: int | None = None
    ) -> list[Event]:
        query = select(*_COLUMNS).where(_C.cursor > cursor)
        if upto is not None:
            query = query.where(_C.cursor <= upto)
        if types:
            query = query.where(_C.type.in_(list(types)))
        query = query.order_by(_C.cursor).limit(limit)
        return [_event(row) for row in await self._conn.execute(query)]

    async def head(self) -> int:
        return int((await self._conn.execute(_HEAD)).scalar_one())

    async def purged_through(self) -> int:
        value = (await self._conn.execute(_PURGED)).scalar_one_or_none()
        return int(value or 0)

    async def purge(self, before: datetime) -> int:
        head = await self.head()
        last = (
            await self._conn.execute(
                select(func.max(_C.cursor)).where(_C.time < at("before"), _C.cursor < head),
                {"before": before},
            )
        ).scalar_one_or_none()
        if last is None:
            return 0
        deleted = (
            await self._conn.execute(delete(EVENTS).where(_C.cursor <= bindparam("last")), {"last": last})
        ).rowcount
        await self._conn.execute(
            update(EVENT_RETENTION)
            .where(EVENT_RETENTION.c.id == 1, EVENT_RETENTION.c.purged_through < bindparam("last"))
            .values(purged_through=bindparam("last")),
            {"last": last},
        )
        return int(deleted)
