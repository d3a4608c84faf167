"""The referral programme (issue 17): conversions reported by services qualify referrals, the
programme's rules grant rewards to both sides on an append-only ledger, held for a while, and
refunds cancel or claw them back.

A referral is qualified when its referee is verified (``users.is_verified``) and has made the
programme's number of unreversed qualifying conversions. A conversion recorded while the
referee is unverified is kept; ``referee_verified`` evaluates the referral again once they are.
A referral on fraud hold (``review`` = held) may qualify but is rewarded only when a reviewer
approves it. Rewards are HELD until ``available_time`` and AVAILABLE after it, computed when
read: nothing has to run when a hold ends.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from referral_service.domain import events, idempotency
from referral_service.domain import validation as v
from referral_service.domain.clock import utcnow
from referral_service.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    check,
)
from referral_service.domain.models import (
    CANCEL,
    CLAWBACK,
    GRANT,
    Balance,
    Conversion,
    Money,
    ReferralState,
    ReferralStatus,
    ReviewState,
    Reward,
    RewardRole,
    RewardState,
    User,
)
from referral_service.domain.ports import (
    CONVERSION_TAKEN,
    Conflict,
    NewConversion,
    NewRewardEntry,
    Store,
    UnitOfWork,
)
from referral_service.domain.service_accounts import REFERRALS_REVIEW, REWARDS_READ

log = logging.getLogger("referral_service.rewards")

_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_UNIT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,15}")
#: A caller's event id: safe in a URL path segment (ReverseConversion's HTTP binding).
_EVENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_EVENT_ID_RULE = "must be 1 to 128 of A-Z a-z 0-9 . _ @ -, starting with a letter or digit"
_CURRENCY = re.compile(r"[A-Z]{3}")
#: How far in the future a conversion's occur_time may lie (clock skew between services).
_FUTURE_SKEW = timedelta(minutes=5)
#: Counter names (per referrer, per period ``all`` or ``YYYY-MM``).
GRANTS = "referrer_grants"  # referrer rewards granted, never decremented: what caps count
REWARDED = "rewarded"  # referrals rewarded and not reversed: the leaderboard
QUALIFIED = "qualified"  # referrals qualified and waiting (for a review)
REJECTED = "rejected"
HELD = "held"  # referrals held for review
#: Rewards per unit, of the user they were granted to: ``grant:USD``, ``cancel:USD``,
#: ``clawback:USD`` (amounts in minor units).
ALL_TIME = "all"


def month_of(moment: datetime) -> str:
    return f"{moment.year:04d}-{moment.month:02d}"


# --- the rules -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RewardRule:
    amount: int
    unit: str


@dataclass(frozen=True, slots=True)
class Program:
    """One referral programme, read from the rules file at start-up."""

    id: str
    qualifying_kinds: tuple[str, ...]
    required_conversions: int
    referrer_reward: RewardRule | None
    referee_reward: RewardRule | None
    hold: timedelta
    referrer_monthly_cap: int | None = None
    referrer_lifetime_cap: int | None = None
    #: More referrals than this on one referrer's codes within an hour flags them (velocity).
    velocity_per_hour: int = 10

    def rule(self, role: RewardRole) -> str:
        """The id recorded on every ledger entry the rule produces."""
        return f"{self.id}/{role.value}"


#: No rules file: conversions are recorded, nothing qualifies.
NO_PROGRAM = Program(
    id="none",
    qualifying_kinds=(),
    required_conversions=1,
    referrer_reward=None,
    referee_reward=None,
    hold=timedelta(),
)


class RulesError(ValueError):
    """The rules file is invalid; the message says where and why."""


def parse_rules(text: str, source: str = "rules file") -> Program:
    """The programme from the TOML text of a rules file (see docs/rewards.md); RulesError with
    every problem found, each naming its key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RulesError(f"{source}: not valid TOML: {error}") from None
    problems: list[str] = []
    allowed = {
        "id",
        "qualifying_kinds",
        "required_conversions",
        "hold_seconds",
        "referrer_reward",
        "referee_reward",
        "referrer_monthly_cap",
        "referrer_lifetime_cap",
        "velocity_per_hour",
    }
    program = data.get("program")
    if not isinstance(program, dict) or set(data) != {"program"}:
        raise RulesError(f"{source}: expected exactly one [program] table")
    problems += [f"program.{key}: unknown key" for key in sorted(set(program) - allowed)]

    def integer(key: str, default: int | None, low: int, high: int) -> int | None:
        value = program.get(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            problems.append(f"program.{key}: must be an integer from {low} to {high}")
            return default
        return value

    program_id = program.get("id")
    if not isinstance(program_id, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,47}", program_id):
        problems.append("program.id: required, 1 to 48 of a-z 0-9 _ . - (recorded on every ledger entry)")
        program_id = "invalid"
    kinds = program.get("qualifying_kinds")
    if (
        not isinstance(kinds, list)
        or not kinds
        or not all(isinstance(kind, str) and _KIND.fullmatch(kind) for kind in kinds)
    ):
        problems.append(
            "program.qualifying_kinds: required, a non-empty list of conversion kinds ([a-z][a-z0-9_.-]*)"
        )
        kinds = []
    required = integer("required_conversions", 1, 1, 1000)
    hold = integer("hold_seconds", 0, 0, 366 * 86400)

    def reward(key: str) -> RewardRule | None:
        value = program.get(key)
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) - {"amount", "unit"}:
            problems.append(f"program.{key}: must be a table with amount and unit")
            return None
        amount, unit = value.get("amount"), value.get("unit")
        if not isinstance(amount, int) or isinstance(amount, bool) or not 1 <= amount <= 10**12:
            problems.append(f"program.{key}.amount: must be an integer from 1 to 10^12 (minor units)")
        if not isinstance(unit, str) or not _UNIT.fullmatch(unit):
            problems.append(f"program.{key}.unit: required, e.g. USD or points (letters, digits, _)")
        return RewardRule(amount, unit) if isinstance(amount, int) and isinstance(unit, str) else None

    referrer, referee = reward("referrer_reward"), reward("referee_reward")
    if "referrer_reward" not in program and "referee_reward" not in program:
        problems.append("program: at least one of referrer_reward and referee_reward is required")
    monthly = integer("referrer_monthly_cap", None, 0, 10**9)
    lifetime = integer("referrer_lifetime_cap", None, 0, 10**9)
    velocity = integer("velocity_per_hour", 10, 1, 10**6)
    if problems:
        raise RulesError(f"{source}: " + "; ".join(problems))
    assert required is not None
    assert hold is not None
    return Program(
        id=program_id,
        qualifying_kinds=tuple(kinds),
        required_conversions=required,
        referrer_reward=referrer,
        referee_reward=referee,
        hold=timedelta(seconds=hold),
        referrer_monthly_cap=monthly,
        referrer_lifetime_cap=lifetime,
        velocity_per_hour=velocity or 10,
    )


# --- fraud signals -----------------------------------------------------------------------------

#: The referee's mailbox is the referrer's under another alias (``canonical_mailbox``).
#: Registration refuses those outright today (SELF_REFERRAL); the signal guards the rest.
SIGNAL_SELF_REFERRAL = "self_referral_alias"
#: The referee used a client address one of the referrer's sessions used.
SIGNAL_SHARED_ADDRESS = "shared_client_address"
#: Many referrals on the referrer's codes within an hour.
SIGNAL_VELOCITY = "velocity"
#: The referee's address belongs to a disposable email service.
SIGNAL_DISPOSABLE = "disposable_domain"


def _telling(address: str) -> bool:
    """Whether a client address tells clients apart: not unknown, not loopback (a local
    client, or a proxy that forwards no address)."""
    try:
        return bool(address) and not ipaddress.ip_address(address).is_loopback
    except ValueError:
        return bool(address)


# --- commands and results ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordConversionCommand:
    source: int
    user_id: int
    event_id: str
    kind: str
    occur_time: datetime | None = None
    value: Money | None = None


@dataclass(frozen=True, slots=True)
class ConversionResult:
    conversion: Conversion
    #: The referral the conversion counted for; None when the user was not referred.
    referral: ReferralStatus | None
    #: The rewards the conversion caused (with their states at the time of the read).
    rewards: list[Reward]


@dataclass(frozen=True, slots=True)
class RewardTotals:
    """Amounts of one unit granted to a user, and of those, canceled and clawed back."""

    unit: str
    granted: int
    canceled: int
    clawed_back: int


@dataclass(frozen=True, slots=True)
class ReferralStats:
    referrer_id: int
    pending: int
    qualified: int
    rewarded: int
    rejected: int
    held_for_review: int
    rewards: list[RewardTotals]


@dataclass(frozen=True, slots=True)
class TopReferrer:
    rank: int
    referrer_id: int
    rewarded_referrals: int


class Period(StrEnum):
    ALL_TIME = "all_time"
    CURRENT_MONTH = "current_month"
    PREVIOUS_MONTH = "previous_month"


@dataclass(frozen=True, slots=True)
class RewardPage:
    rewards: list[Reward]
    next_page_token: str


def _pending(user: User, now: datetime) -> ReferralStatus | None:
    if user.referrer_id is None:
        return None
    return ReferralStatus(
        referee_id=user.id,
        referrer_id=user.referrer_id,
        state=ReferralState.PENDING,
        review=None,
        signals=(),
        review_note="",
        create_time=user.create_time,
        update_time=user.create_time,
    )


class _Tally:
    """Counter changes of one transaction, applied together at its end in one order: the
    referrer's counter rows are hot (every conversion of their referrals updates them), so they
    are locked as late, and always in the same order, as possible."""

    def __init__(self) -> None:
        self._deltas: dict[tuple[int, str, str], int] = {}

    def add(self, owner_id: int, period: str, name: str, delta: int) -> None:
        key = (owner_id, period, name)
        self._deltas[key] = self._deltas.get(key, 0) + delta

    async def flush(self, uow: UnitOfWork) -> None:
        for (owner_id, period, name), delta in sorted(self._deltas.items()):
            if delta:
                await uow.rewards.bump(owner_id, period, name, delta)
        self._deltas.clear()


class RewardService:
    def __init__(
        self,
        store: Store,
        program: Program,
        *,
        page_secret: bytes,
        default_page_size: int = 50,
        max_page_size: int = 1000,
        clock: Callable[[], datetime] = utcnow,
        disposable: Callable[[str], bool] | None = None,
    ) -> None:
        self._store = store
        self._disposable = disposable
        self.program = program
        #: The service's clock (tests replace it to move past a hold).
        self.clock = clock
        self._page_key = hmac.new(page_secret, b"referral-service reward pages", hashlib.sha256).digest()
        self._default_page = default_page_size
        self._max_page = max_page_size

    # --- conversions -----------------------------------------------------------------------------

    def _validate(self, cmd: RecordConversionCommand, now: datetime) -> None:
        violations: list[FieldViolation] = []
        if cmd.user_id <= 0:
            violations.append(FieldViolation("user_id", "must be a positive user id", "INVALID"))
        if not cmd.event_id:
            violations.append(FieldViolation("event_id", "is required", "REQUIRED"))
        elif not _EVENT_ID.fullmatch(cmd.event_id):
            violations.append(FieldViolation("event_id", _EVENT_ID_RULE, "INVALID"))
        if not cmd.kind:
            violations.append(FieldViolation("kind", "is required", "REQUIRED"))
        elif not _KIND.fullmatch(cmd.kind):
            violations.append(
                FieldViolation("kind", "must be 1 to 32 of a-z 0-9 _ . -, starting with a letter", "INVALID")
            )
        if cmd.occur_time is not None and cmd.occur_time - now > _FUTURE_SKEW:
            violations.append(FieldViolation("occur_time", "must not lie in the future", "IN_FUTURE"))
        value = cmd.value
        if value is not None:
            if not _CURRENCY.fullmatch(value.currency):
                violations.append(
                    FieldViolation("value.currency_code", "must be a 3-letter ISO 4217 code (USD)", "INVALID")
                )
            if value.units < 0 or value.nanos < 0 or value.nanos > 999_999_999:
                violations.append(
                    FieldViolation(
                        "value", "must not be negative (report refunds with ReverseConversion)", "NEGATIVE"
                    )
                )
        check(violations)

    @staticmethod
    def _fingerprint(cmd: RecordConversionCommand, occur_time: datetime) -> str:
        value = cmd.value
        return idempotency.fingerprint(
            str(cmd.user_id),
            cmd.kind,
            f"{value.currency}:{value.units}:{value.nanos}" if value else "",
            occur_time.isoformat() if cmd.occur_time is not None else "",
        )

    async def record_conversion(self, cmd: RecordConversionCommand) -> ConversionResult:
        """Record a conversion once per (source, event_id): a retry, or the same event sent
        concurrently, returns the first call's result and grants nothing twice."""
        now = self.clock()
        self._validate(cmd, now)
        occur_time = cmd.occur_time or now
        fingerprint = self._fingerprint(cmd, occur_time)
        earlier = await self._replay(cmd.source, cmd.event_id, fingerprint)
        if earlier is not None:
            return earlier
        try:
            conversion_id = await self._store.transact(
                functools.partial(
                    self._record, cmd=cmd, occur_time=occur_time, fingerprint=fingerprint, now=now
                )
            )
        except Conflict as conflict:
            if conflict.constraint != CONVERSION_TAKEN:
                raise
            earlier = await self._replay(cmd.source, cmd.event_id, fingerprint)
            assert earlier is not None
            return earlier
        log.info("conversion recorded", extra={"user_id": cmd.user_id})
        result = await self._result(cmd.source, cmd.event_id)
        assert result is not None
        assert result.conversion.id == conversion_id
        return result

    async def _record(
        self,
        uow: UnitOfWork,
        cmd: RecordConversionCommand,
        occur_time: datetime,
        fingerprint: str,
        now: datetime,
    ) -> int:
        user = await uow.users.get(cmd.user_id)
        if user is None:
            raise NotFound(Reason.USER_NOT_FOUND, "no user with this id")
        conversion = await uow.rewards.add_conversion(
            NewConversion(
                source=cmd.source,
                event_id=cmd.event_id,
                fingerprint=fingerprint,
                user_id=cmd.user_id,
                kind=cmd.kind,
                occur_time=occur_time,
                value=cmd.value,
            ),
            now,
        )
        await uow.events.append(
            events.conversion_recorded(cmd.user_id, cmd.event_id, cmd.kind, occur_time), now
        )
        await self._evaluate(uow, user, now)
        return conversion.id

    async def _replay(self, source: int, event_id: str, fingerprint: str) -> ConversionResult | None:
        result = await self._result(source, event_id)
        if result is not None and result.conversion.fingerprint != fingerprint:
            raise AlreadyExists(
                Reason.CONVERSION_EVENT_CONFLICT,
                "this event_id was already recorded with a different conversion",
                violations=[FieldViolation("event_id", "was recorded with other values", "CONFLICT")],
            )
        return result

    async def _result(self, source: int, event_id: str) -> ConversionResult | None:
        async with self._store.read() as uow:
            conversion = await uow.rewards.conversion(source, event_id)
            if conversion is None:
                return None
            user = await uow.users.get(conversion.user_id)
            status = await uow.rewards.referral(conversion.user_id)
            rewards = await uow.rewards.rewards_of_conversion(conversion.id)
        referral = (
            status if status is not None else (_pending(user, conversion.create_time) if user else None)
        )
        return ConversionResult(conversion, referral, rewards)

    async def reverse_conversion(self, source: int, event_id: str) -> ConversionResult:
        """A refund: the rewards the conversion caused are canceled while held and clawed back
        once available; the referral goes back to PENDING (a later conversion may qualify it
        again). Idempotent: reversing again changes nothing and returns the same."""
        if not event_id:
            raise InvalidArgument.fields(FieldViolation("event_id", "is required", "REQUIRED"))
        if not _EVENT_ID.fullmatch(event_id):
            raise InvalidArgument.fields(FieldViolation("event_id", _EVENT_ID_RULE, "INVALID"))
        now = self.clock()

        async def work(uow: UnitOfWork) -> bool:
            conversion = await uow.rewards.conversion(source, event_id)
            if conversion is None:
                raise NotFound(
                    Reason.CONVERSION_NOT_FOUND, "no conversion with this event_id was recorded by you"
                )
            # The referral's lock first: the same order as RecordConversion takes.
            user = await uow.users.get(conversion.user_id)
            if user is not None and user.referrer_id is not None:
                await uow.rewards.ensure_referral(user.id, user.referrer_id, now)
                await uow.rewards.referral(user.id, lock=True)
            if not await uow.rewards.reverse_conversion(conversion.id, now):
                return False
            await uow.events.append(events.conversion_reversed(conversion.user_id, event_id), now)
            rewards = [
                r for r in await uow.rewards.rewards_of_conversion(conversion.id) if r.correction is None
            ]
            await uow.rewards.add_entries(
                [
                    NewRewardEntry(
                        kind=CANCEL if reward.state(now) is RewardState.HELD else CLAWBACK,
                        user_id=reward.user_id,
                        referee_id=reward.referee_id,
                        role=reward.role,
                        amount=-reward.amount,
                        unit=reward.unit,
                        rule=reward.rule,
                        conversion_id=conversion.id,
                        corrects_id=reward.id,
                    )
                    for reward in rewards
                ],
                now,
            )
            for reward in rewards:
                kind = CANCEL if reward.state(now) is RewardState.HELD else CLAWBACK
                await uow.rewards.bump(reward.user_id, ALL_TIME, f"{kind}:{reward.unit}", reward.amount)
                await uow.events.append(
                    events.reward_corrected(
                        kind == CLAWBACK, reward.id, reward.user_id, -reward.amount, reward.unit
                    ),
                    now,
                )
            referrer_id = user.referrer_id if user is not None else None
            if (
                rewards
                and user is not None
                and referrer_id is not None
                and await uow.rewards.move_referral(
                    user.id, [ReferralState.REWARDED], ReferralState.PENDING, now
                )
            ):
                granted = min(reward.create_time for reward in rewards)
                await uow.rewards.bump(referrer_id, ALL_TIME, REWARDED, -1)
                await uow.rewards.bump(referrer_id, month_of(granted), REWARDED, -1)
            return True

        reversed_now = await self._store.transact(work)
        if reversed_now:
            log.info("conversion reversed", extra={"event_id": event_id})
        result = await self._result(source, event_id)
        assert result is not None
        return result

    # --- qualification ---------------------------------------------------------------------------

    async def referee_verified(self, uow: UnitOfWork, user_id: int, now: datetime) -> list[Reward]:
        """Evaluate the user's referral again in ``uow`` (call it in the transaction that marks
        the user verified): conversions recorded while unverified may qualify it now. The
        rewards granted (none when nothing changed)."""
        user = await uow.users.get(user_id)
        if user is None:
            return []
        return await self._evaluate(uow, user, now)

    async def _evaluate(self, uow: UnitOfWork, user: User, now: datetime) -> list[Reward]:
        """Qualify and reward the user's referral if the programme's rules say so, in ``uow``."""
        tally = _Tally()
        granted = await self._qualify(uow, user, now, tally)
        await tally.flush(uow)
        return granted

    async def _qualify(self, uow: UnitOfWork, user: User, now: datetime, tally: _Tally) -> list[Reward]:
        referrer_id = user.referrer_id
        if referrer_id is None:
            return []
        await uow.rewards.ensure_referral(user.id, referrer_id, now)
        status = await uow.rewards.referral(user.id, lock=True)
        assert status is not None
        if not status.screened:
            status = await self.screen(uow, user, now, tally)
        if status.state in (ReferralState.REWARDED, ReferralState.REJECTED) or not user.is_verified:
            return []
        program = self.program
        if not program.qualifying_kinds:
            return []
        count, latest = await uow.rewards.qualifying(user.id, program.qualifying_kinds)
        if count < program.required_conversions:
            return []
        if status.state is ReferralState.PENDING and await uow.rewards.move_referral(
            user.id, [ReferralState.PENDING], ReferralState.QUALIFIED, now
        ):
            tally.add(referrer_id, ALL_TIME, QUALIFIED, 1)
            await uow.events.append(events.referral_qualified(user.id, referrer_id), now)
        if status.review is not None and status.review is not ReviewState.APPROVED:
            return []  # held for review (or rejected): rewards wait for the reviewer
        return await self._grant(uow, user.id, referrer_id, latest, now, tally)

    async def screen(
        self, uow: UnitOfWork, referee: User, now: datetime, tally: _Tally | None = None
    ) -> ReferralStatus:
        """Record the fraud signals of the referee's referral (making its state row), holding it
        for review when there are any. Runs at the referral's first evaluation; registration may
        call it too (then the client address of the registration counts)."""
        referrer_id = referee.referrer_id
        assert referrer_id is not None
        await uow.rewards.ensure_referral(referee.id, referrer_id, now)
        signals = await self._signals(uow, referee, referrer_id, now)
        before = await uow.rewards.referral(referee.id)
        await uow.rewards.record_signals(referee.id, signals, now)
        if signals and before is not None and before.review is None:
            if tally is not None:
                tally.add(referrer_id, ALL_TIME, HELD, 1)
            else:
                await uow.rewards.bump(referrer_id, ALL_TIME, HELD, 1)
        if signals:
            log.warning("referral held for review", extra={"user_id": referee.id, "signals": signals})
        status = await uow.rewards.referral(referee.id)
        assert status is not None
        return status

    async def _signals(self, uow: UnitOfWork, referee: User, referrer_id: int, now: datetime) -> list[str]:
        signals: list[str] = []
        referrer = await uow.users.get(referrer_id)
        if referrer is not None and v.canonical_mailbox(referrer.email_key) == v.canonical_mailbox(
            referee.email_key
        ):
            signals.append(SIGNAL_SELF_REFERRAL)
        if referrer is not None:
            theirs = {
                s.client_address
                for s in await uow.sessions.live(referrer_id, now)
                if _telling(s.client_address)
            }
            mine = {
                s.client_address
                for s in await uow.sessions.live(referee.id, now)
                if _telling(s.client_address)
            }
            if theirs & mine:
                signals.append(SIGNAL_SHARED_ADDRESS)
        joined = referee.create_time
        around = await uow.rewards.referred_between(referrer_id, joined - timedelta(hours=1), joined)
        if around > self.program.velocity_per_hour:
            signals.append(SIGNAL_VELOCITY)
        domain = referee.email.rpartition("@")[2].lower()
        if self._disposable is not None and self._disposable(domain):
            signals.append(SIGNAL_DISPOSABLE)
        return signals

    async def _grant(
        self,
        uow: UnitOfWork,
        referee_id: int,
        referrer_id: int,
        conversion_id: int | None,
        now: datetime,
        tally: _Tally,
    ) -> list[Reward]:
        if not await uow.rewards.move_referral(
            referee_id, [ReferralState.QUALIFIED], ReferralState.REWARDED, now
        ):
            return []
        program = self.program
        available = now + program.hold
        entries: list[NewRewardEntry] = []
        if program.referee_reward is not None:
            entries.append(
                self._entry(
                    program.referee_reward,
                    RewardRole.REFEREE,
                    referee_id,
                    referee_id,
                    conversion_id,
                    available,
                )
            )
        if program.referrer_reward is not None and await self._within_caps(uow, referrer_id, now):
            entries.append(
                self._entry(
                    program.referrer_reward,
                    RewardRole.REFERRER,
                    referrer_id,
                    referee_id,
                    conversion_id,
                    available,
                )
            )
        await uow.rewards.add_entries(entries, now)
        for entry in entries:
            tally.add(entry.user_id, ALL_TIME, f"{GRANT}:{entry.unit}", entry.amount)
            await uow.events.append(
                events.reward_held(
                    entry.user_id,
                    entry.referee_id,
                    entry.role.value,
                    entry.amount,
                    entry.unit,
                    available,
                    entry.rule,
                ),
                now,
            )
        tally.add(referrer_id, ALL_TIME, QUALIFIED, -1)
        tally.add(referrer_id, ALL_TIME, REWARDED, 1)
        tally.add(referrer_id, month_of(now), REWARDED, 1)
        log.info("referral rewarded", extra={"user_id": referee_id})
        return await uow.rewards.rewards_of_conversion(conversion_id) if conversion_id else []

    def _entry(
        self,
        rule: Any,
        role: RewardRole,
        user_id: int,
        referee_id: int,
        conversion_id: int | None,
        available: datetime,
    ) -> NewRewardEntry:
        return NewRewardEntry(
            kind=GRANT,
            user_id=user_id,
            referee_id=referee_id,
            role=role,
            amount=rule.amount,
            unit=rule.unit,
            rule=self.program.rule(role),
            conversion_id=conversion_id,
            available_time=available,
        )

    async def _within_caps(self, uow: UnitOfWork, referrer_id: int, now: datetime) -> bool:
        """Count one referrer reward against the caps (month, lifetime); False, counting
        nothing, when either is reached. Conditional increments: caps hold under concurrency."""
        program = self.program
        month = month_of(now)
        if not await uow.rewards.bump(referrer_id, month, GRANTS, 1, program.referrer_monthly_cap):
            return False
        if not await uow.rewards.bump(referrer_id, ALL_TIME, GRANTS, 1, program.referrer_lifetime_cap):
            await uow.rewards.bump(referrer_id, month, GRANTS, -1)
            return False
        return True

    # --- review ----------------------------------------------------------------------------------

    async def _may_review(self, caller_id: int, scopes: frozenset[str]) -> None:
        if REFERRALS_REVIEW in scopes:
            return
        async with self._store.read() as uow:
            caller = await uow.users.get(caller_id) if caller_id else None
        if caller is None or not caller.is_superuser:
            raise PermissionDenied(
                Reason.PERMISSION_DENIED,
                "only superusers and services with referrals:review review referrals",
            )

    async def held_for_review(
        self, caller_id: int, page_size: int, page_token: str, *, caller_scopes: frozenset[str] = frozenset()
    ) -> tuple[list[ReferralStatus], str]:
        """Referrals held for review, oldest referee first, and the next page token."""
        violations: list[FieldViolation] = []
        if page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative", "NEGATIVE"))
        if len(page_token) > 512:
            violations.append(FieldViolation("page_token", "is too long", "TOO_LONG"))
        check(violations)
        await self._may_review(caller_id, caller_scopes)
        after_id = self._read_page_token(page_token, 0) if page_token else 0
        size = min(page_size or self._default_page, self._max_page)
        async with self._store.read() as uow:
            rows = await uow.rewards.held_page(after_id, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return rows, self._page_token(0, rows[-1].referee_id) if more and rows else ""

    async def review(
        self,
        caller_id: int,
        referee_id: int,
        approve: bool,
        note: str,
        *,
        caller_scopes: frozenset[str] = frozenset(),
    ) -> ReferralStatus:
        """Approve (the referral is rewarded if it qualified, or when it does) or reject (it
        earns nothing) a referral held for review."""
        violations: list[FieldViolation] = []
        if referee_id <= 0:
            violations.append(FieldViolation("user_id", "must be a positive user id", "INVALID"))
        if len(note) > 500:
            violations.append(FieldViolation("note", "must be at most 500 characters", "TOO_LONG"))
        check(violations)
        await self._may_review(caller_id, caller_scopes)
        now = self.clock()

        async def work(uow: UnitOfWork) -> ReferralStatus:
            user = await uow.users.get(referee_id)
            if user is None or user.referrer_id is None:
                raise NotFound(Reason.REFERRAL_NOT_FOUND, "this user was not referred")
            status = await uow.rewards.referral(referee_id, lock=True)
            verdict = ReviewState.APPROVED if approve else ReviewState.REJECTED
            if status is None or not await uow.rewards.review_referral(referee_id, verdict.value, note, now):
                raise FailedPrecondition(Reason.REFERRAL_NOT_HELD, "this referral is not held for review")
            referrer_id = user.referrer_id
            await uow.rewards.bump(referrer_id, ALL_TIME, HELD, -1)
            if approve:
                await self._evaluate(uow, user, now)
            elif await uow.rewards.move_referral(
                referee_id, [ReferralState.PENDING, ReferralState.QUALIFIED], ReferralState.REJECTED, now
            ):
                await uow.rewards.bump(referrer_id, ALL_TIME, REJECTED, 1)
                await uow.events.append(events.referral_rejected(referee_id, referrer_id), now)
                if status.state is ReferralState.QUALIFIED:
                    await uow.rewards.bump(referrer_id, ALL_TIME, QUALIFIED, -1)
            reviewed = await uow.rewards.referral(referee_id)
            assert reviewed is not None
            return reviewed

        status = await self._store.transact(work)
        log.info("referral reviewed", extra={"user_id": referee_id, "approved": approve})
        return status

    # --- stats and the leaderboard (maintained counters) ------------------------------------------

    async def stats(
        self, caller_id: int, referrer_id: int, *, caller_scopes: frozenset[str] = frozenset()
    ) -> ReferralStats:
        """The referrer's referrals per state and rewards per unit, from the counters kept with
        every change (PENDING is the referral count less the others)."""
        if referrer_id <= 0:
            raise InvalidArgument.fields(
                FieldViolation("referrer_id", "must be a positive user id", "INVALID")
            )
        await self._may_read(caller_id, referrer_id, caller_scopes)
        async with self._store.read() as uow:
            total = await uow.referrals.count(referrer_id)
            if total is None:
                raise NotFound(Reason.USER_NOT_FOUND, "no user with this id")
            counters = await uow.rewards.counters(referrer_id, ALL_TIME)
        qualified, rewarded, rejected = (counters.get(name, 0) for name in (QUALIFIED, REWARDED, REJECTED))
        units = sorted({name.partition(":")[2] for name in counters if name.startswith(f"{GRANT}:")})
        return ReferralStats(
            referrer_id=referrer_id,
            pending=total - qualified - rewarded - rejected,
            qualified=qualified,
            rewarded=rewarded,
            rejected=rejected,
            held_for_review=counters.get(HELD, 0),
            rewards=[
                RewardTotals(
                    unit=unit,
                    granted=counters.get(f"{GRANT}:{unit}", 0),
                    canceled=counters.get(f"{CANCEL}:{unit}", 0),
                    clawed_back=counters.get(f"{CLAWBACK}:{unit}", 0),
                )
                for unit in units
            ],
        )

    async def top_referrers(
        self, period: Period, page_size: int, page_token: str
    ) -> tuple[list[TopReferrer], str]:
        """Referrers by rewarded referrals (not reversed) in the period, most first (ties by
        user id), and the next page token."""
        violations: list[FieldViolation] = []
        if page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative", "NEGATIVE"))
        if len(page_token) > 512:
            violations.append(FieldViolation("page_token", "is too long", "TOO_LONG"))
        check(violations)
        now = self.clock()
        key = {
            Period.ALL_TIME: ALL_TIME,
            Period.CURRENT_MONTH: month_of(now),
            Period.PREVIOUS_MONTH: _previous_month(now),
        }[period]
        after: tuple[int, int] | None = None
        rank = 0
        if page_token:
            parts = self._read_token(page_token)
            if (
                len(parts) != 5
                or parts[0] != "t1"
                or parts[1] != key
                or not all(isinstance(p, int) for p in parts[2:])
            ):
                raise self._bad_token()
            after, rank = (parts[2], parts[3]), parts[4]
        size = min(page_size or self._default_page, self._max_page)
        async with self._store.read() as uow:
            rows = await uow.rewards.top(key, REWARDED, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        board = [TopReferrer(rank + i + 1, referrer_id, value) for i, (referrer_id, value) in enumerate(rows)]
        token = ""
        if more and board:
            last = board[-1]
            token = self._token(["t1", key, last.rewarded_referrals, last.referrer_id, last.rank])
        return board, token

    # --- reads -----------------------------------------------------------------------------------

    async def _may_read(self, caller_id: int, user_id: int, scopes: frozenset[str]) -> None:
        if caller_id == user_id or REWARDS_READ in scopes:
            return
        async with self._store.read() as uow:
            caller = await uow.users.get(caller_id) if caller_id else None
        if caller is None or not caller.is_superuser:
            raise PermissionDenied(Reason.PERMISSION_DENIED, "you may only read your own rewards")

    async def _user_exists(self, uow: UnitOfWork, user_id: int) -> None:
        if await uow.users.get(user_id) is None:
            raise NotFound(Reason.USER_NOT_FOUND, "no user with this id")

    def _token(self, parts: list[Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(parts).encode()).rstrip(b"=")
        mac = base64.urlsafe_b64encode(hmac.new(self._page_key, body, hashlib.sha256).digest()[:12])
        return (body + b"." + mac).decode()

    @staticmethod
    def _bad_token() -> InvalidArgument:
        return InvalidArgument(
            Reason.INVALID_PAGE_TOKEN,
            "page_token is invalid",
            violations=[
                FieldViolation("page_token", "is not a token this server issued for this request", "INVALID")
            ],
        )

    def _read_token(self, token: str) -> list[Any]:
        try:
            body, _, mac = token.encode("ascii").partition(b".")
            expected = base64.urlsafe_b64encode(hmac.new(self._page_key, body, hashlib.sha256).digest()[:12])
            if not hmac.compare_digest(mac, expected):
                raise self._bad_token()
            parts = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
        except (ValueError, UnicodeError, TypeError):
            raise self._bad_token() from None
        if not isinstance(parts, list):
            raise self._bad_token()
        return parts

    def _page_token(self, user_id: int, after_id: int) -> str:
        return self._token(["r1", user_id, after_id])

    def _read_page_token(self, token: str, user_id: int) -> int:
        parts = self._read_token(token)
        if len(parts) != 3 or parts[0] != "r1" or parts[1] != user_id or not isinstance(parts[2], int):
            raise self._bad_token()
        return int(parts[2])

    async def list_rewards(
        self,
        caller_id: int,
        user_id: int,
        page_size: int,
        page_token: str,
        *,
        caller_scopes: frozenset[str] = frozenset(),
    ) -> RewardPage:
        """A page of the user's rewards, newest first: for the user, a superuser, or a service
        with ``rewards:read``."""
        violations: list[FieldViolation] = []
        if user_id <= 0:
            violations.append(FieldViolation("user_id", "must be a positive user id", "INVALID"))
        if page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative", "NEGATIVE"))
        if len(page_token) > 512:
            violations.append(FieldViolation("page_token", "is too long", "TOO_LONG"))
        check(violations)
        await self._may_read(caller_id, user_id, caller_scopes)
        after_id = self._read_page_token(page_token, user_id) if page_token else 0
        size = min(page_size or self._default_page, self._max_page)
        async with self._store.read() as uow:
            await self._user_exists(uow, user_id)
            rows = await uow.rewards.rewards_page(user_id, after_id, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return RewardPage(rows, self._page_token(user_id, rows[-1].id) if more and rows else "")

    async def balance(
        self, caller_id: int, user_id: int, *, caller_scopes: frozenset[str] = frozenset()
    ) -> list[Balance]:
        """The user's totals per unit at this moment (held rewards whose hold has ended count as
        available), by unit."""
        if user_id <= 0:
            raise InvalidArgument.fields(FieldViolation("user_id", "must be a positive user id", "INVALID"))
        await self._may_read(caller_id, user_id, caller_scopes)
        async with self._store.read() as uow:
            await self._user_exists(uow, user_id)
            rewards = await uow.rewards.rewards_of(user_id)
        return summarise(rewards, self.clock())


def _previous_month(now: datetime) -> str:
    return month_of(now.replace(day=1) - timedelta(days=1))


def summarise(rewards: Sequence[Reward], now: datetime) -> list[Balance]:
    """Totals per unit and state of these rewards at ``now``, by unit."""
    totals: dict[str, dict[RewardState, int]] = {}
    for reward in rewards:
        by_state = totals.setdefault(reward.unit, {})
        state = reward.state(now)
        by_state[state] = by_state.get(state, 0) + reward.amount
    return [
        Balance(
            unit=unit,
            available=by_state.get(RewardState.AVAILABLE, 0),
            held=by_state.get(RewardState.HELD, 0),
            canceled=by_state.get(RewardState.CANCELED, 0),
            clawed_back=by_state.get(RewardState.CLAWED_BACK, 0),
        )
        for unit, by_state in sorted(totals.items())
    ]
