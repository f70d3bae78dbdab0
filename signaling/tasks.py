"""Background tasks that are kept, logged and cancelled: a task's failure is logged once
when it ends (asyncio alone reports it only if the task is garbage-collected, if ever), and
`cancel_all` ends whatever is still running when the server stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)


class TaskSet:
    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Future[None]] = set()

    def start(self, coro: Awaitable[None]) -> asyncio.Future[None]:
        return self.track(asyncio.ensure_future(coro))

    def track(self, task: asyncio.Future[None]) -> asyncio.Future[None]:
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: asyncio reports it no more
        if exc is not None:
            log.error("a %s task failed", self._name, exc_info=exc)

    async def wait(self) -> None:
        """Until every task started so far has ended (their failures are logged, not raised)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
