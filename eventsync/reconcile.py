"""Diff sync: compare BookStack's listings with the mirror, read only what changed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from eventsync.apply import (
    AUDIT_GAP,
    Apply,
    Reread,
    SyncSummary,
    differs,
    permissions_path,
    racy,
)
from eventsync.errors import AuthError, BookStackError, ForbiddenError, NotFound, UnknownRoute
from eventsync.events import (
    DEFAULT_PERMISSIONS,
    FETCH,
    MOVE,
    PERMISSIONS,
    SORT,
    SUBTREE,
    Event,
    as_id,
    from_audit,
)
from eventsync.logging import get_logger
from eventsync.records import COMPLETE_FROM_LISTING, ENDPOINTS, LISTED_FIELDS, listed
from eventsync.store.base import (
    AUDIT_ABSENT,
    AUDIT_FORBIDDEN,
    AUDIT_READABLE,
    CONTENT_TYPES,
    KIND_OF_CONTENT_TYPE,
    LAST_FULL_SYNC,
    NO_AUDIT_LOG,
    SYNC_FORBIDDEN,
    Tx,
)

log = get_logger("eventsync.reconcile")

# Ids are assigned before commit, so a lower id can become visible after a higher one
# (FACTS 2.6): every poll re-reads this many ids behind the cursor; activity ids dedupe.
AUDIT_OVERLAP = 20

# Sync-state keys (see store/SCHEMA.md).
AUDIT_CURSOR = "audit_cursor"
AUDIT_LAST_ROW = "audit_last_row"  # "id|type|time" of the row at the cursor: a cleared log
# AUDIT_GAP (why events may have been lost) is in apply.py: the diff job clears it.
LAST_GAP = "last_gap"  # the latest gap ever found, with its time (kept for `status`)
AUDIT_ACCESS = "audit_access"  # its values: AUDIT_READABLE, _FORBIDDEN, _ABSENT (store.queue)
LAST_FULL_SYNC_STARTED = "last_full_sync_started_at"
LAST_FULL_SYNC_AUDIT_ID = "last_full_sync_audit_id"
LAST_FULL_SYNC_REQUESTS = "last_full_sync_requests"
LAST_FULL_SYNC_SECONDS = "last_full_sync_seconds"
# When a full sync last read every role, shelf and restricted item (a sweep's worth).
LAST_VERIFIED = "last_verified_at"


Progress = Callable[[int], None]


class Reconciler:
    """Runs diff syncs of one BookStack source into one store."""

    def __init__(
        self,
        apply: Apply,
        *,
        concurrency: int = 8,
        on_plan: Callable[[int], None] | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.apply = apply
        self.client = apply.client
        self.store = apply.store
        self.concurrency = concurrency
        self._on_plan = on_plan
        self._on_progress = on_progress

    async def full_sync(
        self,
        *,
        all_permissions: bool | None = None,
        set_cursor: bool = True,
        verify_memberships: bool = True,
    ) -> SyncSummary:
        """Diff-sync everything. Records a sync point only when every step succeeded.

        `set_cursor=False` for diffs run beside the audit-log poller: a listing diff does not
        re-read permissions of known items, so it must not skip the events that announce
        such changes. `verify_memberships` reads every role and every shelf: their members
        and books change without moving any listed field (pivot syncs, FACTS 2.5); with it
        off they are read only when their listing row changed, and the background sweep
        re-reads them in turn."""
        started = time.monotonic()
        requests_before = self.client.stats.requests
        summary = SyncSummary()
        started_at = _now_iso()
        first = await self.store.get_state(LAST_FULL_SYNC) is None
        if all_permissions is None:
            all_permissions = first

        audit_id, audit_access, head_rows = await self._audit_head(summary)
        summary.audit_id = audit_id
        # An audit log that appeared (BookStack upgraded, access granted) while we ran without
        # one: there is no cursor yet, so this sync starts one, as a first sync would.
        set_cursor = set_cursor or (
            not first
            and audit_access == AUDIT_READABLE
            and await self.store.get_state(AUDIT_CURSOR) is None
        )

        restricted = await self.restricted_items()
        plan = _PermissionPlan(
            all_permissions,
            restricted,
            set() if all_permissions else await self.store.permission_keys(),
            await self.store.restricted_keys(),
        )
        listed_at: dict[str, float] = {}
        pool = _Pool(self.concurrency, self._on_progress)
        try:
            # Each listing is streamed against the mirror a page at a time (memory does not
            # grow with the wiki), its reads handed to a bounded pool. Memberships, shelf
            # book lists and permission rows name only what the mirror holds, so what they
            # name is written first: users, then roles and books, then the rest, then the
            # permissions of the items, and attachments after their pages.
            for group in (("user",), ("role", "book"), ("shelf", "chapter", "page")):
                await asyncio.gather(
                    *(
                        self._stream(kind, summary, pool, plan, listed_at, verify_memberships)
                        for kind in group
                    )
                )
                await pool.drain()
            log.info(
                "diff sync: listings read",
                permission_reads=len(plan.reads),
                defaults=len(plan.defaults),
                first_sync=first,
            )
            for content_type, content_id, owner in plan.reads:
                await pool.put(self._permission_job(content_type, content_id, owner, summary))
            self._planned(len(plan.reads))
            await pool.drain()
        finally:
            await pool.close()
        await self._write_defaults(plan.defaults, listed_at, summary)
        await self._refresh_includers(summary)
        await self.apply.reshelve(self._read_now(summary))
        await self._stream("attachment", summary, None, None, listed_at, verify_memberships)
        await self._ensure_whole(summary)

        summary.requests = self.client.stats.requests - requests_before
        summary.seconds = time.monotonic() - started
        async with self.store.transaction() as tx:
            if audit_access is not None:
                await note_audit_access(tx, audit_access)
            if summary.forbidden:
                # Effective access cannot be answered from a mirror the token could not fill.
                refused = ", ".join(dict.fromkeys(summary.forbidden))
                await tx.set_state(SYNC_FORBIDDEN, f"{_now_iso()} {refused}")
            else:
                await tx.delete_state(SYNC_FORBIDDEN)
            if summary.complete:
                await tx.set_state(LAST_FULL_SYNC, _now_iso())
                await tx.set_state(LAST_FULL_SYNC_STARTED, started_at)
                await tx.set_state(LAST_FULL_SYNC_REQUESTS, summary.requests)
                await tx.set_state(LAST_FULL_SYNC_SECONDS, round(summary.seconds, 3))
                if verify_memberships and all_permissions:
                    await tx.set_state(LAST_VERIFIED, time.time())
                if audit_id is not None and set_cursor:
                    # Everything logged up to audit_id is reflected in the mirror now.
                    await tx.set_state(LAST_FULL_SYNC_AUDIT_ID, audit_id)
                    await tx.set_state(AUDIT_CURSOR, audit_id)
                    await self._record_covered(tx, head_rows, all_permissions)
        log.info("diff sync finished", **summary.as_dict())
        return summary

    # ---- steps ------------------------------------------------------------------------------

    async def _audit_head(
        self, summary: SyncSummary
    ) -> tuple[int | None, str | None, list[dict[str, Any]]]:
        """The highest activity id (the cursor this sync may set), whether there is an audit
        log to read (AUDIT_READABLE, _FORBIDDEN, _ABSENT; None: unknown after an error), and
        the newest rows: those visible now are reflected by the listings read after this,
        so the poller's overlap re-read must not act on them again."""
        try:
            rows = await self.client.latest_audit_rows(AUDIT_OVERLAP)
        except AuthError:
            raise
        except ForbiddenError:
            return None, AUDIT_FORBIDDEN, []
        except UnknownRoute:
            return None, AUDIT_ABSENT, []
        except BookStackError as exc:
            summary.problems.append(f"audit log: {exc}")
            return None, None, []
        ids = [i for i in (as_id(r.get("id")) for r in rows) if i is not None]
        return max(ids, default=0), AUDIT_READABLE, rows

    async def _record_covered(
        self, tx: Tx, rows: list[dict[str, Any]], all_permissions: bool
    ) -> None:
        """Record the audit rows this sync reflects as already handled (deduped by activity
        id when the poller re-reads them). A listing diff re-reads no permissions of known
        items, so rows asking for permissions are left to the poller unless this sync read
        every item's permissions."""
        events = [from_audit(r) for r in rows]
        # Rows of changes made before they were logged, which the listings read after this
        # reflect. Not: BookStack logs recycle_bin_restore/_destroy and role_delete before
        # acting, and user_create/role_create before their commit (FACTS 2.6), so the listing
        # may predate them; nor permission changes, unless this sync read every item's.
        safe = {FETCH, DEFAULT_PERMISSIONS, MOVE, SORT, SUBTREE}
        safe |= {PERMISSIONS} if all_permissions else set()
        covered = [e for e in events if e.activity_id is not None and e.hints <= safe]
        await tx.record_covered(covered, time.time())
        top = max(events, key=lambda e: e.activity_id or 0, default=None)
        if top is not None and top.activity_id is not None:
            await tx.set_state(AUDIT_LAST_ROW, audit_signature(top))

    async def _ensure_whole(self, summary: SyncSummary) -> None:
        """DESIGN 13: nothing names what the mirror does not hold. The writes keep it so;
        what a race left behind (a page deleted while its attachments were listed) goes
        here, and the sync is complete only when none is left."""
        async with self.store.transaction() as tx:
            repaired = await tx.remove_dangling()
        if repaired:
            log.warning("removed rows naming what the mirror does not hold", **repaired)
        for what, count in (await self.store.dangling()).items():
            summary.problems.append(f"mirror not whole: {count} {what}")

    def _planned(self, reads: int) -> None:
        if reads and self._on_plan:
            self._on_plan(reads)

    async def _stream(
        self,
        kind: str,
        summary: SyncSummary,
        pool: _Pool | None,
        plan: _PermissionPlan | None,
        listed_at: dict[str, float],
        verify_memberships: bool,
    ) -> None:
        """Diff one listing against the mirror as its pages arrive, then remove what it no
        longer shows. A listing that fails or comes back short removes nothing."""
        endpoint = ENDPOINTS[kind][0]
        filters = {"draft": 0} if kind == "page" else None
        listing = self.client.list(endpoint, filters=filters)
        seen: set[int] = set()
        chunk: list[dict[str, Any]] = []
        now = time.time()
        try:
            async for raw in listing:
                chunk.append(raw)
                if len(chunk) >= CHUNK:
                    await self._diff_chunk(
                        kind, chunk, listing, summary, pool, plan, seen, now, verify_memberships
                    )
                    chunk = []
            if chunk:
                await self._diff_chunk(
                    kind, chunk, listing, summary, pool, plan, seen, now, verify_memberships
                )
        except AuthError:
            raise
        except ForbiddenError as exc:
            if kind in CONTENT_TYPES:
                # Any API user may list content: a 403 here means no API access at all.
                raise
            summary.problems.append(f"{endpoint}: the token may not list it ({exc})")
            summary.forbidden.append(endpoint)
            log.warning("listing failed: nothing of this kind is removed", kind=kind)
            return
        except BookStackError as exc:
            summary.problems.append(f"{endpoint}: {exc}")
            log.warning("listing failed: nothing of this kind is removed", kind=kind)
            return
        assert listing.started_at is not None  # every listing makes at least one request
        listed_at[kind] = listing.started_at
        await self._remove_gone(kind, seen, listing.started_at, summary)

    async def _diff_chunk(
        self,
        kind: str,
        rows: list[dict[str, Any]],
        listing: Any,
        summary: SyncSummary,
        pool: _Pool | None,
        plan: _PermissionPlan | None,
        seen: set[int],
        now: float,
        verify_memberships: bool,
    ) -> None:
        read_at: float = listing.started_at
        ids = [r["id"] for r in rows]
        seen.update(ids)
        if plan is not None and kind in CONTENT_TYPES:
            plan.add(CONTENT_TYPES[kind], rows)
        fields = LISTED_FIELDS[kind]
        if kind in COMPLETE_FROM_LISTING:
            mirror = await self.store.index(kind, fields, ids=ids)
            await self.apply.write_rows(kind, rows, mirror, summary, read_at)
            return
        assert pool is not None
        if kind in CONTENT_TYPES:
            # Ownership migrations are written from the listing: no read each. What they
            # patched now equals its row; what differs in more still differs.
            await self.apply.take_owners(kind, rows, read_at)
        mirror = await self.store.index(kind, fields, ids=ids)
        reads = 0
        for raw in rows:
            current = mirror.get(raw["id"])
            # Roles and shelves are few, and their members and books change with no timestamp
            # moving: a full sync reads them all; a periodic diff leaves that to the sweep.
            if (
                (kind in ("role", "shelf") and verify_memberships)
                or current is None
                or differs(current, listed(kind, raw))
                or racy(current, now)
            ):
                await pool.put(self._read_job(kind, raw["id"], summary))
                reads += 1
            else:
                summary.kinds[kind].add("unchanged")
        self._planned(reads)

    async def _remove_gone(
        self, kind: str, seen: set[int], listed_at: float, summary: SyncSummary
    ) -> None:
        # A row read after the listing began (created meanwhile, and written by a job beside
        # this sync) is not gone: remove() leaves it alone.
        await self.apply.remove(kind, await self.store.ids(kind) - seen, listed_at, summary)

    async def restricted_items(self) -> set[tuple[str, int]] | None:
        """(content type, id) of every item with content permissions of its own, from one
        search (`{is_restricted}`: exactly the items with entity_permissions rows, FACTS
        first section), or None when the search cannot be had or trusted: then every item's
        permissions are read instead."""
        try:
            return await self.client.search_all("{is_restricted}")
        except AuthError:
            raise
        except BookStackError as exc:
            log.warning(
                "the {is_restricted} search failed: reading every item's permissions",
                error=str(exc),
            )
            return None

    async def _write_defaults(
        self,
        defaults: list[tuple[str, int, int | None]],
        listed_at: dict[str, float],
        summary: SyncSummary,
    ) -> None:
        """The default permissions of items the search does not find restricted, as of the
        listing that named them (a later read, or an event's, stands)."""
        # In transactions of a listing page's worth: the webhook intake and the jobs beside
        # this sync wait for the write lock no longer than that.
        for start in range(0, len(defaults), CHUNK):
            chunk = defaults[start : start + CHUNK]
            by_type: dict[str, list[tuple[int, int | None]]] = {}
            for content_type, content_id, owner in chunk:
                by_type.setdefault(content_type, []).append((content_id, owner))
            async with self.store.transaction() as tx:
                changed = 0
                for content_type, items in by_type.items():
                    read_at = listed_at.get(KIND_OF_CONTENT_TYPE[content_type], time.time())
                    changed += await tx.set_default_permissions(content_type, items, read_at)
            summary.permissions.updated += changed
            summary.permissions.unchanged += len(chunk) - changed

    async def _run(self, jobs: Iterable[Awaitable[None]]) -> None:
        queue = list(jobs)
        gate = asyncio.Semaphore(self.concurrency)

        async def guarded(job: Awaitable[None]) -> None:
            async with gate:
                await job
            if self._on_progress:
                self._on_progress(1)

        # Coroutines are created up front but only run under the semaphore.
        await asyncio.gather(*(guarded(j) for j in queue))

    # ---- reads ------------------------------------------------------------------------------

    async def _read_job(self, kind: str, entity_id: int, summary: SyncSummary) -> None:
        endpoint, _, read_model = ENDPOINTS[kind]
        try:
            raw, read_at = await self.client.read(f"{endpoint}/{entity_id}")
        except NotFound as exc:
            # Gone (or hidden from the sync user) since the listing: remove it.
            await self.apply.remove(kind, [entity_id], exc.sent_at, summary)
            return
        except AuthError:
            raise  # no read can succeed: the sync stops, to run again later
        except BookStackError as exc:
            summary.problems.append(f"{endpoint}/{entity_id}: {exc}")
            return
        model = read_model.model_validate(raw)
        await self.apply.write(kind, model, summary, read_at)

    def _read_now(self, summary: SyncSummary) -> Reread:
        """Re-reads within this sync, under its concurrency: True when none of them failed."""

        async def reread(kind: str, ids: list[int], reason: str) -> bool:
            problems = len(summary.problems)
            await self._run([self._read_job(kind, i, summary) for i in ids])
            return len(summary.problems) == problems

        return reread

    async def _refresh_includers(self, summary: SyncSummary) -> None:
        # Includes nest; three levels is as deep as BookStack renders them in practice, and
        # the sweep re-reads every page with includes anyway.
        reread = self._read_now(summary)
        for _ in range(3):
            # The reads of this round collect the pages they change for the next one.
            changed, summary.changed_pages = summary.changed_pages, set()
            if not await self.apply.refresh_includers(changed, reread, read=summary.read_pages):
                return

    def _permission_job(
        self, content_type: str, content_id: int, owner: int | None, summary: SyncSummary
    ) -> Awaitable[None]:
        async def run() -> None:
            try:
                await self.apply.read_permissions(
                    content_type, content_id, summary, fallback_owner=owner
                )
            except NotFound:
                return  # the item went away; its own deletion handles the mirror
            except AuthError:
                raise  # no read can succeed: the sync stops, to run again later
            except BookStackError as exc:
                summary.problems.append(f"{permissions_path(content_type, content_id)}: {exc}")
                if isinstance(exc, ForbiddenError):
                    summary.forbidden.append(f"/api/content-permissions/{content_type}/{{id}}")
                return

        return run()


# Listing rows compared with the mirror at a time: one listing page's worth.
CHUNK = 500


class _PermissionPlan:
    """Which items' content permissions a sync reads, and which get the default without a
    read, built as the listings stream by. With the {is_restricted} search, only restricted
    items are read (all of them, or those the mirror does not know as restricted); every
    other item has the default (inheriting, no rows). Without it, every item it has none
    for is read."""

    def __init__(
        self,
        all_permissions: bool,
        restricted: set[tuple[str, int]] | None,
        known: set[tuple[str, int]],
        known_restricted: set[tuple[str, int]],
    ) -> None:
        self.all_permissions = all_permissions
        self.restricted = restricted
        self.known = known
        self.known_restricted = known_restricted
        # (content type, id, owner as the listing names it)
        self.reads: list[tuple[str, int, int | None]] = []
        self.defaults: list[tuple[str, int, int | None]] = []

    def add(self, content_type: str, rows: list[dict[str, Any]]) -> None:
        for raw in rows:
            key = (content_type, raw["id"])
            owner = raw.get("owned_by")
            item = (content_type, raw["id"], owner if as_id(owner) is not None else None)
            if self.restricted is None:
                if key not in self.known:
                    self.reads.append(item)
            elif key in self.restricted:
                if self.all_permissions or key not in self.known_restricted:
                    self.reads.append(item)
            elif key not in self.known or key in self.known_restricted:
                self.defaults.append(item)


class _Pool:
    """A fixed number of workers running the reads handed to it, so that a sync of any size
    holds at most a few of them at once. The first error a read raised (reads catch
    BookStack's own errors; what escapes stops the sync, a rejected token say) is raised
    by drain()."""

    def __init__(self, size: int, on_done: Progress | None) -> None:
        self._queue: asyncio.Queue[Awaitable[None]] = asyncio.Queue(maxsize=size * 2)
        self._on_done = on_done
        self._error: BaseException | None = None
        self._workers = [asyncio.create_task(self._work()) for _ in range(size)]

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                if self._error is None:
                    await job
                else:
                    job.close()  # type: ignore[attr-defined]  # a coroutine never awaited
            except Exception as exc:
                self._error = self._error or exc
            finally:
                self._queue.task_done()
                if self._on_done:
                    self._on_done(1)

    async def put(self, job: Awaitable[None]) -> None:
        await self._queue.put(job)

    async def drain(self) -> None:
        await self._queue.join()
        if self._error is not None:
            raise self._error

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while not self._queue.empty():
            leftover = self._queue.get_nowait()
            leftover.close()  # type: ignore[attr-defined]


async def note_audit_access(tx: Tx, access: str) -> None:
    """Record whether there is an audit log to read; say so when that changed, once (every
    diff sync and every refused poll looks again)."""
    previous = await tx.get_state(AUDIT_ACCESS)
    if previous == access:
        return
    await tx.set_state(AUDIT_ACCESS, access)
    if access == AUDIT_ABSENT:
        log.warning(
            "this BookStack has no audit-log API (/api/audit-log answers an HTML 404; it came "
            "in BookStack v23.08): running on webhooks and periodic diff syncs only, and no "
            "webhook can be confirmed against the audit log; upgrade BookStack to have it"
        )
    elif access == AUDIT_FORBIDDEN:
        log.warning(
            "the API token cannot read the audit log: running on webhooks and periodic diff "
            "syncs only (give the token's role 'Manage app settings' and 'Manage users')"
        )
    elif previous in NO_AUDIT_LOG:
        log.info("the audit log is readable (again): polling it resumes")


async def record_gap(tx: Tx, reason: str) -> None:
    """Note a gap: events may have been lost, so a thorough diff sync is due."""
    await tx.set_state(AUDIT_GAP, reason)
    await tx.set_state(LAST_GAP, f"{_now_iso()} {reason}")


def audit_signature(event: Event) -> str:
    """What identifies one audit row across polls: its id alone does not survive a
    `bookstack:clear-activity`, after which ids restart at 1."""
    return f"{event.activity_id}|{event.type}|{event.at}"


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
