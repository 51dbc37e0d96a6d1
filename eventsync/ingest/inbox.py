"""The durable inbox: events are committed in groups, and a caller is answered only after
its event's transaction committed (so a webhook's 2xx means the event survives kill -9)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from eventsync.errors import UnstorableEvent
from eventsync.events import Event
from eventsync.logging import get_logger
from eventsync.store.base import JobQueue

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
        """Commit one event (grouped with whatever else is waiting); returns its outcome.
        Raises UnstorableEvent when the database refuses this event (the others of its group
        are committed all the same)."""
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
                results = await self.queue.submit_isolated([event for event, _ in batch])
            except Exception as exc:
                # The database itself failed: nothing of the group is stored.
                log.exception("inbox commit failed", events=len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            committed: list[Event] = []
            outcomes: list[str] = []
            for (event, future), result in zip(batch, results, strict=True):
                if isinstance(result, UnstorableEvent):
                    # A value nobody foresaw got past validation: it fails alone, and says
                    # which event it was so the validation can be taught about it.
                    log.error(
                        "event not stored",
                        source=event.source,
                        entity=event.key,
                        error=str(result),
                        group=len(batch),
                    )
                    if not future.done():
                        future.set_exception(result)
                    continue
                committed.append(event)
                outcomes.append(result)
                if not future.done():
                    future.set_result(result)
            if self._on_commit is not None and committed:
                try:
                    self._on_commit(committed, outcomes)
                except Exception:
                    # The events are committed and answered; a writer that died here would
                    # make every later webhook a 503.
                    log.exception("inbox commit callback failed", events=len(committed))

    async def close(self) -> None:
        """Stop taking events; commit what was already handed in."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
