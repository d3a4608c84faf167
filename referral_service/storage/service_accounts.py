"""Service accounts: internal services' client credentials and scopes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.models import ServiceAccount
from referral_service.storage.core import SERVICE_ACCOUNTS, at, write

_C = SERVICE_ACCOUNTS.c
_COLUMNS = (_C.id, _C.name, _C.client_id, _C.secret_hash, _C.scopes, _C.create_time, _C.revoke_time)
_INSERT = insert(SERVICE_ACCOUNTS).returning(*_COLUMNS)
_BY_CLIENT_ID = select(*_COLUMNS).where(_C.client_id == bindparam("client_id"))
_BY_NAME = select(*_COLUMNS).where(_C.name == bindparam("name"))
_ALL = select(*_COLUMNS).order_by(_C.name)
_REVOKE = (
    update(SERVICE_ACCOUNTS)
    .where(_C.id == bindparam("account"), _C.revoke_time.is_(None))
    .values(revoke_time=at("now"))
)


def _account(row: Any) -> ServiceAccount:
    id_, name, client_id, secret_hash, scopes, create_time, revoke_time = row
    return ServiceAccount(
        id=id_,
        name=name,
        client_id=client_id,
        secret_hash=secret_hash,
        scopes=tuple(scopes.split()),
        create_time=create_time,
        revoke_time=revoke_time,
    )


class SqlServiceAccounts:
    """The ``ServiceAccounts`` port."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(
        self, *, name: str, client_id: str, secret_hash: str, scopes: Sequence[str], now: datetime
    ) -> ServiceAccount:
        result = await write(
            self._conn,
            _INSERT,
            {
                "name": name,
                "client_id": client_id,
                "secret_hash": secret_hash,
                "scopes": " ".join(scopes),
                "create_time": now,
            },
        )
        return _account(result.one())

    async def by_client_id(self, client_id: str) -> ServiceAccount | None:
        row = (await self._conn.execute(_BY_CLIENT_ID, {"client_id": client_id})).one_or_none()
        return None if row is None else _account(row)

    async def by_name(self, name: str) -> ServiceAccount | None:
        row = (await self._conn.execute(_BY_NAME, {"name": name})).one_or_none()
        return None if row is None else _account(row)

    async def all(self) -> list[ServiceAccount]:
        return [_account(row) for row in await self._conn.execute(_ALL)]

    async def revoke(self, account_id: int, now: datetime) -> None:
        await self._conn.execute(_REVOKE, {"account": account_id, "now": now})
