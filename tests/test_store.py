"""The storage contract, run on both backends (a SQLite file and a PostgreSQL database): what a
write may and may not overwrite, memberships read from both sides, the owner BookStack stops
naming, tombstones, leases of dead workers, and dead letters (DESIGN guarantees 2, 3 and 10)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from eventsync.events import Event
from eventsync.records import ENDPOINTS, to_row
from eventsync.store import queue as queue_module
from eventsync.store.base import LEASE_TTL
from eventsync.store.mirror import Store
from eventsync.store.queue import JobQueue

StoreFactory = Callable[[], Awaitable[Store]]

T0 = 1_700_000_000.0  # a moment "read at" times are relative to


@pytest.fixture
async def make_store(new_database: Callable[[], str]) -> AsyncIterator[StoreFactory]:
    """Factory: a fresh store in its own database (several may be open at once), on the
    backend the test is parametrised with."""
    stores: list[Store] = []

    async def make() -> Store:
        store = await Store.open(new_database())
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def page(page_id: int, **fields: Any) -> dict[str, Any]:
    row = {
        "id": page_id,
        "book_id": 1,
        "chapter_id": None,
        "name": f"Page {page_id}",
        "slug": f"page-{page_id}",
        "priority": 1,
        "draft": False,
        "template": False,
        "revision_count": 1,
        "html": "<p>x</p>",
        "raw_html": "<p>x</p>",
        "markdown": "",
        "updated_at": "2024-10-15T10:00:00.000000Z",
        "tags": [],
    }
    row.update(fields)
    return row


def entity(kind: str, **raw: Any) -> dict[str, Any]:
    """A mirror row as the sync makes it from a BookStack read."""
    return to_row(kind, ENDPOINTS[kind][2].model_validate(raw))


async def feed(store: Store) -> list[tuple[str, str, int]]:
    return [(c["op"], c["entity"], c["entity_id"]) for c in await store.changes(0, 10_000)]


# ---- reads never go back in time -------------------------------------------------------------


async def test_an_older_read_never_overwrites_a_newer_one(make_store: StoreFactory) -> None:
    store = await make_store()
    async with store.transaction() as tx:
        assert await tx.upsert("page", page(1, name="New"), read_at=T0 + 10) == "created"
    async with store.transaction() as tx:
        # A read sent before the stored one, written after it (slow, or queued behind it).
        assert await tx.upsert("page", page(1, name="Old"), read_at=T0 + 5) == "stale"
        assert not await tx.patch("page", 1, {"book_id": 9}, read_at=T0 + 5)
        assert await tx.delete("page", 1, read_at=T0 + 5) == 0
    row = await store.get("page", 1)
    assert row is not None and row["name"] == "New" and row["book_id"] == 1
    assert await feed(store) == [("upsert", "page", 1)]

    # Newer reads do apply; a placement patch leaves the row's read time alone (its content
    # was not read), so the content read it came with still counts.
    async with store.transaction() as tx:
        assert await tx.patch("page", 1, {"book_id": 2}, read_at=T0 + 20)
        assert await tx.upsert("page", page(1, name="New", book_id=2), read_at=T0 + 15) == (
            "unchanged"
        )
        assert await tx.delete("page", 1, read_at=T0 + 30) == 1
    assert await store.get("page", 1) is None


async def test_a_delete_spares_children_read_after_it(make_store: StoreFactory) -> None:
    store = await make_store()
    async with store.transaction() as tx:
        await tx.upsert("book", entity("book", id=1, name="B", slug="b"), read_at=T0)
        await tx.upsert("page", page(1), read_at=T0)
        await tx.upsert("page", page(2), read_at=T0 + 50)  # read after the book's 404
    async with store.transaction() as tx:
        assert await tx.delete("book", 1, read_at=T0 + 10) == 2  # the book and page 1
    assert await store.get("page", 1) is None
    assert await store.get("page", 2) is not None


async def test_membership_follows_the_newest_read_of_either_side(make_store: StoreFactory) -> None:
    store = await make_store()
    async with store.transaction() as tx:
        await tx.upsert("user", entity("user", id=5, name="U", slug="u"), read_at=T0)
        await tx.upsert("role", entity("role", id=3, display_name="R"), read_at=T0)
        await tx.upsert("role", entity("role", id=4, display_name="S"), read_at=T0)
        # The user, read at T0 + 20: in roles 3 and 4.
        await tx.set_user_roles(5, [3, 4], read_at=T0 + 20)
    async with store.transaction() as tx:
        # Role 3 read earlier (T0 + 10, before the user was added): its stale member list
        # must not take the user out again.
        assert await tx.upsert("role", entity("role", id=3, display_name="R"), T0 + 10) == (
            "unchanged"
        )
        assert not await tx.set_role_users(3, [], read_at=T0 + 10)
        # Role 4 read later (T0 + 30) without the user: the user left it since.
        await tx.upsert("role", entity("role", id=4, display_name="S"), read_at=T0 + 30)
        assert await tx.set_role_users(4, [], read_at=T0 + 30)
    assert await store.role_members(3) == {5}
    assert await store.role_members(4) == set()
    async with store.transaction() as tx:
        # A user read older than role 4's read cannot put the user back into role 4.
        await tx.set_user_roles(5, [3, 4], read_at=T0 + 25)
    assert await store.role_members(4) == set()


async def test_content_permissions_keep_the_owner_bookstack_stops_naming(
    make_store: StoreFactory,
) -> None:
    """After its owner is deleted without handing content on, BookStack answers `owner: null`
    while the item's owned_by still names the deleted user: the mirror keeps that id."""
    store = await make_store()
    restricted = {
        "owner_id": 7,
        "inheriting": False,
        "fallback": {"view": False, "create": False, "update": False, "delete": False},
        "role_permissions": [],
    }
    async with store.transaction() as tx:
        await tx.upsert("page", page(1), read_at=T0)
        await tx.upsert("page", page(2), read_at=T0)
        assert await tx.set_permissions("page", 1, restricted, read_at=T0)
        assert not await tx.set_permissions("page", 1, {**restricted, "owner_id": None}, T0 + 1)
        # Never read before: the owner the listing named.
        assert await tx.set_permissions(
            "page", 2, {**restricted, "owner_id": None}, T0, fallback_owner=9
        )
        # Older than the stored read: ignored.
        assert not await tx.set_permissions("page", 1, {**restricted, "owner_id": 8}, T0 - 1)
    doc = await store.export()
    assert [(p["content_id"], p["owner_id"]) for p in doc["permissions"]] == [(1, 7), (2, 9)]


async def test_a_trashed_book_leaves_a_tombstone_on_its_shelves(make_store: StoreFactory) -> None:
    store = await make_store()
    async with store.transaction() as tx:
        await tx.upsert("shelf", entity("shelf", id=1, name="S", slug="s"), read_at=T0)
        await tx.upsert("book", entity("book", id=2, name="B", slug="b"), read_at=T0)
        await tx.set_shelf_books(1, [2])
    async with store.transaction() as tx:
        await tx.delete("book", 2, read_at=T0 + 1)
    assert (await store.export())["shelves"][0]["books"] == []
    assert await store.shelves_of_returned_books() == set()  # the book is not back yet
    async with store.transaction() as tx:
        await tx.upsert("book", entity("book", id=2, name="B", slug="b"), read_at=T0 + 2)
    assert await store.shelves_of_returned_books() == {1}
    async with store.transaction() as tx:
        await tx.forget_tombstones({1})
    assert await store.shelves_of_returned_books() == set()


async def test_the_database_file_is_private(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "store-0.db"):
        pass
    assert stat.S_IMODE(os.stat(tmp_path / "store-0.db").st_mode) == 0o600


# ---- the job queue ------------------------------------------------------------------------------


async def test_leases_of_dead_workers_are_released(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make_store()
    queue = JobQueue(store)
    for key in ("page:1", "page:2", "page:3", "page:4"):
        await queue.enqueue(key, ["fetch"])
    host = socket.gethostname()
    now = time.time()
    owners = {
        "page:1": (f"{host}:{os.getpid()}:0ldnonce", now),  # an earlier process, our pid
        "page:2": (f"{host}:999999999:abcdef12", now),  # a process that is gone
        "page:3": ("elsewhere:1:abcdef12", now - LEASE_TTL - 1),  # not renewed: dead
        "page:4": ("elsewhere:1:12345678", now),  # another host, renewed: alive
    }
    async with store.transaction() as tx:
        for key, (owner, at) in owners.items():
            await tx.execute(
                "UPDATE jobs SET leased_by = ?, leased_at = ? WHERE key = ?", (owner, at, key)
            )
    assert await queue.recover() == 3
    leased = await store.fetchall("SELECT key FROM jobs WHERE leased_by IS NOT NULL")
    assert [r[0] for r in leased] == ["page:4"]
    # A renewed lease of this process stays, whatever its age.
    jobs = await queue.lease(10)
    assert {j.key for j in jobs} == {"page:1", "page:2", "page:3"}
    await queue.renew(jobs)
    assert await queue.recover(now=time.time() + LEASE_TTL / 2) == 0
    monkeypatch.setattr(queue_module, "_PROCESS_NONCE", "restart0")  # "we" restarted
    assert await JobQueue(store).recover() == 3


async def test_a_job_reruns_only_for_what_was_merged_while_it_ran(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    queue = JobQueue(store)
    await queue.enqueue("page:2", ["fetch", "permissions"])
    (job,) = await queue.lease(5)
    assert job.hints == {"fetch", "permissions"}
    # A link rewrite of the page arrives while the permission read runs: one more fetch, not a
    # second permission read.
    await queue.enqueue("page:2", ["fetch"], reason="link rewrite")
    assert not await queue.done(job)
    (again,) = await queue.lease(5)
    assert again.hints == {"fetch"}
    # A failure redoes everything merged so far: nothing served is assumed.
    await queue.enqueue("page:2", ["permissions"])
    assert await queue.retry(again, "boom", delay=0.0)
    (third,) = await queue.lease(5)
    assert third.hints == {"fetch", "permissions"}
    assert await queue.done(third)


async def test_dead_letters_keep_merged_events_and_clear_once_the_key_syncs(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    queue = JobQueue(store, max_attempts=2)
    await queue.enqueue("role:4", ["fetch"])
    (job,) = await queue.lease(1)
    assert await queue.retry(job, "HTTP 500", 0)  # attempt 1 of 2
    (job,) = await queue.lease(1)
    # An event merges while the last attempt runs: one more try, not a dead letter.
    await queue.enqueue("role:4", ["fetch"])
    assert await queue.retry(job, "HTTP 500", 0)
    assert await queue.dead_letters() == []
    (job,) = await queue.lease(1)
    assert not await queue.retry(job, "HTTP 500", 0)
    letters = await queue.dead_letters()
    assert [(d["key"], d["attempts"]) for d in letters] == [("role:4", 2)]
    assert "HTTP 500" in letters[0]["error"]
    # Transient failures while BookStack is down are not counted at all.
    await queue.enqueue("page:9", ["fetch"])
    for _ in range(5):
        (job,) = await queue.lease(1)
        assert await queue.retry(job, "Unavailable", 0, count=False)
    # The key syncs again later (a new event): its dead letter goes.
    await queue.enqueue("role:4", ["fetch"])
    for job in await queue.lease(10):
        await queue.done(job)
    assert await queue.dead_letters() == []
    rows = await store.fetchall("SELECT key, hints FROM jobs")
    assert rows == []
    assert json.loads(json.dumps(await queue.event_counts())) == {}


async def test_a_move_patch_survives_an_older_read_and_proves_no_content_read(
    make_store: StoreFactory,
) -> None:
    """A sort patches a page's placement from its book's contents. An older read of the page
    written after it keeps the sort's placement (and brings its own content); and the
    patched updated_at does not count as a read of the page's content when an event asks
    whether the mirror already reflects it."""
    store = await make_store()
    queue = JobQueue(store)
    async with store.transaction() as tx:
        await tx.upsert("page", page(1, updated_at="2024-10-15T10:00:00.000000Z"), read_at=T0)
        assert await tx.patch(
            "page",
            1,
            {"book_id": 2, "priority": 9, "updated_at": "2024-10-15T10:05:00.000000Z"},
            read_at=T0 + 20,
        )
    async with store.transaction() as tx:
        # The page's own read, sent before the sort (T0 + 10), with newer content.
        outcome = await tx.upsert(
            "page",
            page(1, html="<p>new</p>", updated_at="2024-10-15T10:02:00.000000Z"),
            read_at=T0 + 10,
        )
    assert outcome == "updated"
    row = await store.get("page", 1)
    assert row is not None
    assert (row["book_id"], row["priority"], row["html"]) == (2, 9, "<p>new</p>")
    assert row["updated_at"] == "2024-10-15T10:05:00.000000Z"
    # An edit at 10:03 (its webhook lost): the sort's updated_at (10:05) is later, but only
    # the page's own read (10:02) says what content the mirror holds: the edit is read.
    edit_at = datetime(2024, 10, 15, 10, 3, tzinfo=UTC).timestamp()
    event = Event("audit", "page_update", "page:1", frozenset({"fetch"}), at=edit_at, activity_id=7)
    assert await queue.submit([event]) == ["queued"]
    # An edit before the page's own read is in the mirror already.
    older = Event(
        "audit", "page_update", "page:1", frozenset({"fetch"}), at=edit_at - 120, activity_id=8
    )
    assert await queue.submit([older]) == ["covered"]


async def test_read_times_from_before_a_clock_step_do_not_block_writes(
    make_store: StoreFactory,
) -> None:
    """The clock stepped back an hour (NTP, a restored VM): rows read "in the future" must not
    make every correct write look stale."""
    store = await make_store()
    future = time.time() + 3600
    async with store.transaction() as tx:
        await tx.upsert("page", page(1, name="Before the step"), read_at=future)
    async with store.transaction() as tx:
        assert await tx.upsert("page", page(1, name="After the step"), read_at=time.time()) == (
            "updated"
        )
    row = await store.get("page", 1)
    assert row is not None and row["name"] == "After the step"


async def test_a_users_roles_apply_under_a_newer_listing_row(make_store: StoreFactory) -> None:
    """The user listing carries no roles: a user read sent just before the listing still
    sets the roles, though the listing's row (newer) keeps the user's other fields."""
    store = await make_store()
    async with store.transaction() as tx:
        await tx.upsert("role", entity("role", id=3, display_name="R"), read_at=T0)
        await tx.upsert("user", entity("user", id=5, name="Listed", slug="u"), read_at=T0 + 20)
        assert await tx.upsert("user", entity("user", id=5, name="Read", slug="u"), T0 + 10) == (
            "stale"
        )
        assert await tx.set_user_roles(5, [3], read_at=T0 + 10)
    user = await store.get("user", 5)
    assert user is not None and user["name"] == "Listed"
    assert await store.role_members(3) == {5}


async def test_pages_linking_by_path_or_permalink(make_store: StoreFactory) -> None:
    """BookStack rewrites (and saves, revision_count + 1) every page holding a reference to
    an item whose URL changed: links by URL, and permalinks to its pages (`/link/{id}`)."""
    store = await make_store()
    url = "http://wiki.example/books/b-old/page/p-old"
    async with store.transaction() as tx:
        await tx.upsert("page", page(1, raw_html=f'<a href="{url}">by URL</a>'))
        await tx.upsert("page", page(2, raw_html='<a href="http://wiki.example/link/7">x</a>'))
        await tx.upsert("page", page(3, raw_html='<a href="http://wiki.example/link/77">x</a>'))
        await tx.upsert("page", page(4, markdown="[p](http://wiki.example/books/b-old)"))
        await tx.upsert("page", page(5, raw_html=f'<a href="{url}-two">another page</a>'))
    assert await store.pages_linking("/books/b-old/page/p-old") == {1}
    assert await store.pages_linking("/books/b-old/page/p-old", {7}) == {1, 2}
    # A book: links to it and to anything below it.
    assert await store.pages_linking("/books/b-old") == {1, 4, 5}


def attachment(attachment_id: int, page_id: int) -> dict[str, Any]:
    return entity(
        "attachment", id=attachment_id, name=f"a{attachment_id}", uploaded_to=page_id, order=1
    )


async def test_nothing_names_what_the_mirror_does_not_hold(make_store: StoreFactory) -> None:
    """DESIGN 13: attachments of pages, shelf books, memberships and permission rows are
    written only for what the mirror holds; a shelf book that arrives later re-reads its
    shelf, and the store reports (and removes) rows a race left dangling."""
    store = await make_store()
    perms = {
        "owner_id": 1,
        "inheriting": False,
        "fallback": {"view": False, "create": False, "update": False, "delete": False},
        "role_permissions": [
            {"role_id": 3, "view": True, "create": False, "update": False, "delete": False},
            {"role_id": 4, "view": True, "create": False, "update": False, "delete": False},
        ],
    }
    async with store.transaction() as tx:
        await tx.upsert("page", page(1), read_at=T0)
        # A binned page's attachment, as BookStack lists it: not written.
        assert await tx.upsert("attachment", attachment(10, 2), read_at=T0) == "orphan"
        assert await tx.upsert("attachment", attachment(11, 1), read_at=T0) == "created"
        await tx.upsert("shelf", entity("shelf", id=1, name="S", slug="s"), read_at=T0)
        await tx.upsert("book", entity("book", id=2, name="B", slug="b"), read_at=T0)
        await tx.set_shelf_books(1, [2, 3])  # book 3 is not mirrored (yet)
        await tx.upsert("role", entity("role", id=3, display_name="R"), read_at=T0)
        await tx.upsert("user", entity("user", id=5, name="U", slug="u"), read_at=T0)
        await tx.set_user_roles(5, [3, 4], read_at=T0)  # role 4 is not mirrored
        await tx.set_role_users(3, [5, 6], read_at=T0)  # user 6 is not mirrored
        assert not await tx.set_permissions("page", 9, perms, read_at=T0)  # no page 9
        assert await tx.set_permissions("page", 1, perms, read_at=T0)
    doc = await store.export()
    assert [a["id"] for a in doc["attachments"]] == [11]
    assert doc["shelves"][0]["books"] == [2]
    assert [(u["id"], u["roles"]) for u in doc["users"]] == [(5, [3])]
    assert [(r["id"], r["users"]) for r in doc["roles"]] == [(3, [5])]
    assert [
        (p["content_id"], [r["role_id"] for r in p["role_permissions"]]) for p in doc["permissions"]
    ] == [(1, [3])]
    assert await store.dangling() == {}
    async with store.transaction() as tx:
        await tx.upsert("book", entity("book", id=3, name="C", slug="c"), read_at=T0)
    assert await store.shelves_of_returned_books() == {1}  # read again: it shows book 3

    # What a race can leave (rows written by older code, or beside a delete): found, removed.
    async with store.transaction() as tx:
        await tx.execute(
            "INSERT INTO attachments (id, name, uploaded_to, fetched_at) VALUES (12, 'x', 7, 0)"
        )
        await tx.execute("INSERT INTO user_roles (user_id, role_id) VALUES (5, 8)")
        await tx.execute("INSERT INTO shelf_books (shelf_id, book_id, position) VALUES (1, 9, 5)")
    assert await store.dangling() == {
        "attachments of pages not mirrored": 1,
        "memberships of users or roles not mirrored": 1,
        "shelf books not mirrored": 1,
    }
    seq = await store.last_seq()
    async with store.transaction() as tx:
        await tx.remove_dangling()
    assert await store.dangling() == {}
    assert {(c["op"], c["entity"]) for c in await store.changes(after=seq)} == {
        ("delete", "attachment"),
        ("delete", "user_role"),
        ("upsert", "shelf_books"),
    }
    async with store.transaction() as tx:
        await tx.delete("page", 1)
    assert await store.dangling() == {}
    assert (await store.export())["attachments"] == []


async def test_default_permissions_in_bulk_follow_the_rules_of_one(
    make_store: StoreFactory,
) -> None:
    """set_default_permissions: only mirrored items; a newer stored read stands; an owner the
    listing does not name keeps the known one; a restricted item becomes the default, with
    its role rows gone and a change-feed row; an item already at the default changes nothing."""
    store = await make_store()
    restricted = {
        "owner_id": 7,
        "inheriting": False,
        "fallback": {"view": False, "create": False, "update": False, "delete": False},
        "role_permissions": [
            {"role_id": 3, "view": True, "create": False, "update": False, "delete": False}
        ],
    }
    async with store.transaction() as tx:
        await tx.upsert("role", entity("role", id=3, display_name="R"), read_at=T0)
        for page_id in (1, 2, 3):
            await tx.upsert("page", page(page_id), read_at=T0)
        await tx.set_permissions("page", 1, restricted, read_at=T0)
        await tx.set_permissions("page", 2, restricted, read_at=T0 + 50)  # newer than below
    seq = await store.last_seq()
    async with store.transaction() as tx:
        changed = await tx.set_default_permissions(
            "page", [(1, None), (2, 8), (3, 9), (4, 9)], read_at=T0 + 10
        )
    assert changed == 2  # page 1 (restricted → default) and page 3 (no row yet)
    doc = await store.export()
    assert [p["content_id"] for p in doc["permissions"]] == [2]  # only 2 is still restricted
    owners = {
        r[0]: r[1]
        for r in await store.fetchall("SELECT content_id, owner_id FROM content_permissions")
    }
    assert owners == {1: 7, 2: 7, 3: 9}  # no row for page 4, which is not mirrored
    roles = await store.fetchall("SELECT content_id FROM content_role_permissions")
    assert [r[0] for r in roles] == [2]
    feed = [(c["entity"], c["entity_id"]) for c in await store.changes(after=seq)]
    assert sorted(feed) == [("permissions", 1), ("permissions", 3)]
    # Each carries the permission row as it left it, as every change row does.
    rows = await store.fetchall("SELECT entity_id, state FROM changes WHERE seq > ?", (seq,))
    states = {r[0]: json.loads(r[1]) if r[1] else None for r in rows}
    assert states[1] is not None and states[1]["inheriting"] is True, states
    async with store.transaction() as tx:
        assert await tx.set_default_permissions("page", [(1, 7), (3, 9)], T0 + 20) == 0


async def test_reads_beside_writes_never_find_the_database_locked(tmp_path: Path) -> None:
    """Reads and write transactions of one process interleave on its connection while another
    process commits. A read split over several hops would leave its snapshot open under
    another task's BEGIN IMMEDIATE, which SQLite then refuses at once: "database is locked"."""
    path = tmp_path / "shared.db"
    async with await Store.open(path) as mine, await Store.open(path) as other:
        async with mine.transaction() as tx:
            for n in range(1, 60):
                await tx.upsert("user", {"id": n, "name": f"U{n}", "slug": f"u{n}"})
        stop = time.monotonic() + 2.0

        async def read() -> None:
            while time.monotonic() < stop:
                assert len(await mine.fetchall("SELECT id, name FROM users")) >= 59

        async def write(store: Store, base: int) -> None:
            n = 0
            while time.monotonic() < stop:
                n += 1
                async with store.transaction() as tx:
                    await tx.set_state(f"writer-{base}", n)

        await asyncio.gather(read(), read(), write(mine, 1), write(other, 2))
