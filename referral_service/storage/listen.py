"""PostgreSQL ``LISTEN referral_events``: the appends of every worker and replica send ``NOTIFY``
at commit (``storage/events.py``); this wakes this process's event feed and webhook worker at
once instead of at their next poll. The database stays the record: a lost notification (the
listening connection dropped) only delays a wake-up until the next poll, and the listener
wakes everyone once after it (re)connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from referral_service.domain.tasks import BackgroundTask
from referral_service.storage.db import Database
from referral_service.storage.events import CHANNEL

log = logging.getLogger("referral_service.events")


class EventListener(BackgroundTask):
    task_name = "event-listener"

    def __init__(
        self, database: Database, on_notify: Callable[[], None], *, check_seconds: float = 5.0
    ) -> None:
        self._database = database
        self._on_notify = on_notify
        self._check = check_seconds
        self._task = None
        #: Set once the first LISTEN is in place (tests wait for it).
        self.listening = asyncio.Event()

    def _notified(self, *_: Any) -> None:
        self._on_notify()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception:
                if failures == 0:  # once per outage, not every retry
                    log.warning("listening for event notifications failed; polling meanwhile", exc_info=True)
                failures += 1
            else:
                failures = 0
            await asyncio.sleep(min(1.0 * 2 ** min(failures, 5), 30.0))

    async def _listen(self) -> None:
        async with self._database.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            closed = asyncio.Event()
            driver.add_termination_listener(lambda *_: closed.set())
            await driver.add_listener(CHANNEL, self._notified)
            try:
                self.listening.set()
                self._on_notify()  # whatever was committed while not listening
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), self._check)
                    if not closed.is_set():
                        await driver.execute("SELECT 1")  # raises once the connection is gone
            finally:
                with contextlib.suppress(Exception):
                    await driver.remove_listener(CHANNEL, self._notified)
                # Never hand a connection that listened back to the pool.
                await conn.invalidate()
