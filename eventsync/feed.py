"""Wakes the change feed's readers (the live stream, the deliveries) when it grows."""

from __future__ import annotations

import asyncio
import contextlib

from eventsync.aio import wait_any
from eventsync.logging import get_logger
from eventsync.store.base import Store

log = get_logger("eventsync.feed")

# How often the feed's head is read, for changes other processes commit (`eventsync
# reconcile` beside `serve`): this process's own commits wake readers at once.
FALLBACK_POLL = 1.0


class FeedWatch:
    """A broadcast: readers take `mark()` before they read the feed, then `wait()` on it, so a
    commit between the read and the wait is not missed. One cheap query a second, for the
    whole process, covers writers in other processes."""

    def __init__(self, store: Store, *, poll: float = FALLBACK_POLL) -> None:
        self.store = store
        self.poll = poll
        self.head = 0
        self._grown = asyncio.Event()
        store.on_feed_commit.append(self.notify)

    def notify(self) -> None:
        grown, self._grown = self._grown, asyncio.Event()
        grown.set()

    def mark(self) -> asyncio.Event:
        return self._grown

    async def wait(
        self, mark: asyncio.Event, *others: asyncio.Event, timeout: float | None = None
    ) -> None:
        """Until the feed grows after `mark` was taken, one of `others` is set, or timeout."""
        await wait_any(mark, *others, timeout=timeout)

    async def run(self, stop: asyncio.Event) -> None:
        """Other processes' commits: PostgreSQL announces them, SQLite's are polled for."""
        if self.store.announces:
            await self.store.listen()
            await stop.wait()
            return
        self.head = await self.store.last_seq()
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll)
            try:
                head = await self.store.last_seq()
            except Exception:
                log.exception("reading the change feed's head failed; trying again")
                continue
            if head != self.head:
                self.head = head
                self.notify()

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.store.on_feed_commit.remove(self.notify)
