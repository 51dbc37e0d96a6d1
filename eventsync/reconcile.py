"""Diff sync: compare BookStack's listings with the mirror, read only what changed."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from eventsync.bookstack import models as m
from eventsync.bookstack.client import BookStackClient
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
    parse_time,
)
from eventsync.logging import get_logger
from eventsync.records import (
    COMPLETE_FROM_LISTING,
    ENDPOINTS,
    LISTED_FIELDS,
    listed,
    permissions_row,
    to_row,
)
from eventsync.store.queue import (
    AUDIT_ABSENT,
    AUDIT_FORBIDDEN,
    AUDIT_READABLE,
    NO_AUDIT_LOG,
    record_covered_sync,
)
from eventsync.store.sqlite import (
    CONTENT_TYPES,
    KIND_OF_CONTENT_TYPE,
    KINDS,
    LAST_FULL_SYNC,
    SYNC_FORBIDDEN,
    Store,
    Tx,
)

log = get_logger("eventsync.reconcile")

# A row whose updated_at is this close to our last read of it may have changed again within
# the same second after the read: BookStack's timestamps have one-second resolution, so the
# listing could not show that change. Such rows are re-read on the next diff sync.
RACE_WINDOW = 2.0

# Ids are assigned before commit, so a lower id can become visible after a higher one
# (FACTS 2.6): every poll re-reads this many ids behind the cursor; activity ids dedupe.
AUDIT_OVERLAP = 20

# Sync-state keys (see store/SCHEMA.md).
AUDIT_CURSOR = "audit_cursor"
AUDIT_LAST_ROW = "audit_last_row"  # "id|type|time" of the row at the cursor: a cleared log
AUDIT_GAP = "audit_gap"  # why events may have been lost, until a thorough diff sync ran
LAST_GAP = "last_gap"  # the latest gap ever found, with its time (kept for `status`)
AUDIT_ACCESS = "audit_access"  # its values: AUDIT_READABLE, _FORBIDDEN, _ABSENT (store.queue)
LAST_FULL_SYNC_STARTED = "last_full_sync_started_at"
LAST_FULL_SYNC_AUDIT_ID = "last_full_sync_audit_id"
LAST_FULL_SYNC_REQUESTS = "last_full_sync_requests"
LAST_FULL_SYNC_SECONDS = "last_full_sync_seconds"
# When a full sync last read every role, shelf and restricted item (a sweep's worth).
LAST_VERIFIED = "last_verified_at"


@dataclass
class Tally:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0

    def add(self, outcome: str) -> None:
        if outcome == "orphan":
            return  # of a page the mirror does not hold: not written (DESIGN 13)
        # A stale read (the mirror already held a newer one) left the row as it was.
        outcome = "unchanged" if outcome == "stale" else outcome
        setattr(self, outcome, getattr(self, outcome) + 1)

    def absorb(self, other: Tally) -> None:
        for name in ("created", "updated", "deleted", "unchanged"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class SyncSummary:
    kinds: dict[str, Tally] = field(default_factory=lambda: {k: Tally() for k in KINDS})
    permissions: Tally = field(default_factory=Tally)
    memberships_changed: int = 0
    requests: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    audit_id: int | None = None
    # Pages whose content changed or that went away, and pages read, in this sync: pages that
    # include a changed page are read too (their rendered html embeds it).
    changed_pages: set[int] = field(default_factory=set)
    read_pages: set[int] = field(default_factory=set)
    # What the token was refused (403): the mirror lacks what it could not read.
    forbidden: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems

    def absorb(self, other: SyncSummary) -> None:
        """Add another run's counts (a diff sync's and the jobs' around it) to these."""
        for kind, tally in other.kinds.items():
            self.kinds[kind].absorb(tally)
        self.permissions.absorb(other.permissions)
        self.memberships_changed += other.memberships_changed
        self.problems += other.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "kinds": {k: vars(t) for k, t in self.kinds.items()},
            "permissions": vars(self.permissions),
            "memberships_changed": self.memberships_changed,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "problems": self.problems,
            "audit_id": self.audit_id,
        }


Progress = Callable[[int], None]


class Reconciler:
    """Runs diff syncs of one BookStack source into one store."""

    def __init__(
        self,
        client: BookStackClient,
        store: Store,
        *,
        concurrency: int = 8,
        attachment_content: bool = False,
        on_plan: Callable[[int], None] | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.concurrency = concurrency
        self.attachment_content = attachment_content
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
        await self._reshelve(summary)
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
        await tx.run(lambda conn: record_covered_sync(conn, covered, time.time()))
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
            await self._write_listed(kind, rows, mirror, summary, read_at)
            return
        assert pool is not None
        if kind in CONTENT_TYPES:
            # Ownership migrations are written from the listing: no read each. What they
            # patched now equals its row; what differs in more still differs.
            await self.take_owners(kind, rows, read_at)
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
                or _racy(current, now)
            ):
                await pool.put(self._read_job(kind, raw["id"], summary))
                reads += 1
            else:
                summary.kinds[kind].add("unchanged")
        self._planned(reads)

    async def _remove_gone(
        self, kind: str, seen: set[int], listed_at: float, summary: SyncSummary
    ) -> None:
        gone = await self.store.ids(kind) - seen
        if not gone:
            return
        async with self.store.transaction() as tx:
            for entity_id in sorted(gone):
                # A row read after the listing began (created meanwhile, and written by a job
                # beside this sync) is not gone: delete() leaves it alone.
                if await tx.delete(kind, entity_id, listed_at):
                    summary.kinds[kind].add("deleted")
                    if kind == "page":
                        summary.changed_pages.add(entity_id)

    async def _write_listed(
        self,
        kind: str,
        rows: list[dict[str, Any]],
        mirror: dict[int, dict[str, Any]],
        summary: SyncSummary,
        read_at: float,
    ) -> None:
        model = ENDPOINTS[kind][1]
        if kind == "attachment":
            # BookStack lists attachments of binned pages too: only those of mirrored pages.
            pages = await self.store.present("page", {r.get("uploaded_to") for r in rows})
            rows = [r for r in rows if r.get("uploaded_to") in pages]
        # The listing shows every field the mirror keeps, except an attachment's content: a
        # file replaced within the second of our last read shows no change but updated_at's.
        racy = kind == "attachment" and self.attachment_content
        now = time.time()
        changed = [
            r
            for r in rows
            if r["id"] not in mirror
            or differs(mirror[r["id"]], listed(kind, r))
            or (racy and _racy(mirror[r["id"]], now))
        ]
        summary.kinds[kind].unchanged += len(rows) - len(changed)
        if not changed:
            return
        contents: dict[int, tuple[str | None, bytes | None]] = {}
        if kind == "attachment" and self.attachment_content:
            contents = await self._attachment_contents([r["id"] for r in changed], summary)
            # A row whose content could not be read is left as it was: it still differs
            # from its listing, so the next diff sync tries again.
            changed = [r for r in changed if r["id"] in contents]
        async with self.store.transaction() as tx:
            for raw in changed:
                row = to_row(kind, model.model_validate(raw))
                if raw["id"] in contents:
                    row["link"], row["content"] = contents[raw["id"]]
                summary.kinds[kind].add(await tx.upsert(kind, row, read_at))

    async def _attachment_contents(
        self, ids: list[int], summary: SyncSummary
    ) -> dict[int, tuple[str | None, bytes | None]]:
        """(link, file bytes) of each attachment, read in parallel under the usual gate."""
        found: dict[int, tuple[str | None, bytes | None]] = {}
        gate = asyncio.Semaphore(self.concurrency)

        async def one(attachment_id: int) -> None:
            path = f"/api/attachments/{attachment_id}"
            async with gate:
                try:
                    read = m.AttachmentRead.model_validate(await self.client.get(path))
                except NotFound:
                    return  # gone since the listing; the next diff removes it
                except AuthError:
                    raise  # no read can succeed: the sync stops, to run again later
                except BookStackError as exc:
                    summary.problems.append(f"{path}: {exc}")
                    return
            if read.external:
                found[attachment_id] = (read.content, None)
                return
            try:
                found[attachment_id] = (None, base64.b64decode(read.content or "", validate=True))
            except (binascii.Error, ValueError):
                summary.problems.append(f"{path}: content is not base64")

        await asyncio.gather(*(one(i) for i in ids))
        return found

    async def write_listed(self, kind: str, rows: list[dict[str, Any]], read_at: float) -> Tally:
        """Write listing rows of a kind whose listing carries everything the mirror keeps
        (attachments, users), reading only what changed."""
        summary = SyncSummary()
        mirror = await self.store.index(kind, LISTED_FIELDS[kind])
        await self._write_listed(kind, rows, mirror, summary, read_at)
        return summary.kinds[kind]

    async def take_owners(
        self, kind: str, rows: list[dict[str, Any]], read_at: float
    ) -> list[dict[str, Any]]:
        """Apply the ownership migrations these listing rows show (owner_only) from the rows
        themselves; returns the rows that differ in more and need a read."""
        mirror = await self.store.index(
            kind, (*LISTED_FIELDS[kind], "owned_by"), ids=[r["id"] for r in rows]
        )
        to_read = []
        async with self.store.transaction() as tx:
            for raw in rows:
                current = mirror.get(raw["id"])
                owner = as_id(raw.get("owned_by"))
                # An owner the listing names differently is a change even when the listed
                # fields match: a move's patch copies updated_at from the parent's read,
                # which may carry a migration's change of owner (FACTS 2.5).
                other_owner = current is not None and owner not in (None, current["owned_by"])
                if current is None or differs(current, listed(kind, raw)) or other_owner:
                    if current is not None and owner_only(kind, current, raw):
                        await tx.set_owner(
                            kind, raw["id"], raw["owned_by"], raw.get("updated_at"), read_at
                        )
                    else:
                        to_read.append(raw)
        return to_read

    async def sync_attachments(self, page_id: int | None = None) -> Tally:
        """Diff the attachments of one page (or of every page) against their listing:
        attachments emit no events at all (FACTS 2.5). A failed listing raises and removes
        nothing."""
        filters = {"uploaded_to": page_id} if page_id is not None else None
        endpoint = ENDPOINTS["attachment"][0]
        rows, listed_at = await self.client.list_timed(endpoint, filters=filters)
        mirror = await self.store.index("attachment", (*LISTED_FIELDS["attachment"],))
        if page_id is not None:
            mirror = {i: r for i, r in mirror.items() if r["uploaded_to"] == page_id}
        summary = SyncSummary()
        await self._write_listed("attachment", rows, mirror, summary, listed_at)
        gone = set(mirror) - {r["id"] for r in rows}
        if gone:
            async with self.store.transaction() as tx:
                for attachment_id in sorted(gone):
                    if await tx.delete("attachment", attachment_id, listed_at):
                        summary.kinds["attachment"].add("deleted")
        return summary.kinds["attachment"]

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
            async with self.store.transaction() as tx:
                if await tx.delete(kind, entity_id, exc.sent_at):
                    summary.kinds[kind].add("deleted")
                    if kind == "page":
                        summary.changed_pages.add(entity_id)
            return
        except AuthError:
            raise  # no read can succeed: the sync stops, to run again later
        except BookStackError as exc:
            summary.problems.append(f"{endpoint}/{entity_id}: {exc}")
            return
        model = read_model.model_validate(raw)
        await self.write(kind, model, summary, read_at)

    async def _refresh_includers(self, summary: SyncSummary) -> None:
        # Includes nest; three levels is as deep as BookStack renders them in practice, and
        # the sweep re-reads every page with includes anyway.
        for _ in range(3):
            todo = await self.store.includers(summary.changed_pages) - summary.read_pages
            if not todo:
                return
            summary.changed_pages.clear()
            await self._run([self._read_job("page", pid, summary) for pid in sorted(todo)])

    async def _reshelve(self, summary: SyncSummary) -> None:
        """Books that came back (restored from the recycle bin) are on their shelves again
        without any shelf change BookStack's listing would show: re-read those shelves."""
        shelves = await self.store.shelves_of_returned_books()
        if not shelves:
            return
        problems = len(summary.problems)
        await self._run([self._read_job("shelf", sid, summary) for sid in sorted(shelves)])
        if len(summary.problems) == problems:
            # Forgotten only once read: a failed read leaves them for the next diff sync.
            async with self.store.transaction() as tx:
                await tx.forget_tombstones(shelves)

    async def write(
        self,
        kind: str,
        model: Any,
        summary: SyncSummary | None = None,
        read_at: float | None = None,
    ) -> str:
        """Write one entity read at `read_at` with its relations in one transaction. A read
        older than the one the mirror holds changes nothing ('stale')."""
        async with self.store.transaction() as tx:
            outcome = await tx.upsert(kind, to_row(kind, model), read_at)
            changed = 0
            if kind == "user" and isinstance(model, m.User):
                # Even under a newer row from a listing (which has no roles): the membership
                # has its own read time.
                roles = [r.id for r in model.roles]
                changed += await tx.set_user_roles(model.id, roles, read_at)
            elif outcome == "stale":
                pass
            elif kind == "shelf":
                changed += await tx.set_shelf_books(model.id, [b.id for b in model.books])
            elif kind == "role":
                users = [u.id for u in model.users]
                changed += await tx.set_role_users(model.id, users, read_at)
        if summary is not None:
            summary.kinds[kind].add(outcome)
            summary.memberships_changed += changed
            if kind == "page":
                summary.read_pages.add(model.id)
                if outcome not in ("unchanged", "stale"):
                    summary.changed_pages.add(model.id)
        return outcome

    def _permission_job(
        self, content_type: str, content_id: int, owner: int | None, summary: SyncSummary
    ) -> Awaitable[None]:
        async def run() -> None:
            path = f"/api/content-permissions/{content_type}/{content_id}"
            try:
                raw, read_at = await self.client.read(path)
            except NotFound:
                return  # the item went away; its own deletion handles the mirror
            except AuthError:
                raise  # no read can succeed: the sync stops, to run again later
            except BookStackError as exc:
                summary.problems.append(f"{path}: {exc}")
                if isinstance(exc, ForbiddenError):
                    summary.forbidden.append(f"/api/content-permissions/{content_type}/{{id}}")
                return
            perms = permissions_row(m.ContentPermissions.model_validate(raw))
            async with self.store.transaction() as tx:
                changed = await tx.set_permissions(
                    content_type, content_id, perms, read_at, fallback_owner=owner
                )
            summary.permissions.add("updated" if changed else "unchanged")

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


def owner_only(kind: str, current: dict[str, Any], raw: dict[str, Any]) -> bool:
    """Does this listing row differ from the mirror's only by its owner (and the updated_at
    the change moved)? That is BookStack's ownership migration on a user delete (FACTS,
    first section): the listing row says all of it, no read is needed."""
    if kind not in CONTENT_TYPES or "owned_by" not in current:
        return False
    wanted = listed(kind, raw)
    owner = as_id(raw.get("owned_by"))
    same_otherwise = all(current.get(k) == v for k, v in wanted.items() if k != "updated_at")
    return owner is not None and owner != current["owned_by"] and same_otherwise


def differs(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return any(current.get(k) != v for k, v in wanted.items() if k != "updated_at") or (
        wanted.get("updated_at") is not None and current.get("updated_at") != wanted["updated_at"]
    )


def _racy(current: dict[str, Any], now: float) -> bool:
    updated = parse_time(current.get("updated_at"))
    fetched = current.get("fetched_at")
    if updated is None or fetched is None:
        return False
    return updated >= fetched - RACE_WINDOW and now - fetched < 86400


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
