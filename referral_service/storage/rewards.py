"""Referral states, conversions, the append-only reward ledger and the per-referrer counters
(the ``Rewards`` port). Every change that must hold under concurrency is one conditional
statement (compare-and-set of a state, a capped counter increment) or a unique index
(``(source, event_id)`` of conversions, one correction per grant)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import aliased

from referral_service.domain.models import (
    GRANT,
    Conversion,
    Money,
    ReferralState,
    ReferralStatus,
    ReviewState,
    Reward,
    RewardRole,
)
from referral_service.domain.ports import NewConversion, NewRewardEntry
from referral_service.storage.core import CONVERSIONS, COUNTERS, ENTRIES, STATES, USERS, write

_CONVERSION_COLUMNS = (
    CONVERSIONS.c.id,
    CONVERSIONS.c.source,
    CONVERSIONS.c.event_id,
    CONVERSIONS.c.fingerprint,
    CONVERSIONS.c.user_id,
    CONVERSIONS.c.kind,
    CONVERSIONS.c.occur_time,
    CONVERSIONS.c.create_time,
    CONVERSIONS.c.value_currency,
    CONVERSIONS.c.value_units,
    CONVERSIONS.c.value_nanos,
    CONVERSIONS.c.reverse_time,
)
_STATE_COLUMNS = (
    STATES.c.referee_id,
    STATES.c.referrer_id,
    STATES.c.state,
    STATES.c.review,
    STATES.c.signals,
    STATES.c.review_note,
    STATES.c.create_time,
    STATES.c.update_time,
    STATES.c.qualify_time,
    STATES.c.reward_time,
    STATES.c.review_time,
)
_CORRECTION = aliased(ENTRIES, name="correction")
_REWARD_COLUMNS = (
    ENTRIES.c.id,
    ENTRIES.c.user_id,
    ENTRIES.c.referee_id,
    ENTRIES.c.role,
    ENTRIES.c.amount,
    ENTRIES.c.unit,
    ENTRIES.c.rule,
    ENTRIES.c.conversion_id,
    ENTRIES.c.create_time,
    ENTRIES.c.available_time,
    _CORRECTION.c.kind,
    _CORRECTION.c.create_time,
)
_REWARDS = (
    select(*_REWARD_COLUMNS)
    .select_from(ENTRIES.outerjoin(_CORRECTION, _CORRECTION.c.corrects_id == ENTRIES.c.id))
    .where(ENTRIES.c.kind == GRANT)
)
_INSERT_CONVERSION = insert(CONVERSIONS).returning(CONVERSIONS.c.id)
_INSERT_ENTRY = insert(ENTRIES).returning(ENTRIES.c.id)
_GET_CONVERSION = select(*_CONVERSION_COLUMNS).where(
    CONVERSIONS.c.source == bindparam("source"), CONVERSIONS.c.event_id == bindparam("event_id")
)


def _conversion(row: Any) -> Conversion:
    id_, source, event_id, fingerprint, user_id, kind, occur, create, currency, units, nanos, reverse = row
    value = Money(currency, units, nanos or 0) if currency is not None else None
    return Conversion(
        id=id_,
        source=source,
        event_id=event_id,
        fingerprint=fingerprint,
        user_id=user_id,
        kind=kind,
        occur_time=occur,
        create_time=create,
        value=value,
        reverse_time=reverse,
    )


def _status(row: Any) -> ReferralStatus:
    referee, referrer, state, review, signals, note, create, update_, qualify, reward, review_time = row
    return ReferralStatus(
        referee_id=referee,
        referrer_id=referrer,
        state=ReferralState(state),
        review=ReviewState(review) if review else None,
        signals=tuple(signals.split()) if signals else (),
        review_note=note or "",
        create_time=create,
        update_time=update_,
        qualify_time=qualify,
        reward_time=reward,
        review_time=review_time,
        screened=signals is not None,
    )


def _reward(row: Any) -> Reward:
    id_, user_id, referee_id, role, amount, unit, rule, conversion_id, create, available, kind, corrected = (
        row
    )
    return Reward(
        id=id_,
        user_id=user_id,
        referee_id=referee_id,
        role=RewardRole(role),
        amount=amount,
        unit=unit,
        rule=rule,
        conversion_id=conversion_id,
        create_time=create,
        available_time=available,
        correction=kind,
        correct_time=corrected,
    )


def _insert_ignoring(dialect: str, table: Any) -> Any:
    """``INSERT .. ON CONFLICT DO NOTHING`` on either backend."""
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(table).on_conflict_do_nothing()


class SqlRewards:
    """The ``Rewards`` port."""

    __slots__ = ("_conn", "_dialect")

    def __init__(self, conn: AsyncConnection, dialect: str) -> None:
        self._conn = conn
        self._dialect = dialect

    # --- conversions ---------------------------------------------------------------------------

    async def add_conversion(self, conversion: NewConversion, now: datetime) -> Conversion:
        value = conversion.value
        result = await write(
            self._conn,
            _INSERT_CONVERSION,
            {
                "source": conversion.source,
                "event_id": conversion.event_id,
                "fingerprint": conversion.fingerprint,
                "user_id": conversion.user_id,
                "kind": conversion.kind,
                "value_currency": value.currency if value else None,
                "value_units": value.units if value else None,
                "value_nanos": value.nanos if value else None,
                "occur_time": conversion.occur_time,
                "create_time": now,
            },
        )
        return Conversion(
            id=result.scalar_one(),
            source=conversion.source,
            event_id=conversion.event_id,
            fingerprint=conversion.fingerprint,
            user_id=conversion.user_id,
            kind=conversion.kind,
            occur_time=conversion.occur_time,
            create_time=now,
            value=value,
        )

    async def conversion(self, source: int, event_id: str) -> Conversion | None:
        row = (
            await self._conn.execute(_GET_CONVERSION, {"source": source, "event_id": event_id})
        ).one_or_none()
        return None if row is None else _conversion(row)

    async def reverse_conversion(self, conversion_id: int, now: datetime) -> bool:
        result = await self._conn.execute(
            update(CONVERSIONS)
            .where(CONVERSIONS.c.id == conversion_id, CONVERSIONS.c.reverse_time.is_(None))
            .values(reverse_time=now)
        )
        return bool(result.rowcount)

    async def qualifying(self, user_id: int, kinds: Sequence[str]) -> tuple[int, int | None]:
        row = (
            await self._conn.execute(
                select(func.count(), func.max(CONVERSIONS.c.id)).where(
                    CONVERSIONS.c.user_id == user_id,
                    CONVERSIONS.c.kind.in_(list(kinds)),
                    CONVERSIONS.c.reverse_time.is_(None),
                )
            )
        ).one()
        return int(row[0]), row[1]

    # --- referral states -------------------------------------------------------------------------

    async def ensure_referral(self, referee_id: int, referrer_id: int, now: datetime) -> None:
        await self._conn.execute(
            _insert_ignoring(self._dialect, STATES).values(
                referee_id=referee_id,
                referrer_id=referrer_id,
                state=ReferralState.PENDING.value,
                create_time=now,
                update_time=now,
            )
        )

    async def referral(self, referee_id: int, *, lock: bool = False) -> ReferralStatus | None:
        """With ``lock``, the row is locked until the transaction ends (PostgreSQL; SQLite
        transactions are serialised anyway), so that concurrent evaluations of one referral
        run one after the other and each sees what the previous committed."""
        statement = select(*_STATE_COLUMNS).where(STATES.c.referee_id == referee_id)
        if lock:
            statement = statement.with_for_update()
        row = (await self._conn.execute(statement)).one_or_none()
        return None if row is None else _status(row)

    async def move_referral(
        self, referee_id: int, from_states: Sequence[ReferralState], to: ReferralState, now: datetime
    ) -> bool:
        values: dict[str, Any] = {"state": to.value, "update_time": now}
        if to is ReferralState.QUALIFIED:
            values["qualify_time"] = now
        elif to is ReferralState.REWARDED:
            values["reward_time"] = now
        result = await self._conn.execute(
            update(STATES)
            .where(STATES.c.referee_id == referee_id, STATES.c.state.in_([s.value for s in from_states]))
            .values(**values)
        )
        return bool(result.rowcount)

    async def record_signals(self, referee_id: int, signals: Sequence[str], now: datetime) -> None:
        values: dict[str, Any] = {"signals": " ".join(sorted(set(signals)))[:256], "update_time": now}
        if signals:
            values["review"] = func.coalesce(STATES.c.review, ReviewState.HELD.value)
        await self._conn.execute(update(STATES).where(STATES.c.referee_id == referee_id).values(**values))

    async def referred_between(self, referrer_id: int, start: datetime, end: datetime) -> int:
        statement = select(func.count()).where(
            USERS.c.referrer_id == referrer_id, USERS.c.create_time >= start, USERS.c.create_time <= end
        )
        return int((await self._conn.execute(statement)).scalar_one())

    async def review_referral(self, referee_id: int, verdict: str, note: str, now: datetime) -> bool:
        result = await self._conn.execute(
            update(STATES)
            .where(STATES.c.referee_id == referee_id, STATES.c.review == ReviewState.HELD.value)
            .values(review=verdict, review_note=note or None, review_time=now, update_time=now)
        )
        return bool(result.rowcount)

    async def held_page(self, after_id: int, limit: int) -> list[ReferralStatus]:
        result = await self._conn.execute(
            select(*_STATE_COLUMNS)
            .where(STATES.c.review == ReviewState.HELD.value, STATES.c.referee_id > after_id)
            .order_by(STATES.c.referee_id)
            .limit(limit)
        )
        return [_status(row) for row in result]

    # --- the ledger ------------------------------------------------------------------------------

    async def add_entries(self, entries: Sequence[NewRewardEntry], now: datetime) -> list[int]:
        ids = []
        for entry in entries:
            result = await write(
                self._conn,
                _INSERT_ENTRY,
                {
                    "kind": entry.kind,
                    "user_id": entry.user_id,
                    "referee_id": entry.referee_id,
                    "role": entry.role.value,
                    "amount": entry.amount,
                    "unit": entry.unit,
                    "rule": entry.rule,
                    "conversion_id": entry.conversion_id,
                    "corrects_id": entry.corrects_id,
                    "create_time": now,
                    "available_time": entry.available_time,
                },
            )
            ids.append(result.scalar_one())
        return ids

    async def rewards_of_conversion(self, conversion_id: int) -> list[Reward]:
        result = await self._conn.execute(
            _REWARDS.where(ENTRIES.c.conversion_id == conversion_id).order_by(ENTRIES.c.id)
        )
        return [_reward(row) for row in result]

    async def rewards_page(self, user_id: int, after_id: int, limit: int) -> list[Reward]:
        statement = _REWARDS.where(ENTRIES.c.user_id == user_id)
        if after_id:
            statement = statement.where(ENTRIES.c.id < after_id)
        result = await self._conn.execute(statement.order_by(ENTRIES.c.id.desc()).limit(limit))
        return [_reward(row) for row in result]

    async def rewards_of(self, user_id: int) -> list[Reward]:
        result = await self._conn.execute(_REWARDS.where(ENTRIES.c.user_id == user_id).order_by(ENTRIES.c.id))
        return [_reward(row) for row in result]

    # --- counters --------------------------------------------------------------------------------

    async def bump(
        self, referrer_id: int, period: str, name: str, delta: int, cap: int | None = None
    ) -> bool:
        """One upsert: insert the counter at ``delta`` or add ``delta`` to it, the addition only
        while the result stays within ``cap`` (the row is locked and the condition read on its
        latest version, so concurrent bumps cannot pass the cap)."""
        if cap is not None and delta > cap:
            return False
        module = postgresql if self._dialect == "postgresql" else sqlite
        statement = module.insert(COUNTERS).values(
            referrer_id=referrer_id, period=period, name=name, value=delta
        )
        total = COUNTERS.c.value + statement.excluded.value
        upsert = statement.on_conflict_do_update(
            index_elements=[COUNTERS.c.referrer_id, COUNTERS.c.period, COUNTERS.c.name],
            set_={"value": total},
            where=(total <= cap) if cap is not None else None,
        )
        result = await self._conn.execute(upsert)
        return bool(result.rowcount)

    async def counters(self, referrer_id: int, period: str) -> dict[str, int]:
        result = await self._conn.execute(
            select(COUNTERS.c.name, COUNTERS.c.value).where(
                COUNTERS.c.referrer_id == referrer_id, COUNTERS.c.period == period
            )
        )
        return {name: int(value) for name, value in result}

    async def top(
        self, period: str, name: str, after: tuple[int, int] | None, limit: int
    ) -> list[tuple[int, int]]:
        statement = select(COUNTERS.c.referrer_id, COUNTERS.c.value).where(
            COUNTERS.c.period == period, COUNTERS.c.name == name, COUNTERS.c.value > 0
        )
        if after is not None:
            value, referrer_id = after
            statement = statement.where(
                or_(
                    COUNTERS.c.value < value,
                    and_(COUNTERS.c.value == value, COUNTERS.c.referrer_id > referrer_id),
                )
            )
        result = await self._conn.execute(
            statement.order_by(COUNTERS.c.value.desc(), COUNTERS.c.referrer_id).limit(limit)
        )
        return [(int(referrer_id), int(value)) for referrer_id, value in result]
