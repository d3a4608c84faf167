"""Webhook endpoints, deliveries and attempts (the ``Webhooks`` port), each method one
transaction on the ``SqlStore``.

Fan-out reads the dispatch cursor with ``FOR UPDATE`` (PostgreSQL; SQLite's single writer
serialises it anyway), so any number of workers turn each event into deliveries once. Claims
are compare-and-set on ``next_attempt_time``, which doubles as the lease.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.models import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SUCCEEDED,
    DueDelivery,
    Event,
    EventDraft,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from referral_service.domain.ports import UnitOfWork
from referral_service.storage.core import (
    WEBHOOK_ATTEMPTS,
    WEBHOOK_DELIVERIES,
    WEBHOOK_DISPATCH,
    WEBHOOK_ENDPOINTS,
    at,
)
from referral_service.storage.store import SqlStore, SqlUnitOfWork

_E = WEBHOOK_ENDPOINTS.c
_D = WEBHOOK_DELIVERIES.c
_A = WEBHOOK_ATTEMPTS.c
_ENDPOINT_COLUMNS = (
    _E.id,
    _E.url,
    _E.event_types,
    _E.description,
    _E.consecutive_failures,
    _E.create_time,
    _E.update_time,
    _E.disabled_time,
    _E.disabled_reason,
)
_DELIVERY_COLUMNS = (
    _D.id,
    _D.endpoint_id,
    _D.event_id,
    _D.event_type,
    _D.state,
    _D.attempt_count,
    _D.next_attempt_time,
    _D.create_time,
)


def _endpoint(row: Any) -> WebhookEndpoint:
    id_, url, types, description, failures, create_time, update_time, disabled_time, reason = row
    return WebhookEndpoint(
        id=id_,
        url=url,
        event_types=tuple(types.split()),
        description=description,
        consecutive_failures=failures,
        create_time=create_time,
        update_time=update_time,
        disabled_time=disabled_time,
        disabled_reason=reason or "",
    )


def _delivery(row: Any, attempts: Sequence[WebhookAttempt] = ()) -> WebhookDelivery:
    id_, endpoint_id, event_id, event_type, state, count, next_time, create_time = row
    return WebhookDelivery(
        id=id_,
        endpoint_id=endpoint_id,
        event_id=event_id,
        event_type=event_type,
        state=state,
        attempt_count=count,
        next_attempt_time=next_time if state == DELIVERY_PENDING else None,
        create_time=create_time,
        attempts=tuple(attempts),
    )


def _conn(uow: UnitOfWork) -> AsyncConnection:
    assert isinstance(uow, SqlUnitOfWork)
    return uow.connection


class SqlWebhooks:
    """The ``Webhooks`` port."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self._postgres = store.database.dialect == "postgresql"

    async def add_endpoint(
        self, *, url: str, event_types: Sequence[str], description: str, secret: str, now: datetime
    ) -> WebhookEndpoint:
        async def work(uow: UnitOfWork) -> WebhookEndpoint:
            conn = _conn(uow)
            head = await uow.events.head()
            row = (
                await conn.execute(
                    insert(WEBHOOK_ENDPOINTS).returning(*_ENDPOINT_COLUMNS),
                    {
                        "url": url,
                        "event_types": " ".join(event_types),
                        "description": description,
                        "secret": secret,
                        "start_cursor": head,
                        "create_time": now,
                        "update_time": now,
                    },
                )
            ).one()
            return _endpoint(row)

        return await self._store.transact(work)

    async def endpoints(self, after_id: int, limit: int) -> list[WebhookEndpoint]:
        async with self._store.read() as uow:
            rows = await _conn(uow).execute(
                select(*_ENDPOINT_COLUMNS).where(_E.id > after_id).order_by(_E.id).limit(limit)
            )
            return [_endpoint(row) for row in rows]

    async def endpoint(self, endpoint_id: int) -> WebhookEndpoint | None:
        async with self._store.read() as uow:
            row = (
                await _conn(uow).execute(select(*_ENDPOINT_COLUMNS).where(_E.id == endpoint_id))
            ).one_or_none()
            return None if row is None else _endpoint(row)

    async def update_endpoint(
        self, endpoint_id: int, changes: Mapping[str, object], now: datetime
    ) -> WebhookEndpoint | None:
        values: dict[str, Any] = dict(changes)
        if "event_types" in values:
            values["event_types"] = " ".join(values["event_types"])
        values["update_time"] = now

        async def work(uow: UnitOfWork) -> WebhookEndpoint | None:
            row = (
                await _conn(uow).execute(
                    update(WEBHOOK_ENDPOINTS)
                    .where(_E.id == endpoint_id)
                    .values(**values)
                    .returning(*_ENDPOINT_COLUMNS)
                )
            ).one_or_none()
            return None if row is None else _endpoint(row)

        return await self._store.transact(work)

    async def delete_endpoint(self, endpoint_id: int) -> bool:
        async def work(uow: UnitOfWork) -> bool:
            conn = _conn(uow)
            # SQLite cascades only with its foreign keys on; delete the children explicitly.
            deliveries = select(_D.id).where(_D.endpoint_id == endpoint_id).scalar_subquery()
            await conn.execute(delete(WEBHOOK_ATTEMPTS).where(_A.delivery_id.in_(deliveries)))
            await conn.execute(delete(WEBHOOK_DELIVERIES).where(_D.endpoint_id == endpoint_id))
            result = await conn.execute(delete(WEBHOOK_ENDPOINTS).where(_E.id == endpoint_id))
            return bool(result.rowcount)

        return await self._store.transact(work)

    async def set_secret(self, endpoint_id: int, secret: str, now: datetime) -> bool:
        async def work(uow: UnitOfWork) -> bool:
            result = await _conn(uow).execute(
                update(WEBHOOK_ENDPOINTS).where(_E.id == endpoint_id).values(secret=secret, update_time=now)
            )
            return bool(result.rowcount)

        return await self._store.transact(work)

    async def _attempts(self, conn: AsyncConnection, ids: Sequence[int]) -> dict[int, list[WebhookAttempt]]:
        found: dict[int, list[WebhookAttempt]] = {i: [] for i in ids}
        if not ids:
            return found
        rows = await conn.execute(
            select(_A.delivery_id, _A.time, _A.http_status, _A.latency_ms, _A.error)
            .where(_A.delivery_id.in_(list(ids)))
            .order_by(_A.id)
        )
        for delivery_id, time, status, latency, error in rows:
            found[delivery_id].append(WebhookAttempt(time, status, latency, error or ""))
        return found

    async def deliveries(self, endpoint_id: int, before_id: int | None, limit: int) -> list[WebhookDelivery]:
        query = select(*_DELIVERY_COLUMNS).where(_D.endpoint_id == endpoint_id)
        if before_id is not None:
            query = query.where(_D.id < before_id)
        async with self._store.read() as uow:
            conn = _conn(uow)
            rows = list(await conn.execute(query.order_by(_D.id.desc()).limit(limit)))
            attempts = await self._attempts(conn, [row[0] for row in rows])
        return [_delivery(row, attempts[row[0]]) for row in rows]

    async def delivery(self, delivery_id: int) -> WebhookDelivery | None:
        async with self._store.read() as uow:
            conn = _conn(uow)
            row = (await conn.execute(select(*_DELIVERY_COLUMNS).where(_D.id == delivery_id))).one_or_none()
            if row is None:
                return None
            attempts = await self._attempts(conn, [delivery_id])
        return _delivery(row, attempts[delivery_id])

    async def retry(self, delivery_id: int, now: datetime) -> WebhookDelivery | None:
        async def work(uow: UnitOfWork) -> bool:
            result = await _conn(uow).execute(
                update(WEBHOOK_DELIVERIES)
                .where(_D.id == delivery_id)
                .values(state=DELIVERY_PENDING, next_attempt_time=now, update_time=now)
            )
            return bool(result.rowcount)

        if not await self._store.transact(work):
            return None
        return await self.delivery(delivery_id)

    async def fan_out(self, now: datetime, limit: int, body: Callable[[Event], str]) -> int:
        async with self._store.read() as uow:  # most rounds have nothing to do: no write transaction
            dispatched = (
                await _conn(uow).execute(select(WEBHOOK_DISPATCH.c.cursor).where(WEBHOOK_DISPATCH.c.id == 1))
            ).scalar_one_or_none()
            if dispatched is not None and dispatched >= await uow.events.head():
                return 0

        async def work(uow: UnitOfWork) -> int:
            conn = _conn(uow)
            locked = select(WEBHOOK_DISPATCH.c.cursor).where(WEBHOOK_DISPATCH.c.id == 1)
            if self._postgres:
                locked = locked.with_for_update()
            cursor = (await conn.execute(locked)).scalar_one_or_none()
            if cursor is None:
                await conn.execute(insert(WEBHOOK_DISPATCH), {"id": 1, "cursor": 0})
                cursor = 0
            found = await uow.events.after(cursor, (), limit)
            if not found:
                return 0
            endpoints = list(
                await conn.execute(
                    select(_E.id, _E.event_types, _E.start_cursor).where(
                        _E.disabled_time.is_(None), _E.start_cursor < found[-1].cursor
                    )
                )
            )
            rows = []
            for event in found:
                for endpoint_id, types, start in endpoints:
                    if event.cursor > start and (not types or event.type in types.split()):
                        rows.append(
                            {
                                "endpoint_id": endpoint_id,
                                "event_id": event.id,
                                "event_type": event.type,
                                "body": body(event),
                                "state": DELIVERY_PENDING,
                                "attempt_count": 0,
                                "next_attempt_time": now,
                                "create_time": now,
                                "update_time": now,
                            }
                        )
            if rows:
                await conn.execute(insert(WEBHOOK_DELIVERIES), rows)
            await conn.execute(
                update(WEBHOOK_DISPATCH).where(WEBHOOK_DISPATCH.c.id == 1).values(cursor=found[-1].cursor)
            )
            return len(found)

        return await self._store.transact(work)

    async def claim_due(self, now: datetime, lease_until: datetime, limit: int) -> list[DueDelivery]:
        async with self._store.read() as uow:
            candidates = list(
                await _conn(uow).execute(
                    select(_D.id, _D.next_attempt_time)
                    .join(WEBHOOK_ENDPOINTS, _E.id == _D.endpoint_id)
                    .where(
                        _D.state == DELIVERY_PENDING,
                        _D.next_attempt_time <= at("now"),
                        _E.disabled_time.is_(None),
                    )
                    .order_by(_D.next_attempt_time, _D.id)
                    .limit(limit),
                    {"now": now},
                )
            )
        if not candidates:
            return []

        async def work(uow: UnitOfWork) -> list[DueDelivery]:
            conn = _conn(uow)
            claimed = []
            for delivery_id, due in candidates:
                result = await conn.execute(
                    update(WEBHOOK_DELIVERIES)
                    .where(
                        _D.id == delivery_id,
                        _D.state == DELIVERY_PENDING,
                        _D.next_attempt_time == at("due"),
                    )
                    .values(next_attempt_time=at("lease"), update_time=at("now")),
                    {"due": due, "lease": lease_until, "now": now},
                )
                if result.rowcount:
                    claimed.append(delivery_id)
            if not claimed:
                return []
            rows = await conn.execute(
                select(_D.id, _D.endpoint_id, _E.url, _E.secret, _D.event_id, _D.body, _D.attempt_count)
                .join(WEBHOOK_ENDPOINTS, _E.id == _D.endpoint_id)
                .where(_D.id.in_(claimed))
            )
            return [DueDelivery(*row) for row in rows]

        return await self._store.transact(work)

    async def next_due_time(self) -> datetime | None:
        async with self._store.read() as uow:
            value: datetime | None = (
                await _conn(uow).execute(
                    select(func.min(_D.next_attempt_time))
                    .join(WEBHOOK_ENDPOINTS, _E.id == _D.endpoint_id)
                    .where(_D.state == DELIVERY_PENDING, _E.disabled_time.is_(None))
                )
            ).scalar_one_or_none()
        return value

    async def record(
        self,
        delivery: DueDelivery,
        attempt: WebhookAttempt,
        *,
        succeeded: bool,
        next_attempt_time: datetime | None,
        disable_after: int,
        disabled_event: Callable[[WebhookEndpoint], EventDraft],
        now: datetime,
    ) -> bool:
        if succeeded:
            state = DELIVERY_SUCCEEDED
        elif next_attempt_time is None:
            state = DELIVERY_FAILED
        else:
            state = DELIVERY_PENDING

        async def work(uow: UnitOfWork) -> bool:
            conn = _conn(uow)
            await conn.execute(
                insert(WEBHOOK_ATTEMPTS),
                {
                    "delivery_id": delivery.id,
                    "time": attempt.time,
                    "http_status": attempt.http_status,
                    "latency_ms": attempt.latency_ms,
                    "error": attempt.error[:200] or None,
                },
            )
            await conn.execute(
                update(WEBHOOK_DELIVERIES)
                .where(_D.id == delivery.id)
                .values(
                    state=state,
                    attempt_count=_D.attempt_count + 1,
                    next_attempt_time=next_attempt_time,
                    update_time=now,
                )
            )
            if succeeded:
                await conn.execute(
                    update(WEBHOOK_ENDPOINTS)
                    .where(_E.id == delivery.endpoint_id, _E.consecutive_failures != 0)
                    .values(consecutive_failures=0)
                )
                return False
            row = (
                await conn.execute(
                    update(WEBHOOK_ENDPOINTS)
                    .where(_E.id == delivery.endpoint_id)
                    .values(consecutive_failures=_E.consecutive_failures + 1)
                    .returning(*_ENDPOINT_COLUMNS)
                )
            ).one_or_none()
            if row is None:
                return False
            endpoint = _endpoint(row)
            if endpoint.disabled_time is not None or endpoint.consecutive_failures < disable_after:
                return False
            await conn.execute(
                update(WEBHOOK_ENDPOINTS)
                .where(_E.id == endpoint.id)
                .values(disabled_time=now, disabled_reason="failures", update_time=now)
            )
            await uow.events.append(disabled_event(endpoint), now)
            return True

        return await self._store.transact(work)
