"""The one way to put what BookStack shows into the mirror: write an entity, remove one found
gone, read permissions, diff attachments, take over owners, and re-read what BookStack changes
along with an entity without saying so. The handlers (one job at a time) and the reconciler
(a diff sync) both write through here."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Awaitable, Callable, Iterable, Set
from dataclasses import dataclass, field
from typing import Any

from eventsync.bookstack import models as m
from eventsync.bookstack.client import BookStackClient
from eventsync.errors import AuthError, BookStackError, NotFound
from eventsync.events import as_id, parse_time
from eventsync.records import ENDPOINTS, LISTED_FIELDS, listed, permissions_row, to_row
from eventsync.store.base import CONTENT_TYPES, KINDS, Store

# A row whose updated_at is this close to our last read of it may have changed again within
# the same second after the read: BookStack's timestamps have one-second resolution, so the
# listing could not show that change. Such rows are re-read on the next diff sync.
RACE_WINDOW = 2.0

# Sync-state key (see store/SCHEMA.md): why events may have been lost, until a thorough diff
# sync ran. The poller sets it; the diff job that closes it clears it.
AUDIT_GAP = "audit_gap"


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


# Reads entities of one kind again, with the reason: the handlers queue a job for each (they
# run one job at a time), a diff sync reads them there and then. True when every one was
# read (or queued): only then is what asked for them forgotten.
Reread = Callable[[str, list[int], str], Awaitable[bool]]


def permissions_path(content_type: str, content_id: int) -> str:
    return f"/api/content-permissions/{content_type}/{content_id}"


class Apply:
    """Writes one BookStack source's reads into one store."""

    def __init__(
        self,
        client: BookStackClient,
        store: Store,
        *,
        concurrency: int = 8,
        attachment_content: bool = False,
    ) -> None:
        self.client = client
        self.store = store
        self.concurrency = concurrency
        self.attachment_content = attachment_content

    # ---- one entity -------------------------------------------------------------------------

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

    async def remove(
        self,
        kind: str,
        ids: Iterable[int],
        at: float | None,
        summary: SyncSummary | None = None,
    ) -> int:
        """Remove entities found gone (a 404, or missing from a whole listing) by a request
        sent at `at`, cascading to what BookStack hides with them, in one transaction; returns
        the entities removed. One read after `at` (written by a job beside a diff sync) is not
        gone: the store leaves it alone."""
        wanted = sorted(ids)
        if not wanted:
            return 0
        removed = 0
        async with self.store.transaction() as tx:
            for entity_id in wanted:
                count = await tx.delete(kind, entity_id, at)
                removed += count
                if count and summary is not None:
                    summary.kinds[kind].add("deleted")
                    if kind == "page":
                        summary.changed_pages.add(entity_id)
        return removed

    async def read_permissions(
        self,
        content_type: str,
        content_id: int,
        summary: SyncSummary | None = None,
        *,
        fallback_owner: int | None = None,
    ) -> bool:
        """Read one item's content permissions and write them; True if they changed. The
        client's errors (a 404 included) go to the caller: what they mean differs between a
        job and a diff sync."""
        raw, read_at = await self.client.read(permissions_path(content_type, content_id))
        perms = permissions_row(m.ContentPermissions.model_validate(raw))
        async with self.store.transaction() as tx:
            changed = await tx.set_permissions(
                content_type, content_id, perms, read_at, fallback_owner=fallback_owner
            )
        if summary is not None:
            summary.permissions.add("updated" if changed else "unchanged")
        return changed

    # ---- what listing rows say --------------------------------------------------------------

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

    async def write_listed(self, kind: str, rows: list[dict[str, Any]], read_at: float) -> Tally:
        """Write listing rows of a kind whose listing carries everything the mirror keeps
        (attachments, users), reading only what changed."""
        summary = SyncSummary()
        mirror = await self.store.index(kind, LISTED_FIELDS[kind])
        await self.write_rows(kind, rows, mirror, summary, read_at)
        return summary.kinds[kind]

    async def write_rows(
        self,
        kind: str,
        rows: list[dict[str, Any]],
        mirror: dict[int, dict[str, Any]],
        summary: SyncSummary,
        read_at: float,
    ) -> None:
        """Write the listing rows that differ from `mirror` (the mirror's listed fields of
        them), counting the rest unchanged."""
        model = ENDPOINTS[kind][1]
        if kind == "attachment":
            # BookStack lists attachments of binned pages too: only those of mirrored pages.
            pages = await self.store.present("page", {r.get("uploaded_to") for r in rows})
            rows = [r for r in rows if r.get("uploaded_to") in pages]
        # The listing shows every field the mirror keeps, except an attachment's content: a
        # file replaced within the second of our last read shows no change but updated_at's.
        check_race = kind == "attachment" and self.attachment_content
        now = time.time()
        changed = [
            r
            for r in rows
            if r["id"] not in mirror
            or differs(mirror[r["id"]], listed(kind, r))
            or (check_race and racy(mirror[r["id"]], now))
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
        await self.write_rows("attachment", rows, mirror, summary, listed_at)
        gone = set(mirror) - {r["id"] for r in rows}
        await self.remove("attachment", gone, listed_at, summary)
        return summary.kinds["attachment"]

    # ---- what BookStack changes along with an entity, silently ------------------------------

    async def reshelve(self, reread: Reread) -> None:
        """A book came back (restored from the recycle bin, or visible again): BookStack
        shows it again on the shelves that held it, without a shelf event or any change a
        shelf listing would show (FACTS 2.1). Those shelves are read again."""
        shelves = await self.store.shelves_of_returned_books()
        if not shelves:
            return
        # Forgotten only once read (or queued): a failed read leaves them for the next diff
        # sync to find again.
        if await reread("shelf", sorted(shelves), "reshelve"):
            async with self.store.transaction() as tx:
                await tx.forget_tombstones(shelves)

    async def refresh_includers(
        self, pages: Iterable[int], reread: Reread, *, read: Set[int] = frozenset()
    ) -> bool:
        """Pages that include one of `pages` render it into their html (FACTS 2.5, no
        event): read them again, except those in `read` (read since they changed). False
        when there were none. Their own reads, if they change them, go on to their own
        includers in turn, so nested includes follow and an unchanged read ends the chain."""
        todo = await self.store.includers(pages) - read
        if not todo:
            return False
        await reread("page", sorted(todo), "include")
        return True


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


def racy(current: dict[str, Any], now: float) -> bool:
    """Was this mirrored row read within RACE_WINDOW of its own change (so that a second
    change in the same second may be missing), in the last day?"""
    updated = parse_time(current.get("updated_at"))
    fetched = current.get("fetched_at")
    if updated is None or fetched is None:
        return False
    return updated >= fetched - RACE_WINDOW and now - fetched < 86400
