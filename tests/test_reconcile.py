"""The diff full sync, `Reconciler.full_sync`, called directly (DESIGN guarantees 5 and 6).

Real parts only: the fake BookStack over HTTP on 127.0.0.1 and a real SQLite file in tmp_path.
Each test checks the mirror against `fake.truth()` field by field and counts the fake's request
log by route. So a sync that reads more than it needs fails here, and so does one that removes
rows on a listing it could not trust.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import client_for, first_difference, mirror_settings

import eventsync.testing.server as fake_server
from eventsync.app import open_app
from eventsync.apply import SyncSummary
from eventsync.bookstack.client import BookStackClient
from eventsync.bookstack.ratelimit import default_burst
from eventsync.reconcile import AUDIT_CURSOR, LAST_FULL_SYNC, Reconciler
from eventsync.store.mirror import SECTION_OF, Store
from eventsync.testing import FakeBookStack
from eventsync.testing.models import Entity, Page
from eventsync.testing.state import ADMIN_USER_ID

RPM = 100_000  # neither side throttles unless a test says so
MAX_COUNT = 500  # rows per listing request
SMALL: dict[str, Any] = {
    "pages": 30,
    "books": 4,
    "chapters_per_book": 2,
    "shelves": 2,
    "users": 5,
    "roles": 3,
    "attachments": 6,
    "permission_share": 0.1,
    "seed": 7,
}
TINY: dict[str, Any] = {
    "pages": 8,
    "books": 2,
    "chapters_per_book": 1,
    "shelves": 1,
    "users": 2,
    "roles": 1,
    "attachments": 2,
    "permission_share": 0.2,
    "seed": 3,
}
NO_ACCESS = {"view": False, "create": False, "update": False, "delete": False}
FULL_ACCESS = {"view": True, "create": True, "update": True, "delete": True}

# Listing endpoint of each export section, and of each mirror kind.
LISTING = {
    "shelf": "/api/shelves",
    "book": "/api/books",
    "chapter": "/api/chapters",
    "page": "/api/pages",
    "attachment": "/api/attachments",
    "user": "/api/users",
    "role": "/api/roles",
}
# BookStack's content type of each content kind (content-permission URLs).
CONTENT_TYPE = {"shelf": "bookshelf", "book": "book", "chapter": "chapter", "page": "page"}
READ_ROUTE = {kind: f"{LISTING[kind]}/{{id}}" for kind in LISTING}
PERMISSIONS_ROUTE = "/api/content-permissions/{type}/{id}"
SEARCH_ROUTE = "/api/search"
AUDIT_ROUTE = "/api/audit-log"
INCLUDE = re.compile(r"\{\{@\s?(\d+)")

FakeFactory = Callable[..., Awaitable[FakeBookStack]]
Clock = Callable[[], datetime]


# ---- fixtures (factories) -------------------------------------------------------------------


@pytest.fixture
async def make_fake() -> AsyncIterator[FakeFactory]:
    """Factory: a started fake BookStack with a seeded wiki (SMALL unless overridden)."""
    fakes: list[FakeBookStack] = []

    async def make(
        *, requests_per_minute: int = RPM, clock: Clock | None = None, **seed: Any
    ) -> FakeBookStack:
        fake = FakeBookStack(requests_per_minute=requests_per_minute, clock=clock)
        await fake.start()
        fakes.append(fake)
        fake.seed(**{**SMALL, **seed})
        return fake

    yield make
    for fake in fakes:
        await fake.stop()


@dataclass
class Rig:
    """One fake BookStack, one client, one mirror file and the reconciler between them."""

    fake: FakeBookStack
    client: BookStackClient
    store: Store
    reconciler: Reconciler

    async def sync(self, **options: Any) -> SyncSummary:
        """A full sync with a fresh request log, so the log holds this sync's requests only."""
        self.fake.reset_requests()
        return await self.reconciler.full_sync(**options)

    async def mirror(self) -> dict[str, Any]:
        return await self.store.export()


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[RigFactory]:
    """Factory: a client (tiny backoffs) and a fresh SQLite mirror for `fake`."""
    async with AsyncExitStack() as stack:
        count = itertools.count(1)

        async def make(
            fake: FakeBookStack,
            *,
            requests_per_minute: float = RPM,
            max_attempts: int = 2,
            **client_options: Any,
        ) -> Rig:
            client = client_for(
                fake,
                requests_per_minute=requests_per_minute,
                max_attempts=max_attempts,
                **client_options,
            )
            settings = mirror_settings(fake, tmp_path / f"mirror-{next(count)}.db")
            app = await stack.enter_async_context(open_app(settings, client=client))
            return Rig(fake, app.client, app.store, app.reconciler)

        yield make


# ---- helpers --------------------------------------------------------------------------------


def ticking_clock() -> Clock:
    """A BookStack clock a week in the past, one second further on every reading: whatever
    a mutation touches gets a new `updated_at`, and none is close enough to the time of our
    reads to count as racy (apply.RACE_WINDOW), so the read sets below are exact."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=7)
    ticks = itertools.count()
    return lambda: start + timedelta(seconds=next(ticks))


def assert_mirror_is_truth(mirror: dict[str, Any], truth: dict[str, Any]) -> None:
    assert set(mirror) >= set(truth), f"export lacks sections {set(truth) - set(mirror)}"
    difference = first_difference(mirror, truth)
    assert difference is None, difference


def listing_requests(rows: int) -> int:
    """Requests a listing of `rows` rows takes at 500 a request (an empty one still asks)."""
    return max(1, math.ceil(rows / MAX_COUNT))


def route_counts(fake: FakeBookStack) -> Counter[str]:
    return Counter(r.route for r in fake.requests)


def read_ids(fake: FakeBookStack, kind: str) -> list[int]:
    """Ids read from `kind`'s read endpoint, in request order, repeats kept."""
    prefix = LISTING[kind] + "/"
    return [int(r.path.removeprefix(prefix)) for r in fake.requests if r.route == READ_ROUTE[kind]]


def permission_reads(fake: FakeBookStack) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for r in fake.requests:
        if r.route == PERMISSIONS_ROUTE:
            content_type, content_id = r.path.rsplit("/", 2)[-2:]
            out.append((content_type, int(content_id)))
    return out


def live_ids(truth: dict[str, Any], kind: str) -> set[int]:
    return {row["id"] for row in truth[SECTION_OF[kind]]}


def content_keys(truth: dict[str, Any]) -> set[tuple[str, int]]:
    return {(CONTENT_TYPE[k], i) for k in CONTENT_TYPE for i in live_ids(truth, k)}


def expected_listing_counts(truth: dict[str, Any]) -> Counter[str]:
    return Counter({LISTING[k]: listing_requests(len(truth[SECTION_OF[k]])) for k in LISTING})


def permissions_by_key(doc: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(p["content_type"], p["content_id"]): p for p in doc["permissions"]}


def snapshot(fake: FakeBookStack) -> dict[str, dict[int, tuple[Any, ...]]]:
    """What BookStack's listings show of each live content item, from the fake's own state:
    an item whose tuple changes (or that is new) is an item a diff sync must read."""
    state = fake.state
    tables: dict[str, dict[int, Any]] = {
        "shelf": state.shelves,
        "book": state.books,
        "chapter": state.chapters,
        "page": state.pages,
    }
    out: dict[str, dict[int, tuple[Any, ...]]] = {}
    for kind, table in tables.items():
        items: Iterable[Entity] = state.visible(ADMIN_USER_ID, (table[i] for i in sorted(table)))
        out[kind] = {
            e.id: tuple(
                getattr(e, f, None)
                for f in (
                    "name",
                    "slug",
                    "description",
                    "updated_at",
                    "book_id",
                    "chapter_id",
                    "priority",
                    "revision_count",
                    "template",
                )
            )
            for e in items
            if not (isinstance(e, Page) and e.draft)
        }
    return out


def changed_since(
    before: dict[str, dict[int, tuple[Any, ...]]], after: dict[str, dict[int, tuple[Any, ...]]]
) -> dict[str, set[int]]:
    return {
        kind: {i for i, row in rows.items() if before[kind].get(i) != row}
        for kind, rows in after.items()
    }


def includers(fake: FakeBookStack, page_ids: set[int]) -> set[int]:
    """Live pages whose stored html includes one of `page_ids`, transitively: their rendered
    html embeds those pages, so a diff sync re-reads them with the pages they include."""
    found: set[int] = set()
    frontier = set(page_ids)
    while frontier:
        new = {
            p.id
            for p in fake.state.pages.values()
            if not p.trashed
            and p.id not in found | page_ids
            and frontier & {int(i) for i in INCLUDE.findall(p.html)}
        }
        found |= new
        frontier = new
    return found


def hit_times(fake: FakeBookStack) -> list[float]:
    """Record when each API request reaches the fake's throttle (arrival, before handling)."""
    times: list[float] = []
    original = fake._hit

    def hit(ip: str) -> tuple[bool, dict[str, str]]:
        times.append(time.monotonic())
        return original(ip)

    fake._hit = hit  # type: ignore[method-assign]
    return times


def max_in_window(times: list[float], seconds: float) -> int:
    """Most requests in any half-open window [t, t + seconds) starting at a request."""
    ordered = sorted(times)
    best = 0
    end = 0
    for start, at in enumerate(ordered):
        end = max(end, start)
        while end < len(ordered) and ordered[end] < at + seconds:
            end += 1
        best = max(best, end - start)
    return best


def pick(fake: FakeBookStack, used: set[int], where: Callable[[Page], bool], what: str) -> int:
    """The first live page not used yet that matches `where`."""
    for page_id in sorted(fake.state.pages):
        page = fake.state.pages[page_id]
        if page_id not in used and not page.trashed and not page.draft and where(page):
            used.add(page_id)
            return page_id
    raise AssertionError(f"the seeded wiki has no page that is {what}")


# ---- 1. a first full sync -------------------------------------------------------------------


async def test_first_full_sync_mirrors_everything_with_the_minimum_of_requests(
    make_fake: FakeFactory, make_rig: RigFactory
) -> None:
    # More than 500 pages, chapters, attachments and users: those listings take two requests.
    fake = await make_fake(
        pages=620,
        books=30,
        chapters_per_book=17,
        shelves=4,
        users=505,
        roles=3,
        attachments=510,
        permission_share=0.05,
        seed=11,
    )
    rig = await make_rig(fake)

    summary = await rig.sync()

    assert summary.complete, summary.problems
    truth = fake.truth()
    assert_mirror_is_truth(await rig.mirror(), truth)
    for kind in ("page", "chapter", "attachment", "user"):
        assert len(truth[SECTION_OF[kind]]) > MAX_COUNT, kind

    # Listing pages + one read per shelf, book, chapter, page and role (users and attachments
    # are complete in their listings) + the content permissions of each restricted item, found
    # by the {is_restricted} search (pages of 100 per type) + the audit head.
    restricted = {(p["content_type"], p["content_id"]) for p in truth["permissions"]}
    per_type = Counter(ct for ct, _ in restricted)
    expected = expected_listing_counts(truth)
    for kind in ("shelf", "book", "chapter", "page", "role"):
        expected[READ_ROUTE[kind]] = len(truth[SECTION_OF[kind]])
    expected[PERMISSIONS_ROUTE] = len(restricted)
    expected[SEARCH_ROUTE] = max(1, math.ceil(max(per_type.values()) / 100))
    expected[AUDIT_ROUTE] = 1
    assert route_counts(fake) == expected
    assert all(r.status == 200 for r in fake.requests)
    for kind in ("shelf", "book", "chapter", "page", "role"):
        assert sorted(read_ids(fake, kind)) == sorted(live_ids(truth, kind)), kind
    assert sorted(permission_reads(fake)) == sorted(restricted)
    assert summary.requests == len(fake.requests) == rig.client.stats.requests
    # The page listing asks for published pages only (drafts of the token user are listed).
    assert all(
        r.query.get("filter[draft]") == "0" for r in fake.requests if r.route == "/api/pages"
    )


# ---- 2. nothing changed -----------------------------------------------------------------------


@pytest.mark.parametrize("verify_memberships", [True, False])
async def test_second_sync_with_nothing_changed_reads_no_bodies(
    make_fake: FakeFactory, make_rig: RigFactory, verify_memberships: bool
) -> None:
    # A clock in the past: no item is close enough to the time it was read to count as racy
    # (apply.RACE_WINDOW), which would have it re-read on purpose.
    fake = await make_fake(pages=510, attachments=20, users=8, seed=2, clock=ticking_clock())
    rig = await make_rig(fake)
    assert (await rig.sync()).complete

    summary = await rig.sync(verify_memberships=verify_memberships)

    assert summary.complete, summary.problems
    truth = fake.truth()
    assert_mirror_is_truth(await rig.mirror(), truth)
    expected = expected_listing_counts(truth)
    assert expected["/api/pages"] == 2
    expected[AUDIT_ROUTE] = 1
    expected[SEARCH_ROUTE] = 1
    if verify_memberships:
        # By design a full sync reads every role and every shelf: a swap of members keeps
        # users_count, and neither a role's members nor a shelf's books move a timestamp,
        # so their listings cannot show it.
        expected[READ_ROUTE["role"]] = len(truth["roles"])
        expected[READ_ROUTE["shelf"]] = len(truth["shelves"])
    assert route_counts(fake) == expected
    assert permission_reads(fake) == []
    assert summary.kinds["page"].unchanged == len(truth["pages"])
    assert summary.memberships_changed == 0
    assert summary.permissions.updated == 0


# ---- 3. changes between two syncs -------------------------------------------------------------


async def test_changes_between_syncs_are_mirrored_reading_only_what_changed(
    make_fake: FakeFactory, make_rig: RigFactory
) -> None:
    fake = await make_fake(
        pages=60, books=5, users=6, roles=3, attachments=10, seed=5, clock=ticking_clock()
    )
    state = fake.state
    chapters_of = {b: [c.id for c in state.book_chapters(b)] for b in state.books}
    used: set[int] = set()
    # Books 1-3 are kept whole; book 4 loses chapter c_del and c_move; book 5 is deleted.
    c_del, c_move = chapters_of[4]
    c_sorted = chapters_of[2][0]  # moved to book 1 by a book sort
    stable = {1, 2, 3}

    def loose_in(books: set[int]) -> Callable[[Page], bool]:
        return lambda p: p.book_id in books and not p.chapter_id

    def chaptered_in(books: set[int]) -> Callable[[Page], bool]:
        return lambda p: p.book_id in books and p.chapter_id not in (0, c_sorted)

    # A page that includes the page whose html is edited below: its rendered html changes too.
    p_html = pick(fake, used, loose_in(stable), "loose in books 1-3")
    includer = await fake.create_page(book_id=1, name="Includer", html=f"<p>{{{{@{p_html}}}}}</p>")
    used.add(includer)
    rig = await make_rig(fake)
    assert (await rig.sync()).complete
    truth_before = fake.truth()
    assert_mirror_is_truth(await rig.mirror(), truth_before)
    before = snapshot(fake)

    # Page edits.
    p_md = pick(fake, used, chaptered_in(stable), "in a chapter of books 1-3")
    p_name = pick(fake, used, loose_in(stable), "loose in books 1-3")
    p_tags = pick(fake, used, chaptered_in(stable), "in a chapter of books 1-3")
    await fake.update_page(p_html, html="<p>new html</p>")
    await fake.update_page(p_md, markdown="new *markdown* with [a link](/books/x)")
    await fake.update_page(p_name, name="A page renamed")
    await fake.update_page(p_tags, tags=[("status", "draft"), ("topic", "ops")])
    # Page moves: between books out of a chapter, into a chapter of another book, and out of
    # a chapter within its book.
    p_across = pick(fake, used, chaptered_in({1}), "in a chapter of book 1")
    p_into = pick(fake, used, loose_in({2}), "loose in book 2")
    p_out = pick(fake, used, chaptered_in({3}), "in a chapter of book 3")
    await fake.move_page(p_across, book_id=2)
    await fake.move_page(p_into, chapter_id=chapters_of[3][0])
    await fake.move_page(p_out, book_id=3)
    # A chapter move: its pages follow silently.
    await fake.move_chapter(c_move, 1)
    # A book sort moving a page and a chapter (with its pages) between books.
    p_sorted = pick(fake, used, loose_in({3}), "loose in book 3")
    await fake.sort_book([("page", p_sorted, 1, None, 40), ("chapter", c_sorted, 1, None, 41)])
    # Deletes: a page, a chapter with its pages, a book with its chapters and pages.
    p_del = pick(fake, used, loose_in(stable), "loose in books 1-3")
    await fake.delete_page(p_del)
    await fake.delete_chapter(c_del)
    await fake.delete_book(5)
    # Books and shelves: a rename (links to the book are rewritten silently), new shelf
    # membership, a new shelf.
    await fake.update_book(2, name="Book two renamed")
    await fake.update_shelf(1, books=[3, 1, 2])
    new_shelf = await fake.create_shelf("A new shelf", [4, 1])
    # New content.
    new_chapter = await fake.create_chapter(1, "A new chapter")
    new_page = await fake.create_page(chapter_id=new_chapter, name="A new page", html="<p>x</p>")
    # Permissions: on items the mirror knows (not re-read by default) and on a new page.
    p_perm = pick(fake, used, loose_in(stable), "loose in books 1-3")
    await fake.set_permissions(
        "page", p_perm, fallback=NO_ACCESS, role_permissions=[{"role_id": 3, **FULL_ACCESS}]
    )
    await fake.set_permissions("book", 3, role_permissions=[{"role_id": 2, **NO_ACCESS}])
    await fake.set_permissions("page", new_page, fallback=NO_ACCESS)
    changed_permissions = {("page", p_perm), ("book", 3)}
    # Users and roles, membership included (group sync changes it without any event).
    await fake.update_user(3, name="User three renamed", roles=[3, 5])
    await fake.sso_group_sync(4, [2])
    new_user = await fake.create_user("New user", "new@example.com", roles=[2])
    await fake.delete_user(8)
    new_role = await fake.create_role("New role", ["page-view-all"])
    await fake.update_role(5, description="described again", permissions=["book-view-all"])
    await fake.delete_role(6)
    await fake.update_user(new_user, roles=[2, new_role])
    # Attachments: no events at all.
    some_page = pick(fake, used, loose_in(stable), "loose in books 1-3")
    new_attachment = await fake.create_attachment(some_page, "new.pdf", link="https://x.test/a")
    live_attachments = sorted(a["id"] for a in fake.truth()["attachments"])
    await fake.update_attachment(live_attachments[0], name="renamed attachment")
    await fake.delete_attachment(live_attachments[1])

    truth = fake.truth()
    changed = changed_since(before, snapshot(fake))
    deleted_pages = live_ids(truth_before, "page") - live_ids(truth, "page")
    # Every kind of change above was made (and is in the truth).
    assert {p_html, p_md, p_name, p_tags, p_across, p_into, p_out, p_sorted} <= changed["page"]
    assert {p for p in live_ids(truth, "page") if state.pages[p].chapter_id == c_move} <= changed[
        "page"
    ]
    assert p_del in deleted_pages and new_page in changed["page"]
    assert includer not in changed["page"]  # its listing row says nothing
    assert {c_move, c_sorted, new_chapter} <= changed["chapter"]
    assert {1, new_shelf} <= changed["shelf"]
    assert new_attachment in live_ids(truth, "attachment")

    # ---- the default second sync: content permissions are read only for items the
    # {is_restricted} search shows that the mirror did not know as restricted; what stays
    # restricted is not re-read (events and the sweep do that).
    summary = await rig.sync()

    assert summary.complete, summary.problems
    mirror = await rig.mirror()
    assert_mirror_is_truth({**mirror, "permissions": []}, {**truth, "permissions": []})
    got, want, old = (
        permissions_by_key(mirror),
        permissions_by_key(truth),
        permissions_by_key(truth_before),
    )
    newly_restricted = set(want) - set(old)
    assert ("page", p_perm) in newly_restricted and ("page", new_page) in newly_restricted
    for key in set(got) | set(want):
        if key in changed_permissions and key not in newly_restricted:
            assert got.get(key) == old.get(key) != want.get(key), key
        else:
            assert got.get(key) == want.get(key), key

    expected = expected_listing_counts(truth)
    expected[AUDIT_ROUTE] = 1
    for kind in ("book", "chapter", "page"):
        expected[READ_ROUTE[kind]] = len(changed[kind])
    # Every role and every shelf, by design (their members and books move no timestamp).
    expected[READ_ROUTE["role"]] = len(truth["roles"])
    expected[READ_ROUTE["shelf"]] = len(truth["shelves"])
    expected[PERMISSIONS_ROUTE] = len(newly_restricted)
    expected[SEARCH_ROUTE] = 1
    # Pages that include a changed or deleted page are read too (their rendered html embeds
    # it); anything else read beyond the changed items is a needless request.
    page_reads = set(read_ids(fake, "page"))
    extra_pages = page_reads - changed["page"]
    assert extra_pages <= includers(fake, changed["page"] | deleted_pages), extra_pages
    expected[READ_ROUTE["page"]] += len(extra_pages)
    assert route_counts(fake) == expected
    for kind in ("book", "chapter"):
        assert set(read_ids(fake, kind)) == changed[kind], kind
    assert sorted(read_ids(fake, "shelf")) == sorted(live_ids(truth, "shelf"))
    assert changed["page"] | {includer} <= page_reads
    assert sorted(read_ids(fake, "role")) == sorted(live_ids(truth, "role"))
    assert set(permission_reads(fake)) == newly_restricted

    # ---- a sync asked to re-read all content permissions: now the mirror is the truth.
    summary = await rig.sync(all_permissions=True)

    assert summary.complete, summary.problems
    assert_mirror_is_truth(await rig.mirror(), truth)
    expected = expected_listing_counts(truth)
    expected[AUDIT_ROUTE] = 1
    expected[READ_ROUTE["role"]] = len(truth["roles"])
    expected[READ_ROUTE["shelf"]] = len(truth["shelves"])
    expected[PERMISSIONS_ROUTE] = len(truth["permissions"])
    expected[SEARCH_ROUTE] = 1
    assert route_counts(fake) == expected
    assert set(permission_reads(fake)) == set(want)


async def test_permissions_reread_after_their_owner_was_deleted_equal_the_truth(
    make_fake: FakeFactory, make_rig: RigFactory
) -> None:
    # BookStack leaves owned_by pointing at a deleted user unless ownership is migrated
    # (FACTS 2.5); the truth keeps that id as owner_id. A default sync keeps the owner it read
    # before; a re-read of every item's permissions must not change the mirror's answer.
    fake = await make_fake()
    rig = await make_rig(fake)
    assert (await rig.sync()).complete
    owners = sorted({p["owner_id"] for p in fake.truth()["permissions"]} - {ADMIN_USER_ID})
    assert owners, "the seeded wiki has no permissions owned by another user"
    await fake.delete_user(owners[0])

    summary = await rig.sync()

    assert summary.complete, summary.problems
    assert_mirror_is_truth(await rig.mirror(), fake.truth())

    summary = await rig.sync(all_permissions=True)

    assert summary.complete, summary.problems
    assert_mirror_is_truth(await rig.mirror(), fake.truth())


# ---- 4. a listing that fails or comes back short removes nothing --------------------------


async def _delete_one(fake: FakeBookStack, kind: str) -> int:
    """Delete one item of `kind` in BookStack; returns its id."""
    truth = fake.truth()
    if kind == "page":
        return await fake.delete_page(truth["pages"][0]["id"])
    if kind == "chapter":
        return await fake.delete_chapter(truth["chapters"][0]["id"])
    if kind == "book":
        return await fake.delete_book(truth["books"][-1]["id"])
    if kind == "shelf":
        return await fake.delete_shelf(truth["shelves"][0]["id"])
    if kind == "attachment":
        return await fake.delete_attachment(truth["attachments"][0]["id"])
    if kind == "user":
        return await fake.delete_user(truth["users"][-1]["id"])
    seeded_role = next(r["id"] for r in truth["roles"] if r["display_name"].startswith("Seeded"))
    return await fake.delete_role(seeded_role)


@pytest.mark.parametrize("fault", ["fail", "short"])
@pytest.mark.parametrize("kind", list(LISTING))
async def test_a_failed_or_short_listing_removes_nothing_of_its_kind(
    make_fake: FakeFactory, make_rig: RigFactory, kind: str, fault: str
) -> None:
    fake = await make_fake()
    rig = await make_rig(fake)
    assert (await rig.sync()).complete
    synced_at = await rig.store.get_state(LAST_FULL_SYNC)
    cursor = await rig.store.get_state(AUDIT_CURSOR)
    gone = await _delete_one(fake, kind)
    # Another kind is still diffed as usual.
    other = "attachment" if kind == "shelf" else "shelf"
    other_gone = await _delete_one(fake, other)
    route = LISTING[kind]
    if fault == "fail":
        fake.faults.fail_listings.add(route)  # 500 on every attempt
    else:
        fake.faults.short_listings.add(route)  # every listing page loses its last row

    summary = await rig.sync()

    assert not summary.complete
    assert summary.problems and all(route in p for p in summary.problems), summary.problems
    assert await rig.store.get(kind, gone) is not None, f"{kind} {gone} removed"
    assert await rig.store.get(other, other_gone) is None, f"{other} {other_gone} kept"
    # No sync point from an incomplete sync.
    assert await rig.store.get_state(LAST_FULL_SYNC) == synced_at
    assert await rig.store.get_state(AUDIT_CURSOR) == cursor

    fake.faults.fail_listings.clear()
    fake.faults.short_listings.clear()
    summary = await rig.sync()

    assert summary.complete, summary.problems
    assert await rig.store.get(kind, gone) is None
    assert_mirror_is_truth(await rig.mirror(), fake.truth())


# ---- 5. storms of 429s and 5xx ------------------------------------------------------------------


async def _change_some(fake: FakeBookStack) -> None:
    truth = fake.truth()
    await fake.update_page(truth["pages"][0]["id"], html="<p>changed in a storm</p>")
    await fake.delete_page(truth["pages"][1]["id"])
    await fake.delete_chapter(truth["chapters"][0]["id"])
    await fake.update_shelf(truth["shelves"][0]["id"], books=[truth["books"][-1]["id"]])
    page = fake.truth()["pages"][-1]["id"]
    await fake.create_attachment(page, "storm.txt", link="https://x.test")


async def test_a_429_storm_ends_in_the_truth(
    make_fake: FakeFactory, make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake lets 15 requests through per 0.5 s window and answers 429 with Retry-After
    # (whole seconds, so 1) beyond that, while the client's budget is 6000/min and one sync
    # needs three windows' worth. The fake's X-RateLimit-* headers are dropped: the client
    # lowers its own rate to an advertised limit (right, DESIGN 5, but then it never sees a
    # 429, and at 15/min the test would take minutes). Without them the fake stands for a
    # throttle the client cannot predict: a proxy, or BookStack's per-IP bucket shared with
    # other clients (FACTS §4).
    allowance = 15
    monkeypatch.setattr(fake_server, "RATE_WINDOW", 0.5)
    # Pages enough for three windows' worth of reads (permissions are read only for the
    # restricted few).
    fake = await make_fake(requests_per_minute=allowance, **{**TINY, "pages": 30})
    arrivals: list[tuple[float, bool]] = []
    throttle = fake._hit

    def hit(ip: str) -> tuple[bool, dict[str, str]]:
        limited, headers = throttle(ip)
        arrivals.append((time.monotonic(), limited))
        headers.pop("X-RateLimit-Limit", None)
        headers.pop("X-RateLimit-Remaining", None)
        return limited, headers

    fake._hit = hit  # type: ignore[method-assign]
    rig = await make_rig(fake, requests_per_minute=6000)

    for step in ("first sync", "sync after changes"):
        if step != "first sync":
            await _change_some(fake)
        arrivals.clear()
        hits_before = fake.rate_limit_hits

        summary = await rig.sync()

        assert summary.complete, (step, summary.problems)
        assert_mirror_is_truth(await rig.mirror(), fake.truth())
        assert fake.rate_limit_hits > hits_before, f"{step}: no 429 at all"
        # Retry-After honoured by every task: after a 429 nothing new arrives for a second
        # (what arrives within 0.1 s was sent before the 429 came back).
        for at, limited in arrivals:
            if limited:
                early = [t - at for t, _ in arrivals if at + 0.1 <= t < at + 1.0]
                assert not early, f"{step}: requests {early} s after a 429"
    assert len(arrivals) > 0
    assert fake.rate_limit_hits >= 3, "no storm"
    assert rig.client.stats.rate_limited == fake.rate_limit_hits
    assert rig.client.stats.retries == 0  # 429s are waited out, not retried as failures


@pytest.mark.parametrize("status", [500, 503])
async def test_a_5xx_storm_ends_in_the_truth(
    make_fake: FakeFactory, make_rig: RigFactory, status: int
) -> None:
    fake = await make_fake()
    fake.faults.error_rate = 0.3
    fake.faults.error_status = status
    fake.faults.seed = status
    # Ten attempts: a request failing all of them (0.3**10) would be a failed sync, not a crash.
    rig = await make_rig(fake, max_attempts=10)

    summary = await rig.sync()

    assert summary.complete, summary.problems
    assert_mirror_is_truth(await rig.mirror(), fake.truth())
    errors = sum(1 for r in fake.requests if r.status == status)
    assert errors >= 10, "no storm"
    assert rig.client.stats.retries >= errors

    await _change_some(fake)
    summary = await rig.sync()

    assert summary.complete, summary.problems
    assert_mirror_is_truth(await rig.mirror(), fake.truth())


# ---- 6. the client's budget -----------------------------------------------------------------


async def test_the_rate_limiter_keeps_the_sync_within_its_budget(
    make_fake: FakeFactory, make_rig: RigFactory
) -> None:
    budget = 600  # per minute: 10 a second, with a burst of default_burst(600)
    burst = default_burst(budget)
    fake = await make_fake(**{**TINY, "pages": 30})
    times = hit_times(fake)
    rig = await make_rig(fake, requests_per_minute=budget)

    started = time.monotonic()
    summary = await rig.sync()
    elapsed = time.monotonic() - started

    assert summary.complete, summary.problems
    assert_mirror_is_truth(await rig.mirror(), fake.truth())
    rate = budget / 60
    assert len(times) > burst + 3 * rate, "too short a run to say anything"
    # A token bucket lets through at most burst + rate * T in any window of T seconds: the
    # 60 s window of BookStack's throttle, scaled down.
    for window in (0.5, 1.0, 2.0, 3.0):
        most = max_in_window(times, window)
        assert most <= burst + rate * window, f"{most} requests within {window} s"
    assert elapsed >= (len(times) - burst) / rate * 0.9
    assert rig.client.stats.limiter_waits > 0


# ---- 7. the sync point ----------------------------------------------------------------------


async def test_a_complete_sync_sets_the_sync_point_from_its_start(
    make_fake: FakeFactory, make_rig: RigFactory
) -> None:
    fake = await make_fake()
    for page in fake.truth()["pages"][:3]:
        await fake.update_page(page["id"], html="<p>logged</p>")
    head = fake.state.activities[-1].id
    fake.faults.latency = 0.02  # room for a change while the sync runs
    rig = await make_rig(fake)
    before = datetime.now(UTC)

    audit_read = asyncio.Event()
    record = fake._record

    def record_and_tell(request: web.Request, route: str, status: int) -> None:
        record(request, route, status)
        if route == AUDIT_ROUTE:
            audit_read.set()

    fake._record = record_and_tell  # type: ignore[method-assign]

    task = asyncio.create_task(rig.sync())
    await asyncio.wait_for(audit_read.wait(), 10)
    # Logged after the sync read the audit head: the sync does not cover it.
    await fake.update_book(1, name="Renamed during the sync")
    assert not task.done()
    summary = await task

    assert summary.complete, summary.problems
    assert fake.state.activities[-1].id > head
    assert summary.audit_id == head
    assert await rig.store.get_state(AUDIT_CURSOR) == str(head)
    assert await rig.store.get_state("last_full_sync_audit_id") == str(head)
    synced_at = await rig.store.get_state(LAST_FULL_SYNC)
    assert synced_at is not None
    assert before <= datetime.fromisoformat(synced_at) <= datetime.now(UTC)


@pytest.mark.parametrize("failing", ["/api/books", AUDIT_ROUTE])
async def test_an_incomplete_sync_sets_no_sync_point(
    make_fake: FakeFactory, make_rig: RigFactory, failing: str
) -> None:
    fake = await make_fake()
    await fake.update_page(fake.truth()["pages"][0]["id"], html="<p>logged</p>")
    rig = await make_rig(fake)
    fake.faults.fail_listings.add(failing)

    summary = await rig.sync()

    assert not summary.complete
    states = await rig.store.states()
    assert LAST_FULL_SYNC not in states and AUDIT_CURSOR not in states, states

    fake.faults.fail_listings.clear()
    assert (await rig.sync()).complete
    synced_at = await rig.store.get_state(LAST_FULL_SYNC)
    cursor = await rig.store.get_state(AUDIT_CURSOR)
    assert cursor == str(fake.state.activities[-1].id)

    await fake.update_page(fake.truth()["pages"][1]["id"], html="<p>logged again</p>")
    fake.faults.fail_listings.add(failing)
    summary = await rig.sync()

    assert not summary.complete
    assert await rig.store.get_state(LAST_FULL_SYNC) == synced_at
    assert await rig.store.get_state(AUDIT_CURSOR) == cursor


async def test_attachments_of_binned_pages_stay_out_until_the_page_is_restored(
    make_fake: FakeFactory, make_rig: RigFactory
) -> None:
    """DESIGN 13: BookStack lists the attachments of binned pages (and of a binned book's
    pages); the mirror holds none of them, from a cold sync or a later diff, and the page's
    restore brings them back."""
    fake = await make_fake(**SMALL)
    state = fake.state
    pages = sorted(state.pages)
    binned_page, book_page = pages[0], pages[-1]
    await fake.create_attachment(binned_page, "binned.pdf", content=b"x", extension="pdf")
    await fake.create_attachment(book_page, "in-book.txt", content=b"y", extension="txt")
    await fake.delete_page(binned_page)
    await fake.delete_book(state.pages[book_page].book_id)
    listed = {a["uploaded_to"] for a in (await _list(fake, "/api/attachments"))}
    assert {binned_page, book_page} <= listed  # what real BookStack shows
    rig = await make_rig(fake)

    summary = await rig.sync()

    assert summary.complete, summary.problems
    assert_mirror_is_truth(await rig.mirror(), fake.truth())
    assert await rig.store.dangling() == {}

    # A page restored from the bin: its listed attachments are new to the mirror again.
    deletion = next(
        d["id"]
        for d in fake.deletions()
        if d["deletable_type"] == "page" and d["deletable_id"] == binned_page
    )
    await fake.recycle_bin_restore(deletion)
    summary = await rig.sync()
    assert summary.complete, summary.problems
    truth = fake.truth()
    assert binned_page in {a["uploaded_to"] for a in truth["attachments"]}
    assert_mirror_is_truth(await rig.mirror(), truth)


async def test_a_sync_removes_rows_a_race_left_naming_what_the_mirror_does_not_hold(
    make_fake: FakeFactory, make_rig: RigFactory
) -> None:
    """DESIGN 13: a membership or a shelf book naming what the mirror does not hold (left by
    a race beside a delete, or by older code) is removed by the next sync, even a plain one
    that re-reads no role and no shelf, each removal in the change feed; the sync is
    complete only when nothing of the kind is left."""
    fake = await make_fake(clock=ticking_clock())
    rig = await make_rig(fake)
    assert (await rig.sync()).complete
    truth = fake.truth()
    user, shelf = truth["users"][-1]["id"], truth["shelves"][0]["id"]
    async with rig.store.transaction() as tx:
        await tx.execute("INSERT INTO user_roles (user_id, role_id) VALUES (?, 999)", (user,))
        await tx.execute(
            "INSERT INTO shelf_books (shelf_id, book_id, position) VALUES (?, 999, 99)", (shelf,)
        )
    assert set(await rig.store.dangling()) == {
        "memberships of users or roles not mirrored",
        "shelf books not mirrored",
    }
    seq = await rig.store.last_seq()

    summary = await rig.sync(all_permissions=False, set_cursor=False, verify_memberships=False)

    assert summary.complete, summary.problems
    assert await rig.store.dangling() == {}
    assert_mirror_is_truth(await rig.mirror(), truth)
    changes = {(c["op"], c["entity"], c["entity_id"]) for c in await rig.store.changes(seq)}
    assert {("delete", "user_role", user), ("upsert", "shelf_books", shelf)} <= changes
    assert READ_ROUTE["shelf"] not in route_counts(fake)  # not repaired by a re-read


async def _list(fake: FakeBookStack, endpoint: str) -> list[dict[str, Any]]:
    async with client_for(fake) as client:
        return await client.list_all(endpoint)


# ---- 9. content permissions of restricted items only ------------------------------------------


async def test_the_restricted_search_pages_per_type_like_bookstack(
    make_fake: FakeFactory,
) -> None:
    """FACTS, first section: `count` (at most 100) applies to each type, `total` is the sum,
    and the client pages until the distinct items add up to it."""
    fake = await make_fake(pages=260, books=3, chapters_per_book=1, permission_share=0.0, seed=4)
    pages = sorted(fake.state.pages)[:230]
    for page_id in pages:
        await fake.set_permissions("page", page_id, fallback=NO_ACCESS)
    await fake.set_permissions("book", 1, fallback=NO_ACCESS)
    fake.reset_requests()
    async with client_for(fake) as client:
        found = await client.search_all("{is_restricted}")
        assert found == {("page", p) for p in pages} | {("book", 1)}
        assert route_counts(fake)[SEARCH_ROUTE] == 3  # 100 + 100 + 30 pages, the book on page 1
        too_many = await client.get("/api/search", {"query": "{is_restricted}", "count": 100})
        assert len(too_many["data"]) == 101 and too_many["total"] == 231
    status, _ = await _raw_get(fake, "/api/search?query={is_restricted}&count=500")
    assert status == 422


@pytest.mark.parametrize("fault", ["fail_listings", "short_listings"])
async def test_a_failed_or_short_restricted_search_reads_every_items_permissions(
    make_fake: FakeFactory, make_rig: RigFactory, fault: str
) -> None:
    fake = await make_fake(**SMALL)
    getattr(fake.faults, fault).add(SEARCH_ROUTE)
    rig = await make_rig(fake)

    summary = await rig.sync()

    assert summary.complete, summary.problems
    truth = fake.truth()
    assert_mirror_is_truth(await rig.mirror(), truth)
    assert sorted(permission_reads(fake)) == sorted(content_keys(truth))


async def test_a_silent_shelf_permission_copy_is_found_by_a_listing_diff(
    make_fake: FakeFactory, make_rig: RigFactory
) -> None:
    """Copying a shelf's permissions to its books logs nothing and moves no updated_at; the
    books then show in the {is_restricted} search, so a plain diff (no permission re-read of
    known items) reads exactly those books' permissions."""
    fake = await make_fake(**{**SMALL, "permission_share": 0.0})
    rig = await make_rig(fake)
    assert (await rig.sync()).complete
    assert (await rig.mirror())["permissions"] == []
    shelf = fake.truth()["shelves"][0]
    await fake.set_permissions("bookshelf", shelf["id"], fallback=NO_ACCESS)
    books = await fake.copy_shelf_permissions_to_books(shelf["id"])
    assert books

    summary = await rig.sync(all_permissions=False, set_cursor=False, verify_memberships=False)

    assert summary.complete, summary.problems
    assert_mirror_is_truth(await rig.mirror(), fake.truth())
    restricted = {("bookshelf", shelf["id"])} | {("book", b) for b in books}
    assert sorted(permission_reads(fake)) == sorted(restricted)


async def _raw_get(fake: FakeBookStack, path: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Token {fake.token_id}:{fake.token_secret}"}
    async with aiohttp.ClientSession() as http, http.get(fake.url + path, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_permissions_that_became_the_default_reach_effective_access(
    make_fake: FakeFactory, make_rig: RigFactory
) -> None:
    """Items the search no longer finds restricted get the default without a read (in bulk):
    that write, too, must update who can see them and everything below them."""
    fake = await make_fake(**{**SMALL, "permission_share": 0.0})
    user = await fake.create_user("Viewer", "viewer@example.com", roles=[3])
    rig = await make_rig(fake)
    book = fake.truth()["books"][0]["id"]
    pages = sorted(p.id for p in fake.state.pages.values() if p.book_id == book and not p.draft)
    await fake.set_permissions("book", book, fallback=NO_ACCESS)
    assert (await rig.sync()).complete
    visible = set(await rig.store.visible_ids(user, "page"))
    assert not visible & set(pages)
    # The book's rows go away; the diff learns it from the search alone, and reads nothing.
    fake.state.entity_permissions.pop(("book", book))

    summary = await rig.sync(all_permissions=False, set_cursor=False, verify_memberships=False)

    assert summary.complete, summary.problems
    assert permission_reads(fake) == []
    assert set(pages) <= set(await rig.store.visible_ids(user, "page"))
