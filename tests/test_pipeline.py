"""The whole pipeline in one process: fake BookStack → webhooks + audit poller → inbox → queue →
dispatcher → handlers → SQLite mirror (DESIGN guarantees 2, 3, 4, 8, 10, 11 and the change feed).

Real parts only: the fake BookStack over HTTP on 127.0.0.1 and a real SQLite file in tmp_path.
The background sweep is off (sweep_share=0), the silent-change probe is off (its listing diff
on a changed `total` would remove what a delete's handler left behind) and the periodic diff
sync is an hour away, so what reaches the mirror here was carried by events and their
handlers, not by anti-entropy.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import app_for, client_for, eventually, first_difference, mirror_settings

import eventsync.dispatch
import eventsync.handlers
from eventsync import cli
from eventsync.app import open_app
from eventsync.bookstack.client import BookStackClient
from eventsync.config import Settings
from eventsync.errors import EventsyncError
from eventsync.events import EXPECT_GONE, EXPECT_PRESENT, FETCH, from_webhook
from eventsync.ingest.auditlog import AuditPoller
from eventsync.reconcile import AUDIT_CURSOR
from eventsync.service import Service
from eventsync.store.mirror import Store, Tx
from eventsync.testing import FakeBookStack

# Every test runs on a SQLite file, then on PostgreSQL.
pytestmark = pytest.mark.usefixtures("on_both_backends")

SECRET = "pipeline-test-secret-0123456789"
RPM = 100_000
NO_VIEW = {"view": False, "create": False, "update": False, "delete": False}

FakeFactory = Callable[..., Awaitable[FakeBookStack]]
ServiceFactory = Callable[..., Awaitable[Service]]


# ---- fixtures (factories) -------------------------------------------------------------------


@pytest.fixture
async def make_fake() -> AsyncIterator[FakeFactory]:
    """Factory: a started fake BookStack with a small seeded wiki."""
    fakes: list[FakeBookStack] = []

    async def make(*, audit_log: bool = True, **seed: Any) -> FakeBookStack:
        fake = FakeBookStack(requests_per_minute=RPM, audit_log=audit_log)
        await fake.start()
        fakes.append(fake)
        fake.seed(**{"pages": 30, "books": 4, "shelves": 2, "attachments": 5, "seed": 7, **seed})
        return fake

    yield make
    for fake in fakes:
        await fake.stop()


@pytest.fixture
async def make_service(make_fake: FakeFactory, tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """Factory: a started, synced Service against `fake`; its webhook is registered unless
    `webhook=False`. Keyword arguments override Settings."""
    async with AsyncExitStack() as stack:
        count = 0

        async def make(fake: FakeBookStack, *, webhook: bool = True, **extra: Any) -> Service:
            nonlocal count
            count += 1
            values: dict[str, Any] = {
                "bookstack_url": fake.url,
                "bookstack_token_id": fake.token_id,
                "bookstack_token_secret": fake.token_secret,
                "webhook_secret": SECRET,
                "database": tmp_path / f"mirror-{count}.db",
                "listen": "127.0.0.1:0",
                "requests_per_minute": RPM,
                "poll_interval": 0.3,
                "sweep_share": 0.0,
                "probe": False,
                **extra,
            }
            settings = Settings(**values)
            app = await stack.enter_async_context(open_app(settings, client=client_for(fake)))
            svc = Service(app)
            await svc.start()
            stack.push_async_callback(svc.stop)
            await asyncio.wait_for(svc.synced.wait(), 30)
            if webhook:
                fake.add_webhook(webhook_url(svc))
            return svc

        yield make


def webhook_url(svc: Service, secret: str = SECRET) -> str:
    return f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{secret}"


# ---- helpers --------------------------------------------------------------------------------


async def converge(svc: Service, fake: FakeBookStack, timeout: float = 15.0) -> None:
    """Wait until the mirror's export equals BookStack's truth; fail with the first diff."""
    await fake.drain_webhooks()
    deadline = time.monotonic() + timeout
    while True:
        mirror = await svc.store.export()
        truth = fake.truth()
        if mirror == truth:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"mirror did not converge: {first_difference(mirror, truth)}")
        await asyncio.sleep(0.1)


async def table_count(store: Store, table: str) -> int:
    row = await store.fetchone(f"SELECT count(*) FROM {table}")
    assert row is not None
    return int(row[0])


def reads_of(fake: FakeBookStack, path: str) -> int:
    return sum(1 for r in fake.requests if r.method == "GET" and r.path == path)


def deletion_of(fake: FakeBookStack, deletable_type: str, deletable_id: int) -> int:
    for row in fake.deletions():
        if row["deletable_type"] == deletable_type and row["deletable_id"] == deletable_id:
            return int(row["id"])
    raise AssertionError(f"no deletion for {deletable_type} {deletable_id}")


def chapter_with_pages(fake: FakeBookStack, *, not_in_book: int | None = None) -> int:
    """A live chapter holding at least one live page."""
    for chapter in sorted(fake.state.chapters.values(), key=lambda c: c.id):
        if chapter.trashed or chapter.book_id == not_in_book:
            continue
        if any(not p.trashed for p in fake.state.chapter_pages(chapter.id)):
            return chapter.id
    raise AssertionError("the seed has no chapter with pages")


# ---- 1. every event type ends in the right mirror -------------------------------------------

# With BookStack's audit log, and against a BookStack before v23.08 that has no audit-log API:
# there the webhooks alone carry these changes (DESIGN guarantee 14).
BOTH_VERSIONS = pytest.mark.parametrize(
    "audit_log", [True, False], ids=["audit-log", "no-audit-log-api"]
)


@BOTH_VERSIONS
async def test_content_events_reach_the_mirror(
    make_fake: FakeFactory, make_service: ServiceFactory, audit_log: bool
) -> None:
    fake = await make_fake(audit_log=audit_log)
    svc = await make_service(fake)

    # Pages: create, update, move, delete, revision restore.
    page = await fake.create_page(book_id=1, name="Pipeline page", html="<p>one</p>")
    await fake.update_page(page, html="<p>two</p>", name="Pipeline page v2")
    await fake.move_page(page, book_id=2)
    await fake.restore_revision(page)
    await fake.update_page(5, markdown="# five\n\nnew text")
    await fake.delete_page(6)
    # Chapters: create, update, move (its pages move silently), delete.
    chapter = await fake.create_chapter(3, "Pipeline chapter", description="c")
    await fake.update_chapter(chapter, name="Pipeline chapter v2", tags=[("k", "v")])
    moved = chapter_with_pages(fake, not_in_book=4)
    await fake.move_chapter(moved, 4)
    doomed = chapter_with_pages(fake, not_in_book=4)
    await fake.delete_chapter(doomed)
    # Books: create, update, sort (pages move between books silently), delete (cascade).
    book = await fake.create_book("Pipeline book", tags=[("t", "1")])
    await fake.update_book(book, description="described")
    loose = sorted(p.id for p in fake.state.pages.values() if not p.trashed and p.book_id == 1)
    await fake.sort_book([("page", loose[0], book, None, 1), ("page", loose[1], 4, None, 99)])
    await fake.delete_book(3)
    # Shelves: create, update (books), delete.
    shelf = await fake.create_shelf("Pipeline shelf", books=[1, 2])
    await fake.update_shelf(shelf, books=[book, 2, 1], name="Pipeline shelf v2")
    await fake.delete_shelf(1)

    # Moves rewrite links in other pages silently (FACTS 2.5); the handlers re-read pages
    # holding the old path, so no periodic diff sync is needed here.
    await converge(svc, fake)
    mirror = await svc.store.export()
    assert not any(p["book_id"] == 3 for p in mirror["pages"])  # the cascade removed them
    assert {p["book_id"] for p in mirror["pages"] if p["id"] in loose[:2]} == {book, 4}


@BOTH_VERSIONS
async def test_permission_updates_reach_the_mirror(
    make_fake: FakeFactory, make_service: ServiceFactory, audit_log: bool
) -> None:
    fake = await make_fake(audit_log=audit_log)
    svc = await make_service(fake)
    role_rows = [{"role_id": 3, "view": True, "create": False, "update": True, "delete": False}]
    await fake.set_permissions("page", 2, fallback=NO_VIEW)
    await fake.set_permissions("chapter", 1, role_permissions=role_rows)
    await fake.set_permissions("book", 2, fallback=NO_VIEW, role_permissions=role_rows)
    await fake.set_permissions("bookshelf", 2, owner_id=2, fallback=NO_VIEW)
    await converge(svc, fake)
    restricted = {(p["content_type"], p["content_id"]) for p in fake.truth()["permissions"]}
    assert {("page", 2), ("chapter", 1), ("book", 2), ("bookshelf", 2)} <= restricted

    # And back to inheriting: the rows leave the mirror again.
    await fake.set_permissions("page", 2)
    await converge(svc, fake)


@BOTH_VERSIONS
async def test_user_and_role_events_reach_the_mirror(
    make_fake: FakeFactory, make_service: ServiceFactory, audit_log: bool
) -> None:
    fake = await make_fake(audit_log=audit_log)
    svc = await make_service(fake)
    user = await fake.create_user("Pipeline User", "pipe@example.com", roles=[2])
    await fake.update_user(user, roles=[3], name="Pipeline User Renamed")
    role = await fake.create_role("Pipeline role", ["page-view-all"], "temp")
    await fake.update_role(role, permissions=["page-view-all", "book-view-all"])
    other = await fake.create_user("Second User", "second@example.com", roles=[role])
    await fake.delete_user(4)
    await converge(svc, fake)

    # A page with a permission row for the role (and one for another role).
    rows = [
        {"role_id": role, "view": True, "create": False, "update": False, "delete": False},
        {"role_id": 3, "view": False, "create": False, "update": False, "delete": False},
    ]
    await fake.set_permissions("page", 2, role_permissions=rows)
    await converge(svc, fake)

    # Deleting a role moves its members to migrate_to, silently (FACTS 2.5), and takes its
    # permission rows with it, with no event for the items (DESIGN 13: permission rows name
    # only mirrored roles).
    await fake.delete_role(role, migrate_to=2)
    await converge(svc, fake)
    mirror = await svc.store.export()
    assert role not in {r["id"] for r in mirror["roles"]}
    assert 2 in next(u["roles"] for u in mirror["users"] if u["id"] == other)
    page_rows = next(
        p for p in mirror["permissions"] if (p["content_type"], p["content_id"]) == ("page", 2)
    )
    assert [r["role_id"] for r in page_rows["role_permissions"]] == [3]
    assert await svc.store.dangling() == {}


@BOTH_VERSIONS
async def test_recycle_bin_and_conversions_reach_the_mirror(
    make_fake: FakeFactory, make_service: ServiceFactory, audit_log: bool
) -> None:
    fake = await make_fake(audit_log=audit_log)
    svc = await make_service(fake)
    book_pages = {p.id for p in fake.state.book_pages(2) if not p.trashed}
    assert book_pages and fake.state.book_chapters(2)

    await fake.delete_book(2)
    await fake.delete_page(1 if 1 not in book_pages else 2)
    await converge(svc, fake)
    assert not book_pages & {p["id"] for p in (await svc.store.export())["pages"]}

    # Restores: the book comes back with its chapters and pages (no event for those).
    await fake.recycle_bin_restore(deletion_of(fake, "book", 2))
    await fake.recycle_bin_restore(deletion_of(fake, "page", 1 if 1 not in book_pages else 2))
    await converge(svc, fake)
    assert book_pages <= {p["id"] for p in (await svc.store.export())["pages"]}

    # Destroy: gone for good.
    await fake.delete_shelf(2)
    await fake.recycle_bin_destroy(deletion_of(fake, "bookshelf", 2))
    # Chapter → book (the chapter is destroyed silently, its pages move) and book → shelf
    # (its chapters become books; the handler queues a listing diff for the silent rest).
    await fake.convert_chapter_to_book(chapter_with_pages(fake))
    await fake.convert_book_to_shelf(4)
    await converge(svc, fake, timeout=20)


async def test_ignored_activity_costs_no_api_request(
    make_fake: FakeFactory, make_service: ServiceFactory
) -> None:
    fake = await make_fake()
    svc = await make_service(fake)
    fake.reset_requests()
    ids = [
        await fake.log_ignored_activity("auth_login", "standard; (1) Admin"),
        await fake.log_ignored_activity("settings_update", "features"),
        await fake.log_ignored_activity("webhook_update", "(1) eventsync"),
    ]

    async def audit_seen() -> bool:
        return (await svc.poller.cursor() or 0) >= ids[-1]

    await eventually(audit_seen, 10, "the audit poll reads the ignored rows")
    rows = await svc.store.fetchall("SELECT source, outcome FROM events WHERE outcome='ignored'")
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        [("webhook", "ignored")] * 3 + [("audit", "ignored")] * 3
    )
    assert await svc.queue.depth() == 0
    # Nothing but audit polls (the silent-change probe is off here).
    others = [r for r in fake.requests if r.route != "/api/audit-log"]
    assert others == [], others


# ---- 2. duplicates, reordering and dropped webhooks still converge --------------------------


async def test_dropped_duplicated_and_reordered_webhooks_still_converge(
    make_fake: FakeFactory, make_service: ServiceFactory
) -> None:
    fake = await make_fake(pages=40, books=5)
    svc = await make_service(fake)
    fake.faults.webhook_drop = 0.4
    fake.faults.webhook_duplicate = 0.3
    fake.faults.webhook_delay = 0.3  # sent from background tasks: arrive late and reordered
    fake.faults.seed = 11
    rng = random.Random(11)

    def live(table: dict[int, Any]) -> list[int]:
        return sorted(i for i, e in table.items() if not getattr(e, "trashed", False))

    async def one_change(i: int) -> None:
        pages, chapters, books = (
            live(fake.state.pages),
            live(fake.state.chapters),
            live(fake.state.books),
        )
        roll = rng.random()
        if roll < 0.35:
            await fake.update_page(rng.choice(pages), html=f"<p>edit {i}</p>")
        elif roll < 0.45:
            await fake.create_page(book_id=rng.choice(books), name=f"Chaos {i}", html="<p>c</p>")
        elif roll < 0.55:
            await fake.move_page(rng.choice(pages), book_id=rng.choice(books))
        elif roll < 0.6 and len(pages) > 20:
            await fake.delete_page(rng.choice(pages))
        elif roll < 0.67 and chapters:
            await fake.update_chapter(rng.choice(chapters), name=f"Chapter edit {i}")
        elif roll < 0.72 and chapters:
            await fake.move_chapter(rng.choice(chapters), rng.choice(books))
        elif roll < 0.78:
            await fake.update_book(rng.choice(books), description=f"book edit {i}")
        elif roll < 0.84:
            kind, ids = rng.choice([("page", pages), ("chapter", chapters), ("book", books)])
            if ids:
                await fake.set_permissions(kind, rng.choice(ids), fallback=NO_VIEW)
        elif roll < 0.9:
            await fake.update_user(rng.choice(sorted(fake.state.users)), name=f"User {i}")
        elif roll < 0.95:
            await fake.update_role(4, description=f"role edit {i}")
        else:
            await fake.update_shelf(1, books=rng.sample(books, k=min(2, len(books))))

    for i in range(60):
        await one_change(i)
    await fake.drain_webhooks()
    sent = len(fake.webhook_deliveries)
    assert sent > 0  # some arrived, fewer than 60 unique ones: the audit log fills in
    await converge(svc, fake, timeout=25)
    outcomes = await svc.queue.event_counts()
    assert outcomes.get("covered", 0) > 0  # duplicates and pairs cost nothing


# ---- 3. one fetch per change ------------------------------------------------------------------


async def test_a_webhook_and_its_audit_row_cost_one_fetch(
    make_fake: FakeFactory, make_service: ServiceFactory
) -> None:
    fake = await make_fake()
    # Fresh pages with no links or includes: nothing else has a reason to read them.
    pages = [
        await fake.create_page(book_id=2, name=f"Solo {i}", html=f"<p>{i}</p>") for i in range(6)
    ]
    svc = await make_service(fake)
    fake.reset_requests()
    polls = svc.poller.polls
    for page in pages:
        await fake.update_page(page, html=f"<p>changed {page}</p>")
    last_activity = fake.state.activities[-1].id

    async def settled() -> bool:
        cursor = await svc.poller.cursor() or 0
        return cursor >= last_activity and await svc.queue.depth() == 0

    await eventually(settled, 10, "audit rows polled and jobs done")
    await converge(svc, fake)
    assert [reads_of(fake, f"/api/pages/{p}") for p in pages] == [1] * len(pages)
    # And nothing else but one audit-log request per poll (give or take the poll under way
    # at either end): one request per changed entity.
    routes = Counter(r.route for r in fake.requests)
    done = svc.poller.polls - polls
    assert done - 1 <= routes.pop("/api/audit-log", 0) <= done + 1, (done, routes)
    assert routes == {"/api/pages/{id}": len(pages)}, routes
    rows = await svc.store.fetchall(
        "SELECT source, outcome, paired FROM events WHERE type = 'page_update'"
    )
    assert sorted(tuple(r) for r in rows) == sorted(
        [("audit", "covered", 1)] * len(pages) + [("webhook", "queued", 1)] * len(pages)
    )


async def test_an_event_older_than_the_last_fetch_costs_none(
    make_fake: FakeFactory, make_service: ServiceFactory
) -> None:
    fake = await make_fake()
    page = await fake.create_page(book_id=2, name="Covered", html="<p>0</p>")
    svc = await make_service(fake, poll_interval=3600)
    # The audit log is unreadable until we poll by hand, so the order below is deterministic.
    fake.faults.fail_listings = {"/api/audit-log"}
    fake.faults.webhook_drop = 1.0
    await fake.update_page(page, html="<p>1: its webhook is lost</p>")
    # BookStack's clock has one-second resolution; COVER_MARGIN is 2 s.
    await asyncio.sleep(3.1)
    fake.faults.webhook_drop = 0.0
    fake.reset_requests()
    await fake.update_page(page, name="Covered again")  # this webhook reads the page

    async def fetched() -> bool:
        return reads_of(fake, f"/api/pages/{page}") == 1 and await svc.queue.depth() == 0

    await eventually(fetched, 10, "the second webhook's read")
    fake.faults.fail_listings = set()
    await svc.poller.poll_once()
    await svc.dispatcher.drain(5)

    assert reads_of(fake, f"/api/pages/{page}") == 1
    rows = await svc.store.fetchall(
        "SELECT activity_id, outcome FROM events WHERE source = 'audit' AND type = 'page_update' "
        "ORDER BY activity_id"
    )
    assert [r[1] for r in rows] == ["covered", "covered"]  # older than the read; paired
    await converge(svc, fake)


# ---- 3b. the audit cursor moves with the events it covers ------------------------------------


async def test_the_audit_cursor_moves_only_in_the_transaction_storing_its_events(
    make_fake: FakeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN 1: the cursor advances in the same transaction that stores the events it
    covers. A poll whose events cannot be stored (the database failing) leaves the cursor
    where it was, and one whose cursor cannot be stored keeps none of its events: either
    way the next poll reads the same rows again and nothing is lost."""
    fake = await make_fake()
    async with app_for(fake, tmp_path / "cursor.db") as app:
        client, store, queue = app.client, app.store, app.queue
        assert (await app.reconciler.full_sync(set_cursor=True)).complete
        poller = AuditPoller(client, queue)
        before = await poller.cursor()
        await fake.update_page(3, html="<p>polled 3</p>")
        await fake.update_page(4, html="<p>polled 4</p>")
        head = fake.state.activities[-1].id
        assert before is not None and head > before

        async def audit_events() -> int:
            row = await store.fetchone("SELECT count(*) FROM events WHERE source = 'audit'")
            assert row is not None
            return int(row[0])

        async def events_fail(*args: Any, **kwargs: Any) -> list[str]:
            raise sqlite3.OperationalError("disk I/O error")

        with monkeypatch.context() as patch:
            patch.setattr(queue, "record_many", events_fail)
            with pytest.raises(sqlite3.OperationalError):
                await poller.poll_once()
        assert await poller.cursor() == before
        assert await audit_events() == 0 and await queue.depth() == 0

        set_state = Tx.set_state

        async def cursor_fails(self: Tx, key: str, value: Any) -> None:
            if key == AUDIT_CURSOR:
                raise sqlite3.OperationalError("disk I/O error")
            await set_state(self, key, value)

        with monkeypatch.context() as patch:
            patch.setattr(Tx, "set_state", cursor_fails)
            with pytest.raises(sqlite3.OperationalError):
                await poller.poll_once()
        assert await poller.cursor() == before
        assert await audit_events() == 0 and await queue.depth() == 0

        assert await poller.poll_once() == 2
        assert await poller.cursor() == head
        assert {r[0] for r in await store.fetchall("SELECT key FROM jobs")} == {"page:3", "page:4"}


# ---- 4. a poison event does not block the queue ---------------------------------------------


async def test_poison_job_is_dead_lettered_and_retried_once_fixed(
    make_fake: FakeFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(eventsync.dispatch, "BACKOFF_BASE", 0.01)
    fake = await make_fake()
    async with app_for(fake, tmp_path / "poison.db", max_attempts=2) as app:
        client, store, queue, dispatcher = app.client, app.store, app.queue, app.dispatcher
        assert (await app.reconciler.full_sync(set_cursor=True)).complete
        poller = AuditPoller(client, queue)

        # Every read of a role fails (500 after the client's own retries): role:4 is poison.
        fake.faults.fail_listings = {"/api/roles/{id}"}
        await fake.update_role(4, description="poison")
        await fake.update_page(3, html="<p>healthy 3</p>")
        await fake.update_chapter(2, name="Healthy chapter")
        await poller.poll_once()
        assert await queue.depth() == 3

        assert not await dispatcher.drain(2.0)  # role:4 waits in back-off; the rest are done
        jobs = await store.fetchall("SELECT key, attempts, last_error FROM jobs")
        assert [(r[0], r[1]) for r in jobs] == [("role:4", 1)]
        assert "500" in jobs[0][2]
        assert await queue.dead_letters() == []
        truth = fake.truth()
        mirror = await store.export()
        assert mirror["pages"] == truth["pages"] and mirror["chapters"] == truth["chapters"]

        # A new event makes the job due again; its second failure is its last.
        await fake.update_role(4, description="poison again")
        await poller.poll_once()
        assert await dispatcher.drain(5.0)
        letters = await queue.dead_letters()
        assert [(d["key"], d["attempts"]) for d in letters] == [("role:4", 2)]
        assert "500" in letters[0]["error"]
        assert await queue.depth() == 0
        assert (await store.export())["roles"] != fake.truth()["roles"]

        # The CLI lists it, with its error.
        settings = Settings(database=tmp_path / "poison.db")

        async def dead_letters(*args: str) -> str:
            capsys.readouterr()
            parsed = cli.build_parser().parse_args(["dead-letters", *args])
            assert await cli.cmd_dead_letters(settings, parsed) == cli.EXIT_OK
            return capsys.readouterr().out

        listed = json.loads(await dead_letters("list", "--json"))
        assert [(d["key"], d["attempts"]) for d in listed] == [("role:4", 2)]
        assert "500" in listed[0]["error"]
        text = await dead_letters("list")
        assert "role:4" in text and "attempts=2" in text and listed[0]["error"] in text

        # Fixed on BookStack's side: the CLI puts the dead letter back and it succeeds.
        fake.faults.fail_listings = set()
        retried = await dead_letters("retry", str(listed[0]["id"]))
        assert retried.startswith("1 dead letter(s) queued again"), retried
        assert await queue.dead_letters() == []
        assert await queue.depth() == 1
        assert await dispatcher.drain(5.0)
        assert await store.export() == fake.truth()


@pytest.mark.parametrize("draw", ["low", "high"])
async def test_a_failed_job_backs_off_exponentially_with_full_jitter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, draw: str
) -> None:
    """DESIGN 5: a job that failed is due again after a random time between 0 and a bound
    that doubles with each attempt. With the random draw pinned to one end of its range the
    delays are exactly 0 or exactly the bounds: a retry without back-off, or one without
    jitter, cannot give both."""
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return low if draw == "low" else high

    monkeypatch.setattr(random, "uniform", uniform)
    async with open_app(
        Settings(database=tmp_path / "backoff.db"),
        client=BookStackClient("http://127.0.0.1:9", "id", "secret"),
        max_attempts=10,
        last_answer=time.time,
    ) as app:
        store, queue, dispatcher = app.store, app.queue, app.dispatcher

        async def flaky(job: Any) -> str:
            raise EventsyncError("a failure that may pass")

        monkeypatch.setattr(app.handlers, "run", flaky)
        await queue.enqueue("page:3", [FETCH])
        bounds = [eventsync.dispatch.BACKOFF_BASE * 2**n for n in range(4)]
        for attempt, bound in enumerate(bounds):
            (job,) = await queue.lease(1, now=time.time() + 3600)
            assert job.attempts == attempt
            before = time.time()
            await dispatcher._process(job)
            after = time.time()
            row = await store.fetchone("SELECT not_before, attempts FROM jobs")
            assert row is not None and row[1] == attempt + 1
            # Due `delay` after the moment the failure was recorded, between before and after.
            delay = 0.0 if draw == "low" else bound
            assert row[0] - after - 1e-3 <= delay <= row[0] - before + 1e-3, (attempt, row[0])
        assert draws == [(0, b) for b in bounds]


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/api/pages/3", 422, "The given data was invalid."),
        ("/api/pages/3", 400, "The request could not be understood"),
        (
            "/api/content-permissions/page/3",
            403,
            "You do not have permission to perform the requested action.",
        ),
    ],
)
async def test_a_permanent_refusal_is_dead_lettered_at_once_with_bookstacks_message(
    make_fake: FakeFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    status: int,
    message: str,
) -> None:
    """A 400, 422 or a 403 outside the audit log gets the same answer however often it is
    asked: one attempt, then the dead letters with BookStack's own words, and the rest of
    the queue carries on."""
    monkeypatch.setattr(eventsync.dispatch, "BACKOFF_BASE", 0.01)
    fake = await make_fake()
    # The queue's 8 attempts for what may pass; none for what cannot.
    async with app_for(fake, tmp_path / "refused.db") as app:
        client, store, queue, dispatcher = app.client, app.store, app.queue, app.dispatcher
        assert (await app.reconciler.full_sync(set_cursor=True)).complete
        fake.faults.error_routes = {path: (status, message)}
        await fake.update_page(3, html="<p>refused</p>")
        await fake.set_permissions("page", 3, fallback=NO_VIEW)
        await fake.update_page(4, html="<p>healthy 4</p>")
        fake.reset_requests()
        await AuditPoller(client, queue).poll_once()
        assert await dispatcher.drain(5.0)

        letters = await queue.dead_letters()
        assert [(d["key"], d["attempts"]) for d in letters] == [("page:3", 1)]
        assert f"({status}): {message}" in letters[0]["error"]
        assert reads_of(fake, path) == 1
        mirror = await store.export()
        assert next(p for p in mirror["pages"] if p["id"] == 4) == next(
            p for p in fake.truth()["pages"] if p["id"] == 4
        )


async def test_an_outage_dead_letters_nothing_and_the_jobs_finish_after_it(
    make_fake: FakeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BookStack down for longer than the retries last: the jobs wait it out (their failures
    do not count while BookStack answers nothing at all), then finish."""
    monkeypatch.setattr(eventsync.dispatch, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(eventsync.dispatch, "BACKOFF_CAP", 0.05)
    fake = await make_fake()
    async with app_for(fake, tmp_path / "outage.db", max_attempts=2, up_window=0.2) as app:
        client, store, queue, dispatcher = app.client, app.store, app.queue, app.dispatcher
        assert (await app.reconciler.full_sync(set_cursor=True)).complete
        for page in (3, 4, 5):
            await fake.update_page(page, html=f"<p>during the outage {page}</p>")
        await AuditPoller(client, queue).poll_once()
        await asyncio.sleep(0.3)  # BookStack's last answer is older than the up window
        fake.faults.outage = True
        for job in await queue.lease(10):  # Unavailable.delay would make them wait 30 s
            await queue.retry(job, "outage", 0, count=False)
        assert not await dispatcher.drain(2.0)
        attempts = [r[0] for r in await store.fetchall("SELECT attempts FROM jobs")]
        assert attempts == [0, 0, 0] and await queue.dead_letters() == []
        fake.faults.outage = False
        async with store.transaction() as tx:
            await tx.execute("UPDATE jobs SET not_before = 0")
        assert await dispatcher.drain(5.0)
        assert await queue.dead_letters() == []
        assert (await store.export())["pages"] == fake.truth()["pages"]


# ---- 5. early webhooks settle -----------------------------------------------------------------


class HoldingProxy:
    """Forwards each webhook to eventsync, then holds BookStack's request open until the
    dispatcher has looked at the entity once: BookStack commits (user_create) or deletes
    (role_delete) only after the webhook POST returns, so that look is guaranteed early."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.statuses: list[int] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HoldingProxy:
        app = web.Application()
        app.router.add_post("/hook", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        settling = self.svc.dispatcher.settling
        body = await request.read()
        async with self._session.post(
            webhook_url(self.svc), data=body, headers={"Content-Type": "application/json"}
        ) as response:
            self.statuses.append(response.status)
        deadline = time.monotonic() + 2.5
        # Polling a counter the dispatcher bumps: there is no event to wait on.
        while self.svc.dispatcher.settling == settling and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return web.Response(status=200)


async def test_early_webhooks_settle_without_the_audit_log(
    make_fake: FakeFactory, make_service: ServiceFactory
) -> None:
    fake = await make_fake()
    svc = await make_service(fake, webhook=False, poll_interval=3600)
    fake.faults.fail_listings = {"/api/audit-log"}  # nothing comes from the audit log
    fake.reset_requests()
    async with HoldingProxy(svc) as proxy:
        fake.add_webhook(proxy.url, timeout=10)
        user = await fake.create_user("Early Bird", "early@example.com", roles=[2, 3])

        async def user_there() -> bool:
            return await _has(svc, "user", user)

        await eventually(user_there, 10, "the early user_create settles into the mirror")
        assert svc.dispatcher.settling >= 1, "the first read came after the commit"
        members = sorted(u for u, rec in fake.state.users.items() if 3 in rec.roles)
        settled_before = svc.dispatcher.settling
        await fake.delete_role(3, migrate_to=4)

        async def role_gone() -> bool:
            return not await _has(svc, "role", 3)

        await eventually(role_gone, 10, "the early role_delete settles")
        assert svc.dispatcher.settling > settled_before, "the first read came after the delete"

        async def idle() -> bool:
            return await svc.queue.depth() == 0

        # The delete's follow-up: re-reading the role its members were migrated to.
        await eventually(idle, 10, "the role-delete follow-ups are done")
    assert proxy.statuses == [202, 202]
    ok = [r for r in fake.requests if r.route == "/api/audit-log" and r.status == 200]
    assert ok == []
    mirror = await svc.store.export()
    truth = fake.truth()
    assert mirror["users"] == truth["users"]
    assert mirror["roles"] == truth["roles"]
    assert members and all(4 in u["roles"] for u in mirror["users"] if u["id"] in members)


@pytest.mark.parametrize(
    ("key", "hint", "route"),
    [
        ("user:999", EXPECT_PRESENT, "/api/users/999"),  # a created user that never shows
        ("role:3", EXPECT_GONE, "/api/roles/3"),  # a deleted role that stays
    ],
)
async def test_an_early_webhook_that_never_settles_is_rechecked_a_bounded_number_of_times(
    make_fake: FakeFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    hint: str,
    route: str,
) -> None:
    """DESIGN 8: the re-checks are bounded; after the last one what BookStack shows is the
    truth (written, not failed: no dead letter)."""
    monkeypatch.setattr(eventsync.handlers, "SETTLE_DELAYS", (0.01, 0.01, 0.01))
    fake = await make_fake()
    async with app_for(fake, tmp_path / "settle.db") as app:
        store, queue, dispatcher = app.store, app.queue, app.dispatcher
        assert (await app.reconciler.full_sync(set_cursor=True)).complete
        fake.reset_requests()
        await queue.enqueue(key, [FETCH, hint])
        assert await dispatcher.drain(5)
        assert reads_of(fake, route) == 3 + 1
        assert dispatcher.settling == 3
        assert await queue.dead_letters() == []
        assert await store.export() == fake.truth()


async def _has(svc: Service, kind: str, entity_id: int) -> bool:
    return await svc.store.get(kind, entity_id) is not None


# ---- 6. coalescing ------------------------------------------------------------------------------


async def test_rapid_updates_to_one_page_coalesce_into_one_job(
    make_fake: FakeFactory, tmp_path: Path
) -> None:
    fake = await make_fake()
    fake.add_webhook(f"{fake.url}/webhook-sink")  # bodies are recorded in webhook_deliveries
    async with app_for(fake, tmp_path / "coalesce.db") as app:
        client, store, queue = app.client, app.store, app.queue
        assert (await app.reconciler.full_sync(set_cursor=True)).complete
        for i in range(20):
            await fake.update_page(9, html=f"<p>rapid {i}</p>")
        await fake.drain_webhooks()
        # The dispatcher is not running: everything waits in the queue, one event at a time
        # as the webhook receiver would hand them in.
        assert len(fake.webhook_deliveries) == 20
        for delivery in fake.webhook_deliveries:
            assert await queue.submit([from_webhook(delivery.body)]) in (["queued"], ["merged"])
        await AuditPoller(client, queue).poll_once()
        jobs = await store.fetchall("SELECT key, events FROM jobs")
        assert [(r[0], r[1]) for r in jobs] == [("page:9", 20)]

        fake.reset_requests()
        assert await app.dispatcher.drain(10)
        assert reads_of(fake, "/api/pages/9") == 1
        assert (await store.export())["pages"] == fake.truth()["pages"]


async def test_events_for_a_running_job_wait_for_it_and_run_it_once_more(
    make_fake: FakeFactory, tmp_path: Path
) -> None:
    """DESIGN 3: while page:9's job runs, no second job for page 9 can start; the events that
    arrive meanwhile (an edit and a permission change) merge into it, with their hints, and
    it runs exactly once more after it finished."""
    fake = await make_fake()
    settings = mirror_settings(fake, tmp_path / "inflight.db", fetch_concurrency=4)
    async with open_app(settings, client=client_for(fake)) as app:
        client, store, queue, dispatcher = app.client, app.store, app.queue, app.dispatcher
        assert (await app.reconciler.full_sync(set_cursor=True)).complete
        poller = AuditPoller(client, queue)
        entered, release = asyncio.Event(), asyncio.Event()
        read = client.read

        async def held_read(path: str, params: Any = None) -> Any:
            if path == "/api/pages/9" and not entered.is_set():
                entered.set()
                await release.wait()
            return await read(path, params)

        client.read = held_read  # type: ignore[method-assign]
        await fake.update_page(9, html="<p>first</p>")
        assert await poller.poll_once() == 1
        fake.reset_requests()
        drained = asyncio.create_task(dispatcher.drain(10))
        await asyncio.wait_for(entered.wait(), 5)

        await fake.update_page(9, name="Renamed while its job ran")
        await fake.set_permissions("page", 9, fallback=NO_VIEW)
        assert await poller.poll_once() == 2
        jobs = await store.fetchall("SELECT key, hints, events, leased_by FROM jobs")
        assert [(r[0], json.loads(r[1]), r[2]) for r in jobs] == [
            ("page:9", ["fetch", "permissions"], 3)
        ]
        assert jobs[0][3] is not None  # still leased by the running job
        assert await queue.lease(10) == []  # nothing for another worker to start
        assert dispatcher.in_flight == 1

        release.set()
        assert await drained
        assert reads_of(fake, "/api/pages/9") == 2  # the held run, then one more
        assert reads_of(fake, "/api/content-permissions/page/9") == 1
        assert await queue.depth() == 0
        mirror, truth = await store.export(), fake.truth()
        assert mirror["pages"] == truth["pages"]
        assert mirror["permissions"] == truth["permissions"]


# ---- 7. the change feed -----------------------------------------------------------------------


async def test_every_mirror_change_is_in_the_change_feed(
    make_fake: FakeFactory, make_service: ServiceFactory
) -> None:
    fake = await make_fake()
    svc = await make_service(fake)
    start = await svc.store.last_seq()
    page = await fake.create_page(book_id=1, name="Feed page", html="<p>f</p>")
    await fake.delete_page(4)
    user = await fake.create_user("Feed User", "feed@example.com", roles=[3])
    await fake.set_permissions("chapter", 2, fallback=NO_VIEW)
    await fake.update_shelf(1, books=[1])
    await converge(svc, fake)

    changes = await svc.store.changes(start, 100_000)
    seqs = [c["seq"] for c in changes]
    assert seqs == sorted(set(seqs)) and seqs[0] > start
    seen = {(c["op"], c["entity"], c["entity_id"]) for c in changes}
    for expected in [
        ("upsert", "page", page),
        ("delete", "page", 4),
        ("upsert", "user", user),
        ("upsert", "user_role", user),
        ("upsert", "permissions", 2),
        ("upsert", "shelf_books", 1),
    ]:
        assert expected in seen, expected
    assert any(c["entity"] == "permissions" and c["content_type"] == "chapter" for c in changes)

    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{svc.port}/changes"
        paged: list[dict[str, Any]] = []
        after = start
        while True:
            async with http.get(base, params={"after": str(after), "limit": "3"}) as response:
                assert response.status == 200
                body = await response.json()
            paged += body["changes"]
            if not body["changes"]:
                assert body["last_seq"] == after
                break
            assert len(body["changes"]) <= 3
            after = body["last_seq"]
        assert paged == json.loads(json.dumps(changes))

        for params in [
            {"after": "abc"},
            {"after": "-1"},
            {"after": "1.5"},
            {"limit": "0"},
            {"limit": "100000"},
            {"limit": "ten"},
            {"after": str(2**70)},
        ]:
            async with http.get(base, params=params) as response:
                assert response.status == 400, params
                assert response.content_type == "application/json"
                error = (await response.json())["error"]
                assert error["code"] == 400 and error["message"], params


# ---- 8. bad input over HTTP -----------------------------------------------------------------


async def _snapshot(store: Store) -> tuple[int, int, int]:
    return (
        await table_count(store, "events"),
        await table_count(store, "jobs"),
        await table_count(store, "changes"),
    )


async def _post(
    http: aiohttp.ClientSession, url: str, data: Any, content_type: str | None
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type} if content_type else {}
    async with http.post(url, data=data, headers=headers) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


async def test_bad_webhooks_get_a_clear_error_and_change_nothing(
    make_fake: FakeFactory, make_service: ServiceFactory
) -> None:
    fake = await make_fake()
    svc = await make_service(fake, webhook=False, poll_interval=3600)
    good = json.dumps({"event": "page_update", "related_item": {"id": 3}}).encode()
    huge = json.dumps({"event": "page_update", "pad": "x" * (1024 * 1024)}).encode()

    async def chunked(payload: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    cases: list[tuple[str, str, Any, str | None, int]] = [
        (
            "wrong secret",
            webhook_url(svc, "not-the-secret-0123456789"),
            good,
            "application/json",
            404,
        ),
        (
            "empty secret",
            f"http://127.0.0.1:{svc.port}/webhooks/bookstack/",
            good,
            "application/json",
            404,
        ),
        ("malformed JSON", webhook_url(svc), b'{"event": "page_update",', "application/json", 400),
        ("not UTF-8", webhook_url(svc), b'{"event": "\xff\xfe"}', "application/json", 400),
        ("text/plain", webhook_url(svc), good, "text/plain", 415),
        ("form", webhook_url(svc), good, "application/x-www-form-urlencoded", 415),
        ("no content type", webhook_url(svc), good, None, 415),
        # A file-like body: aiohttp warns (an error here) about large raw bytes.
        ("over 1 MiB", webhook_url(svc), io.BytesIO(huge), "application/json", 413),
        ("over 1 MiB chunked", webhook_url(svc), chunked(huge), "application/json", 413),
        ("missing event", webhook_url(svc), b'{"text": "hi"}', "application/json", 422),
        ("JSON array", webhook_url(svc), b'[{"event": "page_update"}]', "application/json", 422),
        ("JSON string", webhook_url(svc), b'"page_update"', "application/json", 422),
        ("event not a string", webhook_url(svc), b'{"event": 7}', "application/json", 422),
        ("no item", webhook_url(svc), b'{"event": "page_update"}', "application/json", 422),
    ]
    async with aiohttp.ClientSession() as http:
        for name, url, data, content_type, expected in cases:
            before = await _snapshot(svc.store)
            status, body = await _post(http, url, data, content_type)
            assert status == expected, f"{name}: {status} {body}"
            assert isinstance(body, dict) and body["error"]["message"], name
            assert await _snapshot(svc.store) == before, f"{name} changed the database"

        # Unknown event types are accepted (BookStack adds types) and stored as ignored.
        before_events, before_jobs, _ = await _snapshot(svc.store)
        status, body = await _post(
            http, webhook_url(svc), b'{"event": "brand_new_thing"}', "application/json"
        )
        assert 200 <= status < 300, body
        assert await table_count(svc.store, "events") == before_events + 1
        assert await table_count(svc.store, "jobs") == before_jobs
        row = await svc.store.fetchone("SELECT type, outcome FROM events ORDER BY seq DESC")
        assert row is not None and tuple(row) == ("brand_new_thing", "ignored")


async def test_webhook_ids_that_are_not_ids_are_rejected_not_500(
    make_fake: FakeFactory, make_service: ServiceFactory
) -> None:
    """Bugs found: an id beyond SQLite's INTEGER made the inbox commit raise (500, and the
    same failure for every other event committed in that batch); `true` as an id became the
    key "page:True", a job that crashes on every attempt."""
    fake = await make_fake()
    svc = await make_service(fake, webhook=False, poll_interval=3600)
    cases = {
        "id over 64 bits": {
            "event": "page_update",
            "triggered_at": "2024-10-15T10:00:00.000000Z",
            "related_item": {"id": 2**64},
        },
        "boolean id": {"event": "page_update", "related_item": {"id": True}},
    }
    async with aiohttp.ClientSession() as http:
        for name, body in cases.items():
            before = await _snapshot(svc.store)
            status, answer = await _post(
                http, webhook_url(svc), json.dumps(body).encode(), "application/json"
            )
            assert 400 <= status < 500, f"{name}: {status} {answer}"
            assert await _snapshot(svc.store) == before, f"{name} changed the database"


async def test_a_dispatcher_with_every_slot_busy_waits_rather_than_spins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More due jobs than worker slots: the loop waits for a slot to free. Looking for due
    jobs again and again meanwhile costs a core and a query per turn."""
    async with open_app(
        Settings(database=tmp_path / "busy.db", fetch_concurrency=2),
        client=BookStackClient("http://127.0.0.1:9", "id", "secret"),
        last_answer=time.time,
    ) as app:
        release = asyncio.Event()

        async def slow(job: Any) -> str:
            await release.wait()
            return "updated"

        monkeypatch.setattr(app.handlers, "run", slow)
        looks = 0
        next_due = app.queue.next_due

        async def counted() -> float | None:
            nonlocal looks
            looks += 1
            return await next_due()

        monkeypatch.setattr(app.queue, "next_due", counted)
        for n in range(10):
            await app.queue.enqueue(f"page:{n}", [FETCH])
        stop = asyncio.Event()
        running = asyncio.create_task(app.dispatcher.run(stop, grace=1.0))
        await asyncio.sleep(1.0)  # two jobs run, eight wait: nothing to do but wait
        assert app.dispatcher.in_flight == 2
        assert looks <= 5, f"looked for due jobs {looks} times in a second with no free slot"
        release.set()
        assert await app.dispatcher.drain(10)
        stop.set()
        await running
