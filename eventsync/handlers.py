"""Job handlers: read the entity's current state from the API and write it (state-based, so
applying a job twice, late or out of order leaves the same mirror)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

from eventsync.apply import AUDIT_GAP, RACE_WINDOW, Apply, SyncSummary
from eventsync.bookstack import models as m
from eventsync.errors import EventsyncError, ForbiddenError, NotFound
from eventsync.events import (
    ALL_ATTACHMENTS_KEY,
    ATTACHMENTS_KIND,
    CONTENTS_KIND,
    DEFAULT_PERMISSIONS,
    DIFF_KEY,
    EXPECT_GONE,
    EXPECT_PRESENT,
    FETCH,
    MOVE,
    OWNERS_KIND,
    PERMISSIONS,
    RESOLVE_RESTORE,
    RESORT_DELAY,
    ROLES_REFRESH,
    SORT,
    SORT_RULE_KIND,
    SUBTREE,
)
from eventsync.logging import get_logger
from eventsync.records import ENDPOINTS, listed, to_row
from eventsync.store.base import CONTENT_TYPES, KIND_OF_CONTENT_TYPE, PLACEMENT, Job, JobQueue

# How far before a user delete the listings of what changed are read from (see _owners).
OWNER_WINDOW = 15 * 3600.0 + 2

log = get_logger("eventsync.handlers")

# Re-check delays for webhooks that BookStack sends before the change is visible (FACTS 2.6):
# bounded, after which the state we read is taken as the truth.
SETTLE_DELAYS = (0.5, 1.5, 3.0, 6.0)


class Settle(EventsyncError):
    """The read contradicts the event (it arrived before the change): look again shortly."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


# Page fields a move or sort can change without touching content (FACTS 2.2).
PLACEMENT_FIELDS = PLACEMENT["page"]


class DiffSync(Protocol):
    """What runs a `diff` job: the reconciler's listing diff. The composition root passes it
    in (app.py): the reconciler sits upstream of the handlers, which do not import it."""

    async def full_sync(
        self,
        *,
        all_permissions: bool | None = None,
        set_cursor: bool = True,
        verify_memberships: bool = True,
    ) -> SyncSummary: ...


class Handlers:
    def __init__(self, apply: Apply, queue: JobQueue, diff: DiffSync) -> None:
        self.apply = apply
        self.client = apply.client
        self.store = apply.store
        self.queue = queue
        self.diff = diff
        # What the jobs of this process did to the mirror (`reconcile` prints it).
        self.summary = SyncSummary()

    async def run(self, job: Job) -> str:
        """Process one job; returns a short outcome for the log."""
        kind = job.kind
        if kind in CONTENT_TYPES:
            return await self._content(job)
        if kind in ("user", "role"):
            return await self._identity(job)
        if kind == "deletion":
            return await self._deletion(job)
        if kind == OWNERS_KIND:
            return await self._owners(job)
        if kind == CONTENTS_KIND:
            return await self._resorted(job.entity_id)
        if kind == SORT_RULE_KIND:
            return await self._sort_rule(job)
        if kind == ATTACHMENTS_KIND:
            tally = await self.apply.sync_attachments(job.entity_id or None)
            return f"attachments {vars(tally)}"
        if kind == "diff":
            thorough = bool(job.payload.get("thorough"))
            summary = await self.diff.full_sync(
                all_permissions=thorough, set_cursor=False, verify_memberships=thorough
            )
            if not summary.complete:
                raise EventsyncError("; ".join(summary.problems[:3]))
            if thorough:
                # Whatever lost events said is in the mirror now: the gap is closed.
                async with self.store.transaction() as tx:
                    await tx.delete_state(AUDIT_GAP)
            return "diffed"
        log.warning("job of an unknown kind dropped", job=job.key)
        return "dropped"

    # ---- content ----------------------------------------------------------------------------

    async def _content(self, job: Job) -> str:
        kind, entity_id, hints = job.kind, job.entity_id, job.hints
        endpoint, _, read_model = ENDPOINTS[kind]
        if hints & {FETCH, MOVE, SORT, SUBTREE}:
            try:
                raw, read_at = await self.client.read(f"{endpoint}/{entity_id}")
            except NotFound as exc:
                self._settle_if(job, EXPECT_PRESENT, "not visible yet")
                removed = await self.apply.remove(kind, [entity_id], exc.sent_at, self.summary)
                if kind == "page" and removed:
                    await self.apply.refresh_includers([entity_id], self._enqueue_reads)
                return f"removed {removed}"
            model: Any = read_model.model_validate(raw)
            old_path = await self.store.path_of(kind, entity_id)
            outcome = await self.apply.write(kind, model, self.summary, read_at)
            if kind == "page" and outcome not in ("unchanged", "stale"):
                await self.apply.refresh_includers([entity_id], self._enqueue_reads)
            await self._refresh_linkers(kind, entity_id, old_path)
            if kind == "chapter" and MOVE in hints:
                await self._place_pages(model.pages, f"chapter {entity_id}", read_at)
            if kind == "book" and (SORT in hints or SUBTREE in hints):
                await self._book_contents(model, SUBTREE in hints, read_at)
            from_bookstack = bool({"webhook", "audit"} & set((job.sources or "").split(",")))
            if kind == "book" and SORT in hints:
                await self._resort_later(model.id)
            elif kind in ("page", "chapter") and (
                from_bookstack or outcome not in ("unchanged", "stale")
            ):
                await self._resort_later(model.book_id)
            if kind == "chapter" and SUBTREE in hints:
                await self._subtree("/api/pages", {"chapter_id": entity_id}, "page")
            if kind == "shelf" and SUBTREE in hints:
                # Book → shelf conversion renamed or destroyed the book silently, and its
                # chapters became books: a listing diff finds all of it for a few requests.
                # Books of the new shelf with no permissions of their own got the shelf's
                # after their own events (HierarchyTransformer): their permissions are read.
                await self.queue.enqueue(DIFF_KEY, [FETCH])
                for book in model.books:
                    await self.queue.enqueue(f"book:{book.id}", [PERMISSIONS], reason="conversion")
            if SUBTREE in hints and kind in ("book", "chapter"):
                # Restored with its pages, and their attachments with them (no event).
                await self.queue.enqueue(ALL_ATTACHMENTS_KEY, [FETCH])
            elif SUBTREE in hints and kind == "page":
                await self.queue.enqueue(f"{ATTACHMENTS_KIND}:{entity_id}", [FETCH])
            if kind == "book" and outcome == "created":
                # Back from the recycle bin (or visible again): on its old shelves again.
                await self.apply.reshelve(self._enqueue_reads)
            if DEFAULT_PERMISSIONS in hints and PERMISSIONS not in hints:
                await self._default_permissions(kind, model, read_at)
        else:
            outcome = "permissions only"
        if PERMISSIONS in hints:
            await self._permissions(kind, entity_id)
        return outcome

    async def _resort_later(self, book_id: int) -> None:
        """A change inside a book with a sort rule (or its sort) is followed by a silent
        re-sort of the book's contents, after the webhook went out (BaseRepo::sortParent):
        its contents are read again once that is done, for one request."""
        book = await self.store.get("book", book_id)
        if book is not None and book["sort_rule_id"] is not None:
            await self.queue.enqueue(
                f"{CONTENTS_KIND}:{book_id}", [FETCH], delay=RESORT_DELAY, reason="sort rule"
            )

    async def _resorted(self, book_id: int) -> str:
        """The priorities of a book's contents after a silent re-sort: one book read."""
        try:
            raw, read_at = await self.client.read(f"/api/books/{book_id}")
        except NotFound:
            await self.queue.enqueue(f"book:{book_id}", [FETCH], reason="sort rule")
            return "book gone"
        model = m.Book.model_validate(raw)
        outcome = await self.apply.write("book", model, self.summary, read_at)
        await self._book_contents(model, False, read_at)
        return f"contents read, book {outcome}"

    async def _sort_rule(self, job: Job) -> str:
        """A rule changed: BookStack re-sorts every book using it (sort_rule_update), or, when
        it is deleted, clears those books' sort_rule_id and moves their updated_at, with no
        event of theirs (FACTS, first section)."""
        books = await self.store.books_sorted_by(job.entity_id)
        # BookStack re-sorts the rule's books one after another after the webhook: the more
        # books, the longer before the last is done.
        delay = min(RESORT_DELAY + 0.1 * len(books), 60.0)
        for book_id in books:
            if SORT in job.hints:
                await self.queue.enqueue(
                    f"{CONTENTS_KIND}:{book_id}", [FETCH], delay=delay, reason="sort rule"
                )
            else:
                await self.queue.enqueue(f"book:{book_id}", [FETCH], reason="sort rule deleted")
        return f"{len(books)} book(s)"

    async def _default_permissions(self, kind: str, model: Any, read_at: float) -> None:
        """A created item's content permissions, known without a read: inheriting, no rows
        of its own, owned by its owner (see DEFAULT_PERMISSIONS). An item with a permission
        row already (set since, and read) keeps it."""
        perms = {
            "owner_id": model.owned_by,
            "inheriting": True,
            "fallback": {},
            "role_permissions": [],
        }
        async with self.store.transaction() as tx:
            await tx.set_permissions(CONTENT_TYPES[kind], model.id, perms, read_at, only_new=True)

    async def _refresh_linkers(self, kind: str, entity_id: int, old_path: str | None) -> None:
        """A rename or move changed the item's URL: BookStack rewrote the links to it in other
        pages without an event (FACTS 2.5). The mirror still has the old URL, so the pages
        holding it are known: read them now rather than at the next periodic diff."""
        if old_path is None:
            return
        new_path = await self.store.path_of(kind, entity_id)
        if new_path == old_path:
            return
        # Pages whose URL changed with it: itself, or every page of a renamed book.
        if kind == "page":
            moved_pages: set[int] = {entity_id}
        elif kind == "book":
            moved_pages = await self.store.pages_of_book(entity_id)
        else:
            moved_pages = set()
        linkers = await self.store.pages_linking(old_path, moved_pages)
        linkers.discard(entity_id if kind == "page" else -1)
        for page_id in sorted(linkers):
            await self.queue.enqueue(f"page:{page_id}", [FETCH], reason="link rewrite")
        if linkers:
            log.info(
                "links rewritten by BookStack: re-reading",
                old=old_path,
                new=new_path,
                pages=len(linkers),
            )

    async def _enqueue_reads(self, kind: str, ids: list[int], reason: str) -> bool:
        """Re-reads as jobs of their own (apply.Reread): each coalesces with any other work
        on its entity, and their own follow-ups (an includer's includers) come with them."""
        for entity_id in ids:
            await self.queue.enqueue(f"{kind}:{entity_id}", [FETCH], reason=reason)
        return True

    async def _permissions(self, kind: str, entity_id: int) -> bool:
        content_type = CONTENT_TYPES[kind]
        if await self.store.get(kind, entity_id) is None:
            # Permissions hang on their item (DESIGN 13): read the item first, then them.
            await self.queue.enqueue(f"{kind}:{entity_id}", [FETCH, PERMISSIONS])
            return False
        try:
            return await self.apply.read_permissions(content_type, entity_id, self.summary)
        except NotFound:
            # The item itself is gone or hidden: its own read settles the mirror.
            await self.queue.enqueue(f"{kind}:{entity_id}", [FETCH])
            return False

    async def _place_pages(self, pages: list[Any], where: str, read_at: float) -> set[int]:
        """Pages moved with their chapter or by a sort: patch their placement from the list
        items of a parent read at `read_at`; read only pages whose content may have changed
        too. Returns the chapters the pages were in before (they may be gone now)."""
        mirror = await self.store.index(
            "page", ("revision_count", "name", "chapter_id", *PLACEMENT_FIELDS)
        )
        to_read: list[int] = []
        moved: list[tuple[int, str | None]] = []
        left: set[int] = set()
        async with self.store.transaction() as tx:
            for item in pages:
                if getattr(item, "draft", False):
                    continue
                current = mirror.get(item.id)
                row = to_row("page", item)
                same_content = (
                    current is not None
                    and current["name"] == row["name"]
                    and (
                        row.get("revision_count") in (None, 0)
                        or current["revision_count"] == row["revision_count"]
                    )
                )
                if not same_content:
                    to_read.append(item.id)
                    continue
                assert current is not None
                patch = {
                    f: row[f]
                    for f in PLACEMENT_FIELDS
                    if row.get(f) is not None or f == "chapter_id"
                }
                if any(current[f] != v for f, v in patch.items()):
                    old_path = await self.store.path_of("page", item.id)
                    if await tx.patch("page", item.id, patch, read_at):
                        moved.append((item.id, old_path))
                        if current["chapter_id"] and current["chapter_id"] != row["chapter_id"]:
                            left.add(current["chapter_id"])
        for page_id in to_read:
            await self.queue.enqueue(f"page:{page_id}", [FETCH])
        for page_id, old_path in moved:
            await self._refresh_linkers("page", page_id, old_path)
        log.info("pages placed", where=where, pages=len(pages), reads=len(to_read))
        return left

    async def _book_contents(self, book: Any, subtree: bool, read_at: float) -> None:
        chapter_pages: list[Any] = []
        seen_pages: set[int] = set()
        seen_chapters: set[int] = set()
        chapters_now = await self.store.index("chapter", ("book_id", "name", "slug", "priority"))
        async with self.store.transaction() as tx:
            for item in book.contents:
                if item.type == "chapter":
                    seen_chapters.add(item.id)
                    current = chapters_now.get(item.id)
                    patch = {
                        "book_id": book.id,
                        "priority": item.priority or 0,
                        "slug": item.slug,
                        "updated_at": item.updated_at,
                    }
                    if current is None or current["name"] != item.name:
                        await self.queue.enqueue(f"chapter:{item.id}", [FETCH], tx=tx)
                    elif any(current.get(k) != v for k, v in patch.items()):
                        await tx.patch("chapter", item.id, patch, read_at)
                    for page in item.pages:
                        page.book_id = book.id
                        page.chapter_id = item.id
                        chapter_pages.append(page)
                elif not item.draft:
                    item.book_id = book.id
                    item.chapter_id = None
                    chapter_pages.append(item)
        seen_pages = {p.id for p in chapter_pages}
        left = await self._place_pages(chapter_pages, f"book {book.id}", read_at)
        # Whatever the mirror still places in this book but the book no longer holds moved
        # to another book or went away: its own read says which.
        for page_id, row in (await self.store.index("page", ("book_id",))).items():
            if row["book_id"] == book.id and page_id not in seen_pages:
                await self.queue.enqueue(f"page:{page_id}", [FETCH])
        for chapter_id, row in chapters_now.items():
            if row["book_id"] == book.id and chapter_id not in seen_chapters:
                await self.queue.enqueue(f"chapter:{chapter_id}", [FETCH])
        if subtree:
            # A chapter → book conversion destroys the chapter its pages came from, with no
            # event (FACTS 2.3): its read finds it gone.
            for chapter_id in sorted(left - seen_chapters):
                await self.queue.enqueue(f"chapter:{chapter_id}", [FETCH])
            # Children that reappeared (restore) or moved in (conversion) need their own
            # permissions too; placing them above only enqueued reads of unknown pages.
            for page in chapter_pages:
                if await self.store.get("page", page.id) is None:
                    await self.queue.enqueue(f"page:{page.id}", [FETCH, PERMISSIONS])
            for chapter_id in seen_chapters:
                if chapter_id not in chapters_now:
                    await self.queue.enqueue(f"chapter:{chapter_id}", [FETCH, PERMISSIONS])

    async def _subtree(self, endpoint: str, filters: dict[str, Any], kind: str) -> None:
        rows = await self.client.list_all(endpoint, filters={**filters, "draft": 0})
        mirror = await self.store.index(kind, ("updated_at",))
        for raw in rows:
            if raw["id"] not in mirror:
                await self.queue.enqueue(f"{kind}:{raw['id']}", [FETCH, PERMISSIONS])
            elif mirror[raw["id"]].get("updated_at") != listed(kind, raw).get("updated_at"):
                await self.queue.enqueue(f"{kind}:{raw['id']}", [FETCH])

    # ---- users and roles --------------------------------------------------------------------

    async def _identity(self, job: Job) -> str:
        kind, entity_id = job.kind, job.entity_id
        endpoint, _, read_model = ENDPOINTS[kind]
        try:
            raw, read_at = await self.client.read(f"{endpoint}/{entity_id}")
        except NotFound as exc:
            self._settle_if(job, EXPECT_PRESENT, "not visible yet")
            members = await self.store.role_members(entity_id) if kind == "role" else set()
            removed = await self.apply.remove(kind, [entity_id], exc.sent_at, self.summary)
            if kind == "role" and ROLES_REFRESH in job.hints:
                await self._refresh_roles(len(members))
            if kind == "user" and removed:
                await self._reowned(entity_id, job.newest_event)
            return f"removed {removed}"
        self._settle_if(job, EXPECT_GONE, "still there")
        model = read_model.model_validate(raw)
        return await self.apply.write(kind, model, self.summary, read_at)

    async def _reowned(self, user_id: int, deleted_at: float | None) -> None:
        """Deleting a user can hand their content to another user (`migrateOwnership`, one
        bulk update per type, no events), which moves each item's updated_at: the listings
        of what changed since the delete show the new owners, a few listing requests in all
        instead of a read per item (an `owners` job, after RACE_WINDOW, so that the rows it
        confirms are not within the second of their change). Without the delete's time,
        each item's owner is read."""
        if deleted_at is None:
            for content_type, content_id in await self.store.owned_by(user_id):
                kind = KIND_OF_CONTENT_TYPE[content_type]
                await self.queue.enqueue(f"{kind}:{content_id}", [PERMISSIONS], reason="owner")
            return
        await self.queue.enqueue(
            f"{OWNERS_KIND}:{user_id}",
            [FETCH],
            payload={"since": deleted_at},
            delay=RACE_WINDOW + 1,
            reason="owner",
        )

    async def _owners(self, job: Job) -> str:
        user_id, deleted_at = job.entity_id, float(job.payload["since"])
        # The filter compares with the stored column, which holds BookStack's APP_TIMEZONE
        # (UTC by default; up to 14 h off otherwise), in MySQL's own format: the window
        # reaches back far enough for any zone. Only rows that were the user's are taken.
        since = datetime.fromtimestamp(deleted_at - OWNER_WINDOW, UTC).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        taken = 0
        for kind in CONTENT_TYPES:
            filters: dict[str, Any] = {"updated_at:gte": since}
            if kind == "page":
                filters["draft"] = 0
            rows, read_at = await self.client.list_timed(ENDPOINTS[kind][0], filters=filters)
            mirror = await self.store.index(kind, ("owned_by",), ids=[r["id"] for r in rows])
            was_theirs = [r for r in rows if mirror.get(r["id"], {}).get("owned_by") == user_id]
            for raw in await self.apply.take_owners(kind, was_theirs, read_at):
                await self.queue.enqueue(f"{kind}:{raw['id']}", [FETCH], reason="owner")
            taken += len(was_theirs)
        return f"{taken} item(s) handed on"

    async def _refresh_roles(self, migrated: int) -> None:
        """A deleted role's members may have moved to another role, silently (FACTS 2.5):
        `$newRole->users()->sync($members)` leaves the target with exactly those members, so
        it now counts `migrated` users (a role with none empties the target). Re-read the
        roles with that count, and any whose count no longer matches the mirror: one listing
        and a read or two."""
        rows = await self.client.list_all("/api/roles")
        mirror = await self.store.index("role", ("users_count",))
        for raw in rows:
            current = mirror.get(raw["id"])
            count = raw.get("users_count")
            candidate = migrated > 0 and count == migrated
            if current is None or current["users_count"] != count or candidate:
                await self.queue.enqueue(f"role:{raw['id']}", [FETCH], reason="role migration")

    # ---- recycle bin ------------------------------------------------------------------------

    async def _deletion(self, job: Job) -> str:
        entity = job.payload.get("entity") or await self._deletion_entity(job.entity_id)
        if RESOLVE_RESTORE in job.hints:
            if entity is None:
                # The deletion is gone already and the audit row was not at hand: a listing
                # diff finds what came back.
                await self.queue.enqueue(DIFF_KEY, [FETCH])
                return "restore: diff"
            await self.queue.enqueue(
                entity, [FETCH, PERMISSIONS, SUBTREE, EXPECT_PRESENT], reason="recycle_bin_restore"
            )
            return f"restore: {entity}"
        if entity is not None and await self.store.get(*_split(entity)) is not None:
            await self.queue.enqueue(entity, [FETCH])
            return f"destroy: recheck {entity}"
        return "destroy: nothing mirrored"

    async def _deletion_entity(self, deletion_id: int) -> str | None:
        try:
            rows = await self.client.list_all("/api/recycle-bin", filters={"id": deletion_id})
        except (ForbiddenError, NotFound) as exc:
            # The job goes on without it (a restore falls back to a listing diff).
            log.info("recycle bin not readable for this deletion", error=str(exc))
            return None
        for row in rows:
            kind = KIND_OF_CONTENT_TYPE.get(str(row.get("deletable_type")))
            if row.get("id") == deletion_id and kind and isinstance(row.get("deletable_id"), int):
                return f"{kind}:{row['deletable_id']}"
        return None

    # ---- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _settle_if(job: Job, hint: str, why: str) -> None:
        if hint in job.hints and job.attempts < len(SETTLE_DELAYS):
            raise Settle(f"{job.key} {why}", SETTLE_DELAYS[job.attempts])


def _split(key: str) -> tuple[str, int]:
    kind, _, raw = key.partition(":")
    return kind, int(raw)
