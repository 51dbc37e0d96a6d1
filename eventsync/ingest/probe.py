"""The silent-change probe: what moves `updated_at` or a listing's `total` without any event.

Attachments log nothing and send nothing; ownership migration and link rewrites move items'
`updated_at` silently (FACTS, first section). On every audit-log poll the probe reads each
listing's most recently updated rows (`sort=-updated_at`, one request per kind) and acts only
on what differs from the mirror: a content item that moved is read (its job, coalesced with
any other), an attachment is written from its listing row, and a `total` that the mirror
cannot explain starts the listing diff of that kind; and the {is_restricted} search shows
items whose permissions became (or stopped being) their own without an event. The cost is one
request per probed kind per poll, plus about one for the search, whatever the wiki's size.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from eventsync.apply import Apply, differs
from eventsync.bookstack.client import SEARCH_COUNT, BookStackClient
from eventsync.errors import AuthError, BookStackError
from eventsync.events import ALL_ATTACHMENTS_KEY, DIFF_KEY, FETCH, PERMISSIONS
from eventsync.logging import get_logger
from eventsync.records import ENDPOINTS, LISTED_FIELDS, listed
from eventsync.store.base import KIND_OF_CONTENT_TYPE, JobQueue, Store

log = get_logger("eventsync.probe")

# Kinds whose items change without an event, in the order they are probed.
PROBED = ("attachment", "page", "chapter", "book", "shelf")
# Rows per probe request: a request costs the same whatever its count, so take enough to
# cover a burst of silent changes between two polls (a user delete migrating many items).
PROBE_COUNT = 100
# Polls to wait after the restricted search failed (an old BookStack, or no search access).
SEARCH_BACKOFF = 20
# A total the mirror cannot explain is acted on only when it persists this many probes: in
# between, the jobs of the events behind it (creates, deletes) are usually still running.
TOTAL_PATIENCE = 2


@dataclass
class ProbeResult:
    requests: int = 0
    reads: int = 0  # content items whose job was queued
    attachments: int = 0  # attachment rows written from the probe's listing
    diffs: list[str] = field(default_factory=list)  # listing diffs started, by kind
    permissions: int = 0  # items whose content permissions were queued for a read


class Probe:
    def __init__(
        self,
        client: BookStackClient,
        store: Store,
        queue: JobQueue,
        apply: Apply,
        *,
        kinds: Sequence[str] = PROBED,
        count: int = PROBE_COUNT,
        search: bool = True,
    ) -> None:
        self.client = client
        self.store = store
        self.queue = queue
        self.apply = apply
        self.kinds = tuple(kinds)
        self.count = count
        self._attachment_total: int | None = None  # the attachments listing's last total
        self._unexplained: dict[str, int] = {}  # kind → consecutive probes off in total
        self.search = search
        self._search_wait = 0  # polls to skip before the next restricted search

    async def probe_once(self) -> ProbeResult:
        result = ProbeResult()
        for kind in self.kinds:
            try:
                await self._probe(kind, result)
            except AuthError:
                raise
            except BookStackError as exc:
                # The next poll probes again; nothing is concluded from a failed request.
                log.warning("silent-change probe failed", kind=kind, error=str(exc))
        if self.search:
            await self._restricted(result)
        if result.reads or result.attachments or result.diffs or result.permissions:
            log.info(
                "silent changes found",
                reads=result.reads,
                permission_reads=result.permissions,
                attachments=result.attachments,
                diffs=result.diffs,
            )
        return result

    async def _restricted(self, result: ProbeResult) -> None:
        """Which items have permissions of their own (the {is_restricted} search), against
        what the mirror holds: a shelf's permissions copied to its books, silently, make
        them restricted (FACTS, first section). Items whose status changed either way have
        their permissions read. A search of several pages runs only every as many polls, so
        that it costs one request per poll on average."""
        if self._search_wait > 0:
            self._search_wait -= 1
            return
        try:
            found = await self.client.search_all("{is_restricted}")
        except AuthError:
            raise
        except BookStackError as exc:
            # Where search cannot be had or trusted, the sweep and the diff read instead.
            log.debug("restricted search failed", error=str(exc))
            self._search_wait = SEARCH_BACKOFF
            return
        per_type = Counter(content_type for content_type, _ in found)
        pages = max(1, math.ceil(max(per_type.values(), default=0) / SEARCH_COUNT))
        result.requests += pages
        self._search_wait = pages - 1
        changed = found ^ await self.store.restricted_keys()
        for content_type, content_id in sorted(changed):
            kind = KIND_OF_CONTENT_TYPE.get(content_type)
            if kind is None or not await self.store.present(kind, [content_id]):
                continue  # not mirrored (a draft, or not read yet): its own read decides
            key = f"{kind}:{content_id}"
            if key not in await self.queue.pending_keys(kind):
                await self.queue.enqueue(key, [PERMISSIONS], reason="restricted search")
                result.permissions += 1

    async def _probe(self, kind: str, result: ProbeResult) -> None:
        endpoint = ENDPOINTS[kind][0]
        filters = {"draft": 0} if kind == "page" else None
        rows, total, sent_at = await self.client.recent(endpoint, self.count, filters=filters)
        result.requests += 1
        mirror = await self.store.index(kind, LISTED_FIELDS[kind])
        if kind == "attachment":
            # Attachments of pages the mirror does not hold (binned ones) stay out.
            pages = await self.store.ids("page")
            rows = [r for r in rows if r.get("uploaded_to") in pages]
        moved = [
            r for r in rows if r["id"] not in mirror or differs(mirror[r["id"]], listed(kind, r))
        ]
        if kind == "attachment":
            created = sum(1 for r in moved if r["id"] not in mirror)
            await self._attachments(moved, created, total, sent_at, result)
            return
        pending = await self.queue.pending_keys(kind)
        # An ownership migration is written from the row itself; the rest is read.
        moved = await self.apply.take_owners(kind, moved, sent_at)
        for row in moved:
            key = f"{kind}:{row['id']}"
            if key in pending:
                continue  # its job reads it anyway
            await self.queue.enqueue(key, [FETCH], reason="silent change")
            result.reads += 1
        # Deletes that no event reported show only in the total. Creates and deletes with
        # events make it differ for a moment; a difference that outlives their jobs does not.
        if total != len(mirror) and not pending:
            self._unexplained[kind] = self._unexplained.get(kind, 0) + 1
            if self._unexplained[kind] >= TOTAL_PATIENCE:
                self._unexplained[kind] = 0
                await self.queue.enqueue(DIFF_KEY, [FETCH], reason=f"{kind} total")
                result.diffs.append(kind)
        else:
            self._unexplained.pop(kind, None)

    async def _attachments(
        self,
        moved: list[dict[str, Any]],
        created: int,
        total: int,
        sent_at: float,
        result: ProbeResult,
    ) -> None:
        # The listing shows attachments of binned pages, which the mirror leaves out: its
        # total is compared with the last probe's, not with the mirror.
        previous, self._attachment_total = self._attachment_total, total
        if moved:
            tally = await self.apply.write_listed("attachment", moved, sent_at)
            result.attachments += tally.created + tally.updated
        if previous is not None and total != previous + created:
            # One went away (or more came than the newest rows show): diff them all.
            await self.queue.enqueue(ALL_ATTACHMENTS_KEY, [FETCH], reason="attachment total")
            result.diffs.append("attachment")
