"""Events for other services: what the outbox records, and how consumers read it.

Use cases append an ``EventDraft`` with ``uow.events.append(draft, now)`` in the transaction of
the change (the drafts are made by the functions below, one per event type), so an event
commits exactly when its change does. Consumers read them by cursor: ``EventService.list``
(one page) and ``EventService.watch`` (the backlog, then live, with progress messages).

One ``EventFeed`` per process follows the store's head: woken at once by a commit in this
process or a notification from another worker (PostgreSQL ``LISTEN``), and polling as a
fallback (the only way on SQLite); it keeps the newest events in a small buffer, so that any
number of live watchers cost one query per change, not one each.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from referral_service.domain.errors import FieldViolation, InvalidArgument, OutOfRange, Reason, check
from referral_service.domain.models import Event, EventDraft, ReferralCode, User
from referral_service.domain.ports import Store
from referral_service.domain.tasks import BackgroundTask

log = logging.getLogger("referral_service.events")

# --- types and payloads ------------------------------------------------------------------------

USER_REGISTERED = "user.registered"
REFERRAL_CREATED = "referral.created"
REFERRAL_CODE_CREATED = "referral_code.created"
REFERRAL_CODE_DELETED = "referral_code.deleted"
WEBHOOK_ENDPOINT_DISABLED = "webhook_endpoint.disabled"
EMAIL_VERIFIED = "user.email_verified"
CONVERSION_RECORDED = "conversion.recorded"
CONVERSION_REVERSED = "conversion.reversed"
REFERRAL_QUALIFIED = "referral.qualified"
REFERRAL_REJECTED = "referral.rejected"
REWARD_HELD = "reward.held"
REWARD_CANCELED = "reward.canceled"
REWARD_CLAWED_BACK = "reward.clawed_back"

#: Every type this server emits (a type filter naming another one is INVALID_ARGUMENT).
#: Adding a type: a payload message in events.proto, its entry in ``api/events.py``, here.
TYPES: frozenset[str] = frozenset(
    {
        USER_REGISTERED,
        REFERRAL_CREATED,
        REFERRAL_CODE_CREATED,
        REFERRAL_CODE_DELETED,
        WEBHOOK_ENDPOINT_DISABLED,
        EMAIL_VERIFIED,
        CONVERSION_RECORDED,
        CONVERSION_REVERSED,
        REFERRAL_QUALIFIED,
        REFERRAL_REJECTED,
        REWARD_HELD,
        REWARD_CANCELED,
        REWARD_CLAWED_BACK,
    }
)


def _time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def user_registered(user: User) -> EventDraft:
    return EventDraft(
        USER_REGISTERED,
        {
            "user_id": user.id,
            "email": user.email,
            "referrer_id": user.referrer_id or 0,
            "is_verified": user.is_verified,
        },
    )


def referral_created(user_id: int, referrer_id: int, code_id: int) -> EventDraft:
    return EventDraft(
        REFERRAL_CREATED, {"user_id": user_id, "referrer_id": referrer_id, "referral_code_id": code_id}
    )


def referral_code_created(code: ReferralCode) -> EventDraft:
    return EventDraft(
        REFERRAL_CODE_CREATED,
        {
            "referral_code_id": code.id,
            "code": code.code,
            "owner_id": code.owner_id,
            "expire_time": _time(code.expire_time),
            "max_uses": code.max_uses,
        },
    )


def referral_code_deleted(code: ReferralCode) -> EventDraft:
    return EventDraft(
        REFERRAL_CODE_DELETED, {"referral_code_id": code.id, "code": code.code, "owner_id": code.owner_id}
    )


def email_verified(user: User) -> EventDraft:
    return EventDraft(EMAIL_VERIFIED, {"user_id": user.id, "email": user.email})


def conversion_recorded(user_id: int, event_id: str, kind: str, occur_time: datetime) -> EventDraft:
    return EventDraft(
        CONVERSION_RECORDED,
        {"user_id": user_id, "event_id": event_id, "kind": kind, "occur_time": _time(occur_time)},
    )


def conversion_reversed(user_id: int, event_id: str) -> EventDraft:
    return EventDraft(CONVERSION_REVERSED, {"user_id": user_id, "event_id": event_id})


def referral_qualified(user_id: int, referrer_id: int) -> EventDraft:
    return EventDraft(REFERRAL_QUALIFIED, {"user_id": user_id, "referrer_id": referrer_id})


def referral_rejected(user_id: int, referrer_id: int) -> EventDraft:
    return EventDraft(REFERRAL_REJECTED, {"user_id": user_id, "referrer_id": referrer_id})


def reward_held(
    user_id: int, referee_id: int, role: str, amount: int, unit: str, available_time: datetime, rule: str
) -> EventDraft:
    return EventDraft(
        REWARD_HELD,
        {
            "user_id": user_id,
            "referee_id": referee_id,
            "role": role,
            "amount": amount,
            "unit": unit,
            "available_time": _time(available_time),
            "rule": rule,
        },
    )


def reward_corrected(clawed_back: bool, reward_id: int, user_id: int, amount: int, unit: str) -> EventDraft:
    return EventDraft(
        REWARD_CLAWED_BACK if clawed_back else REWARD_CANCELED,
        {"reward_id": reward_id, "user_id": user_id, "amount": amount, "unit": unit},
    )


# --- the per-process feed ----------------------------------------------------------------------


class EventFeed(BackgroundTask):
    """Follows the store's newest events for the watchers of this process.

    While someone watches, a task reads the events after the feed's head whenever it is
    nudged (a commit here, a notification from elsewhere) or every ``poll_seconds``; each
    read wakes every watcher. The newest ``buffer_size`` events stay in memory: a watcher that
    is live (at or near the head) reads them from there; one further behind reads the store.
    """

    task_name = "event-feed"

    def __init__(self, store: Store, *, poll_seconds: float = 0.25, buffer_size: int = 1024) -> None:
        self._store = store
        self._poll = poll_seconds
        self._buffer: deque[Event] = deque()
        self._buffer_size = buffer_size
        #: The buffer holds every event after this cursor (up to the head).
        self._covers = 0
        #: The newest cursor the feed has read (every event up to it is in the store for good);
        #: -1 until the first read.
        self.head = -1
        self._nudged = asyncio.Event()
        self._changed = asyncio.Event()
        self._watchers = 0
        self._task = None
        self._failing = False

    def nudge(self) -> None:
        """Something was committed: read now (safe from any task of this loop)."""
        self._nudged.set()

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        self._watchers += 1
        self.nudge()
        try:
            yield
        finally:
            self._watchers -= 1

    async def _run(self) -> None:
        while True:
            if self._watchers == 0:
                # Nobody watches: forget the head (it goes stale) until somebody does.
                self.head = -1
                self._buffer.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), self._poll)
            self._nudged.clear()
            if self._watchers == 0:
                continue
            try:
                await self._read()
            except Exception:
                if not self._failing:  # once per outage, not every poll
                    log.warning("reading new events failed; retrying", exc_info=True)
                self._failing = True
                await asyncio.sleep(self._poll)
            else:
                self._failing = False

    async def _read(self) -> None:
        async with self._store.read() as uow:
            if self.head < 0:
                self.head = self._covers = await uow.events.head()
                self._buffer.clear()
                self._wake()
                return
            while True:
                events = await uow.events.after(self.head, (), 500)
                if not events:
                    return
                self._buffer.extend(events)
                while len(self._buffer) > self._buffer_size:
                    self._covers = self._buffer.popleft().cursor
                self.head = events[-1].cursor
                self._wake()
                if len(events) < 500:
                    return

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def buffered_after(self, cursor: int) -> list[Event] | None:
        """The buffered events after ``cursor``; None when the buffer does not reach back that
        far (read the store then)."""
        if self.head < 0 or cursor < self._covers:
            return None
        if cursor >= self.head:
            return []
        return [event for event in self._buffer if event.cursor > cursor]

    async def wait_past(self, cursor: int, seconds: float) -> bool:
        """Wait until the feed's head passes ``cursor``; False after ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.head <= cursor:
            left = deadline - loop.time()
            if left <= 0:
                return False
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
        return True


# --- use cases ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[Event]
    #: Every matching event up to here was returned.
    cursor: int
    next_page_token: str


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Events (empty: a progress message) and the cursor a consumer may checkpoint."""

    events: list[Event]
    cursor: int


_PAGE_TOKEN_PREFIX = "ev1:"


def _page_token(cursor: int) -> str:
    return base64.urlsafe_b64encode(f"{_PAGE_TOKEN_PREFIX}{cursor}".encode()).decode().rstrip("=")


def _token_cursor(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if not text.startswith(_PAGE_TOKEN_PREFIX):
            raise ValueError(text)
        cursor = int(text[len(_PAGE_TOKEN_PREFIX) :])
        if cursor < 0:
            raise ValueError(text)
        return cursor
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument(
            Reason.INVALID_PAGE_TOKEN, "the page_token is not one this server issued"
        ) from None


class EventService:
    def __init__(
        self,
        store: Store,
        feed: EventFeed,
        *,
        progress_seconds: float = 5.0,
        default_page_size: int = 100,
        max_page_size: int = 1000,
        batch_size: int = 500,
    ) -> None:
        self._store = store
        self._feed = feed
        self._progress = progress_seconds
        self._default_page = default_page_size
        self._max_page = max_page_size
        self._batch = batch_size

    @staticmethod
    def _type_violations(types: Sequence[str]) -> list[FieldViolation]:
        unknown = sorted(set(types) - TYPES)
        return [
            FieldViolation("types", f"unknown event type {name!r}", "UNKNOWN_TYPE") for name in unknown[:5]
        ]

    async def _check_cursor(self, cursor: int) -> int:
        """Refuse a cursor one cannot resume from; the head."""
        async with self._store.read() as uow:
            purged = await uow.events.purged_through()
            head = await uow.events.head()
        if cursor < purged:
            raise OutOfRange(
                Reason.EVENT_CURSOR_EXPIRED,
                f"events after cursor {cursor} are no longer kept (retention); resume from cursor "
                f"{purged} or later after reading the current state",
                metadata={"oldest_cursor": str(purged), "head_cursor": str(head)},
            )
        if cursor > head:
            raise OutOfRange(
                Reason.EVENT_CURSOR_UNKNOWN,
                f"cursor {cursor} is past the newest event ({head}) of this store",
                metadata={"head_cursor": str(head), "oldest_cursor": str(purged)},
            )
        return head

    async def list(
        self, after_cursor: int, types: Sequence[str], page_size: int, page_token: str
    ) -> EventPage:
        violations = []
        if after_cursor < 0:
            violations.append(FieldViolation("after_cursor", "must not be negative", "OUT_OF_RANGE"))
        if page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative", "OUT_OF_RANGE"))
        check(violations + self._type_violations(types))
        wanted = tuple(sorted(set(types)))
        cursor = _token_cursor(page_token) if page_token else after_cursor
        limit = min(page_size or self._default_page, self._max_page)
        head = await self._check_cursor(cursor)
        async with self._store.read() as uow:
            events = await uow.events.after(cursor, wanted, limit, upto=head)
        if len(events) == limit and events[-1].cursor < head:
            last = events[-1].cursor
            return EventPage(events, last, _page_token(last))
        return EventPage(events, head, "")

    async def watch(self, after_cursor: int | None, types: Sequence[str]) -> AsyncGenerator[WatchBatch]:
        """Validate the request (raising before the stream starts), then the stream."""
        violations = self._type_violations(types)
        if after_cursor is not None and after_cursor < 0:
            violations.append(FieldViolation("after_cursor", "must not be negative", "OUT_OF_RANGE"))
        check(violations)
        wanted = tuple(sorted(set(types)))
        if after_cursor is None:
            async with self._store.read() as uow:
                start = await uow.events.head()
        else:
            await self._check_cursor(after_cursor)
            start = after_cursor
        return self._stream(start, wanted)

    async def _stream(self, cursor: int, types: tuple[str, ...]) -> AsyncGenerator[WatchBatch]:
        feed = self._feed
        wanted = frozenset(types)
        loop = asyncio.get_running_loop()
        async with feed.watching():
            yield WatchBatch([], cursor)
            sent = loop.time()
            while True:
                buffered = feed.buffered_after(cursor)
                if buffered is None:
                    # Behind the buffer (or the feed has not read yet): from the store.
                    async with self._store.read() as uow:
                        upto = feed.head if feed.head >= 0 else None
                        scanned = await uow.events.after(cursor, (), self._batch, upto=upto)
                    if not scanned:
                        if not await feed.wait_past(cursor, self._progress):
                            yield WatchBatch([], cursor)
                            sent = loop.time()
                        continue
                else:
                    scanned = buffered[: self._batch]
                    if not scanned:
                        if not await feed.wait_past(cursor, self._progress):
                            yield WatchBatch([], cursor)
                            sent = loop.time()
                        continue
                cursor = scanned[-1].cursor
                matching = [event for event in scanned if not wanted or event.type in wanted]
                if matching or loop.time() - sent >= self._progress:
                    yield WatchBatch(matching, cursor)
                    sent = loop.time()
