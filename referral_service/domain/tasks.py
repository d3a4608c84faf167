"""A background task of this process's event loop, started once and cancelled on stop: the event
feed, the webhook worker, the PostgreSQL listener."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundTask:
    #: The asyncio task's name.
    task_name = "background"
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
