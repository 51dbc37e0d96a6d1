"""The audit-log poller: the durable, ordered record that fills in what webhooks miss."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from eventsync.aio import wait_any
from eventsync.apply import AUDIT_GAP
from eventsync.bookstack.client import BookStackClient
from eventsync.errors import AuthError, BookStackError, ForbiddenError, UnknownRoute
from eventsync.events import DIFF_KEY, FETCH, THOROUGH, Event, from_audit
from eventsync.logging import get_logger
from eventsync.reconcile import (
    AUDIT_ABSENT,
    AUDIT_ACCESS,
    AUDIT_CURSOR,
    AUDIT_FORBIDDEN,
    AUDIT_LAST_ROW,
    AUDIT_OVERLAP,
    NO_AUDIT_LOG,
    audit_signature,
    note_audit_access,
    record_gap,
)
from eventsync.store.base import JobQueue

log = get_logger("eventsync.auditlog")

OVERLAP = AUDIT_OVERLAP
# After a webhook, poll soon (its audit row is already written) but let a burst gather.
DEBOUNCE = 0.5
LAST_POLL = "audit_last_poll_at"
LAST_ROW = AUDIT_LAST_ROW
GAP = AUDIT_GAP


class AuditPoller:
    def __init__(
        self,
        client: BookStackClient,
        queue: JobQueue,
        *,
        interval: float = 30.0,
        overlap: int = OVERLAP,
        on_events: Callable[[list[Event], list[str]], None] | None = None,
        on_gap: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.queue = queue
        self.store = queue.store
        self.interval = interval
        self.overlap = overlap
        self._trigger = asyncio.Event()
        self._on_events = on_events
        self._on_gap = on_gap
        self.polls = 0
        self.last_error: str | None = None

    def trigger(self) -> None:
        self._trigger.set()

    async def cursor(self) -> int | None:
        value = await self.store.get_state(AUDIT_CURSOR)
        return None if value is None else int(value)

    async def poll_once(self) -> int:
        """Read everything after the cursor (minus the overlap); returns new events queued.

        Each page of rows and the cursor move in one transaction, so a crash between pages
        loses nothing and re-reads at most one page."""
        cursor = await self.cursor()
        if cursor is None:
            return 0  # no sync point yet: the initial full sync sets the cursor
        fresh = 0
        batch: list[Event] = []
        verified = False
        async for row in self.client.audit_log_after(max(0, cursor - self.overlap)):
            batch.append(from_audit(row))
            if len(batch) >= 500:
                if not verified:
                    verified = True
                    if not await self._verify(cursor, batch):
                        return await self.poll_once()
                fresh += await self._commit(batch)
                batch = []
        if not verified and not await self._verify(cursor, batch):
            return await self.poll_once()
        if batch:
            fresh += await self._commit(batch)
        self.polls += 1
        async with self.store.transaction() as tx:
            await tx.set_state(LAST_POLL, time.time())
        return fresh

    async def _commit(self, batch: list[Event]) -> int:
        top = max(batch, key=lambda e: e.activity_id or 0)
        async with self.store.transaction() as tx:
            outcomes = await self.queue.record_many(tx, batch)
            current = await self.cursor()
            if top.activity_id is not None and (current is None or top.activity_id >= current):
                await tx.set_state(AUDIT_CURSOR, top.activity_id)
                await tx.set_state(LAST_ROW, audit_signature(top))
        if self._on_events is not None:
            self._on_events(batch, outcomes)
        return sum(o in ("queued", "merged") for o in outcomes)

    async def _verify(self, cursor: int, first_page: list[Event]) -> bool:
        """Is the row at our cursor still the one we saw? If the log was cleared
        (`bookstack:clear-activity` truncates it and ids restart at 1) it is gone, or another
        activity now has its id. Either way events were lost: that is a gap."""
        if cursor == 0:
            return True
        at_cursor = next((e for e in first_page if e.activity_id == cursor), None)
        seen = await self.store.get_state(LAST_ROW)
        if at_cursor is not None:
            if seen is None or seen == audit_signature(at_cursor):
                return True
            reason = f"audit-log row {cursor} is no longer the activity we read"
        elif any((e.activity_id or 0) > cursor for e in first_page):
            reason = f"audit-log row {cursor} we had read is gone"
        else:
            latest = max((e.activity_id or 0 for e in first_page), default=None)
            if latest is None:
                latest = await self.client.latest_audit_id()
            if latest is not None and latest >= cursor:
                return True
            reason = f"audit log highest id {latest} is below our cursor {cursor}"
        log.warning("audit log cleared or pruned behind our cursor: gap", reason=reason)
        async with self.store.transaction() as tx:
            await record_gap(tx, reason)
            # Ids restart: forget old activity ids so new rows with the same ids are not
            # taken for duplicates; read the new log from its start; diff-sync the rest.
            await self.queue.forget_activity_ids(tx)
            await tx.set_state(AUDIT_CURSOR, 0)
            await tx.delete_state(LAST_ROW)
            await self.queue.enqueue(DIFF_KEY, [FETCH], payload=THOROUGH, tx=tx, reason="gap")
        if self._on_gap is not None:
            self._on_gap(reason)
        return False

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        if ready is not None:
            await wait_any(ready, stop)
        while not stop.is_set():
            try:
                if await self.store.get_state(AUDIT_ACCESS) in NO_AUDIT_LOG:
                    # Nothing to read (no access, or a BookStack without the API): no request
                    # and no warning per poll. Every diff sync looks again and resets this.
                    await self._sleep(stop)
                    continue
                await self.poll_once()
                self.last_error = None
            except AuthError as exc:
                # The token, not the audit log: no request is sent until it works again (the
                # client logged that once), and the cursor stays where the last committed
                # page left it, so the next poll catches up on everything meanwhile.
                self.last_error = str(exc)
                log.debug("audit-log poll waits for the API token", error=str(exc))
                await wait_any(self.client.token.working, stop)
                continue
            except (ForbiddenError, UnknownRoute) as exc:
                # A 403 is the token's role, an HTML 404 a BookStack before v23.08: either
                # way there is no audit log to poll (note_audit_access says so, once).
                self.last_error = str(exc)
                access = AUDIT_FORBIDDEN if isinstance(exc, ForbiddenError) else AUDIT_ABSENT
                async with self.store.transaction() as tx:
                    await note_audit_access(tx, access)
            except BookStackError as exc:
                self.last_error = str(exc)
                log.warning("audit-log poll failed; cursor unchanged", error=str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The database (locked past its timeout, disk full): the cursor did not move
                # with anything it covers, so the next poll simply reads the same rows again.
                self.last_error = repr(exc)
                log.exception("audit-log poll failed; cursor unchanged")
            await self._sleep(stop)

    async def _sleep(self, stop: asyncio.Event) -> None:
        self._trigger.clear()
        await wait_any(self._trigger, stop, timeout=self.interval)
        if self._trigger.is_set() and not stop.is_set():
            await wait_any(stop, timeout=DEBOUNCE)
