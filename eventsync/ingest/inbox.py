"""The durable inbox: events are committed in groups, and a caller is answered only after
its event's transaction committed (so a webhook's 2xx means the event survives kill -9)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from eventsync.events import Event
from eventsync.logging import get_logger
from eventsync.store.queue import JobQueue

log = get_logger("eventsync.inbox")

MAX_BATCH = 500


class Inbox:
    def __init__(
        self, queue: JobQueue, *, on_commit: Callable[[list[Event], list[str]], None] | None = None
    ) -> None:
        self.queue = queue
        self._pending: list[tuple[Event, asyncio.Future[str]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_commit = on_commit
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._writer(), name="inbox writer")

    async def submit(self, event: Event) -> str:
        """Commit one event (grouped with whatever else is waiting); returns its outcome."""
        if self._closing or self._task is None or self._task.done():
            raise RuntimeError("the inbox is not accepting events")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        self._wake.set()
        return await asyncio.shield(future)

    async def _writer(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                outcomes = await self.queue.submit([event for event, _ in batch])
            except Exception as exc:
                log.exception("inbox commit failed", events=len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
            if self._on_commit is not None:
                self._on_commit([e for e, _ in batch], outcomes)

    async def close(self) -> None:
        """Stop taking events; commit what was already handed in."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
