"""Gaps, outages and silent changes: the mirror converges anyway (DESIGN guarantees 6, 7, 9)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    app_for,
    client_for,
    database_value,
    eventually,
    first_difference,
    mirror_settings,
    service_settings,
)
from structlog.testing import capture_logs

from eventsync import cli
from eventsync.app import make_client, open_app, open_store
from eventsync.config import Settings
from eventsync.events import DIFF_KEY, THOROUGH
from eventsync.ingest.auditlog import AuditPoller
from eventsync.service import Service
from eventsync.store.base import StoreError
from eventsync.testing import FakeBookStack
from eventsync.testing.models import ALL_PERMISSIONS
from eventsync.testing.state import ADMIN_ROLE_ID, ADMIN_USER_ID, GUEST_USER_ID

# Every test runs on a SQLite file, then on PostgreSQL.
pytestmark = pytest.mark.usefixtures("on_both_backends")

SECRET = "recovery-test-secret-0123456789"
RPM = 100_000


def settings_for(fake: FakeBookStack, db: Path, **extra: Any) -> Settings:
    return service_settings(fake, db, SECRET, **extra)


@asynccontextmanager
async def running(
    settings: Settings,
    *,
    webhooks_from: FakeBookStack | None = None,
    synced: bool = True,
    **client_options: Any,
) -> AsyncIterator[Service]:
    client = make_client(
        settings, requests_per_minute=RPM, backoff_base=0.01, backoff_cap=0.05, **client_options
    )
    async with open_app(settings, client=client) as app:
        svc = Service(app)
        await svc.start()
        try:
            if synced:
                await asyncio.wait_for(svc.synced.wait(), 30)
            if webhooks_from is not None:
                webhooks_from.add_webhook(
                    f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}"
                )
            yield svc
        finally:
            await svc.stop()


async def converged(svc: Service, fake: FakeBookStack) -> bool:
    return await svc.store.export() == fake.truth()


def an_hour_behind() -> datetime:
    """BookStack's clock an hour behind ours: no row is "changed within the second of its
    read" (apply.RACE_WINDOW), so a plain listing diff re-reads only what its listings
    show changed, and what only a gap's thorough diff can find stays unfound without it."""
    return datetime.now(UTC) - timedelta(hours=1)


async def swap_roles_keeping_counts(fake: FakeBookStack, *, silently: bool = False) -> None:
    """Two users trade roles: every role keeps its users_count and no user's updated_at moves
    (a pivot sync), so no listing shows it; only reading the roles does. `silently`: as SSO
    group sync does it, with no event at all."""
    single = {
        u: next(iter(rec.roles))
        for u, rec in sorted(fake.state.users.items())
        if u not in (ADMIN_USER_ID, GUEST_USER_ID)
        and len(rec.roles) == 1
        and ADMIN_ROLE_ID not in rec.roles
    }
    one = next(iter(single))
    other = next(u for u, role in single.items() if role != single[one])
    role_of_one, role_of_other = single[one], single[other]
    if silently:
        await fake.sso_group_sync(one, [role_of_other])
        await fake.sso_group_sync(other, [role_of_one])
    else:
        await fake.update_user(one, roles=[role_of_other])
        await fake.update_user(other, roles=[role_of_one])


def gap_lines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log's warnings that a gap was found (DESIGN 7: each gap says so in the log)."""
    return [e for e in entries if e["log_level"] == "warning" and "gap" in e["event"]]


async def test_audit_log_cleared_while_down_is_a_gap_and_converges(tmp_path: Path) -> None:
    no_view = {"view": False, "create": False, "update": False, "delete": False}
    async with FakeBookStack(requests_per_minute=RPM, clock=an_hour_behind) as fake:
        fake.seed(pages=60, books=4, seed=3)
        for i in range(5):
            await fake.update_page(1 + i, html=f"<p>before {i}</p>")
        await fake.set_permissions("page", 5, fallback=no_view)
        settings = settings_for(fake, tmp_path / "m.db")
        async with running(settings) as svc:
            await svc.poller.poll_once()
            await svc.dispatcher.drain(10)
            cursor_before = await svc.poller.cursor()
            assert await converged(svc, fake)
        assert cursor_before is not None and cursor_before >= 5
        # While eventsync is down: changes, then the log is cleared (ids restart at 1). The
        # new rows of a page already restricted and the role swap move no listing field and
        # keep the {is_restricted} search as it was: only a diff that re-reads permissions
        # and roles (as a gap's does; the start-up diff does not) can find them.
        await fake.update_book(2, name="Renamed while down")
        await fake.delete_page(3)
        viewers = [{"role_id": 3, "view": True, "create": False, "update": False, "delete": False}]
        await fake.set_permissions("page", 5, fallback=no_view, role_permissions=viewers)
        await swap_roles_keeping_counts(fake)
        fake.clear_activity()
        await fake.update_page(4, html="<p>after clear</p>")
        with capture_logs() as entries:
            async with running(settings) as svc:
                await eventually(lambda: _has_gap(svc))
                assert await svc.store.get_state("audit_gap") is not None
                # The gap queues a thorough diff sync; it finds all of it, and closes the gap.
                await svc.dispatcher.drain(20)
                mirror = await svc.store.export()
                assert mirror == fake.truth(), first_difference(mirror, fake.truth())
                assert await svc.store.get_state("audit_gap") is None
                assert int(await svc.store.get_state("audit_cursor") or -1) < cursor_before
        assert any("below our cursor" in str(e.get("reason")) for e in gap_lines(entries))


async def _has_gap(svc: Service) -> bool:
    await svc.poller.poll_once()
    return await svc.store.get_state("last_gap") is not None


async def test_webhook_never_in_audit_log_is_a_gap(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM, clock=an_hour_behind) as fake:
        fake.seed(pages=30, books=3, seed=4)
        settings = settings_for(fake, tmp_path / "m.db", webhook_confirm_grace=0.5)
        async with running(settings) as svc:
            page = fake.truth()["pages"][1]
            # What the audit log does not show (as when it is being cleared, or the token's
            # audit view is not what we think) may include changes no listing shows either:
            # only the gap's thorough diff can find these.
            await swap_roles_keeping_counts(fake, silently=True)
            # A webhook for an activity the audit log never shows.
            body = {
                "event": "page_update",
                "text": "Admin updated page",
                "triggered_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                "triggered_by": {"id": 1, "name": "Admin", "slug": "admin"},
                "webhook_id": 1,
                "webhook_name": "eventsync",
                "url": f"{fake.url}/books/some-book/page/{page['slug']}",
                "related_item": {
                    "id": page["id"],
                    "book_id": page["book_id"],
                    "chapter_id": page["chapter_id"] or 0,
                    "name": page["name"],
                },
            }
            url = f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}"
            with capture_logs() as entries:
                async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
                    assert resp.status == 202
                assert await svc.store.get_state("last_gap") is None
                await eventually(lambda: _state_is_set(svc, "last_gap"), timeout=10)
            gap = await svc.store.get_state("last_gap")
            assert gap is not None and "never appeared in the audit log" in gap
            assert any("never appeared" in str(e.get("reason")) for e in gap_lines(entries))
            # The gap queued a thorough diff sync, which closes it.
            await svc.dispatcher.drain(20)
            mirror = await svc.store.export()
            assert mirror == fake.truth(), first_difference(mirror, fake.truth())
            assert await svc.store.get_state("audit_gap") is None


async def test_downtime_longer_than_the_audit_log_covers_is_a_gap(tmp_path: Path) -> None:
    """DESIGN 7: down for longer than EVENTSYNC_MAX_DOWNTIME (what the audit log is trusted
    to cover) is a gap: said in the log, and a thorough diff finds what the log lost."""
    async with FakeBookStack(requests_per_minute=RPM, clock=an_hour_behind) as fake:
        fake.seed(pages=30, books=3, seed=4)
        settings = settings_for(fake, tmp_path / "m.db", max_downtime=600)
        async with running(settings) as svc:
            await svc.poller.poll_once()
            assert await converged(svc, fake)
        # The last successful poll was an hour ago; meanwhile, changes no listing shows.
        async with await open_store(settings.database) as store, store.transaction() as tx:
            await tx.set_state("audit_last_poll_at", time.time() - 3600)
        await swap_roles_keeping_counts(fake, silently=True)
        with capture_logs() as entries:
            async with running(settings) as svc:
                await eventually(lambda: _state_is_set(svc, "last_gap"), timeout=10)
                await svc.dispatcher.drain(20)
                mirror = await svc.store.export()
                assert mirror == fake.truth(), first_difference(mirror, fake.truth())
                assert await svc.store.get_state("audit_gap") is None
                gap = await svc.store.get_state("last_gap")
        assert gap is not None and "longer than EVENTSYNC_MAX_DOWNTIME" in gap
        assert any("MAX_DOWNTIME" in str(e.get("reason")) for e in gap_lines(entries))


GAP_REASONS = {
    "cleared": "is below our cursor",
    "cleared and refilled": "is no longer the activity we read",
    "pruned": "we had read is gone",
}


@pytest.mark.parametrize("how", list(GAP_REASONS))
async def test_an_audit_log_cleared_or_pruned_past_the_cursor_is_a_gap(
    tmp_path: Path, how: str
) -> None:
    """DESIGN 7, each way the rows behind our cursor can go: a cleared log whose ids restart
    below it, one refilled past it (another activity now has our cursor's id), and one
    pruned up to it. Each is a gap, said in the log, that queues a thorough diff; the new
    log is read from its start."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=2, seed=5)
        async with app_for(fake, tmp_path / "m.db") as app:
            client, store, queue = app.client, app.store, app.queue
            assert (await app.reconciler.full_sync(set_cursor=True)).complete
            poller = AuditPoller(client, queue)
            for page in (1, 2, 3):
                await fake.update_page(page, html=f"<p>read {page}</p>")
            await poller.poll_once()
            cursor = await poller.cursor()
            assert cursor is not None and cursor >= 3
            if how == "cleared":
                fake.clear_activity()
                await fake.update_page(4, html="<p>after the clear</p>")
            elif how == "cleared and refilled":
                fake.clear_activity()
                for _ in range(cursor + 2):
                    await fake.log_ignored_activity("auth_login", "standard; (1) Admin")
            else:
                await fake.update_page(4, html="<p>after the cursor</p>")
                await fake.update_page(5, html="<p>after the cursor</p>")
                fake.state.activities[:] = [a for a in fake.state.activities if a.id > cursor]
            with capture_logs() as entries:
                await poller.poll_once()
            gap = await store.get_state("last_gap")
            assert gap is not None and GAP_REASONS[how] in gap, gap
            assert any(GAP_REASONS[how] in str(e.get("reason")) for e in gap_lines(entries))
            row = await store.fetchone("SELECT payload FROM jobs WHERE key = ?", (DIFF_KEY,))
            assert row is not None and json.loads(row[0]) == THOROUGH
            assert await poller.cursor() == fake.state.activities[-1].id


async def test_an_activity_committed_after_a_later_one_is_read_by_the_overlap(
    tmp_path: Path,
) -> None:
    """DESIGN 7: ids are assigned before commit, so a lower id can become visible after a
    higher one; each poll re-reads a small overlap behind its cursor and dedupes it by
    activity id."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=2, seed=5)
        async with app_for(fake, tmp_path / "m.db") as app:
            client, store, queue = app.client, app.store, app.queue
            assert (await app.reconciler.full_sync(set_cursor=True)).complete
            poller = AuditPoller(client, queue)
            await fake.update_page(3, html="<p>its transaction commits late</p>")
            late = fake.state.activities[-1]
            late.committed = False
            await fake.update_page(4, html="<p>committed at once</p>")
            assert await poller.poll_once() == 1
            assert (await poller.cursor() or 0) > late.id
            late.committed = True
            assert await poller.poll_once() == 1  # page 3's row; page 4's is not new again
            jobs = await store.fetchall("SELECT key, events FROM jobs ORDER BY key")
            assert [tuple(r) for r in jobs] == [("page:3", 1), ("page:4", 1)]
            rows = await store.fetchall(
                "SELECT activity_id FROM events WHERE source = 'audit' AND type = 'page_update'"
            )
            assert sorted(r[0] for r in rows) == [late.id, late.id + 1]
            assert await store.get_state("last_gap") is None


async def test_duplicated_webhooks_are_not_a_gap(tmp_path: Path) -> None:
    """Every webhook BookStack sends twice (a retrying proxy or queue worker) is stored, costs
    no second read, and is no sign of a gap once its one audit row has paired the first."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=30, books=3, seed=4)
        settings = settings_for(fake, tmp_path / "m.db", webhook_confirm_grace=0.5)
        async with running(settings, webhooks_from=fake) as svc:
            fake.faults.webhook_duplicate = 1.0
            fake.reset_requests()
            for page in (3, 4, 5):
                await fake.update_page(page, html=f"<p>sent twice {page}</p>")
            await fake.drain_webhooks()
            await svc.dispatcher.drain(5)
            await asyncio.sleep(1.0)  # past the confirmation grace
            await svc.poller.poll_once()
            await svc._check_webhooks_confirmed()
            assert await svc.store.get_state("last_gap") is None
            rows = await svc.store.fetchall(
                "SELECT source, outcome, paired FROM events WHERE type = 'page_update'"
            )
            assert sorted(tuple(r) for r in rows) == sorted(
                [("webhook", "duplicate", 1)] * 3
                + [("webhook", "queued", 1)] * 3
                + [("audit", "covered", 1)] * 3
            )
            assert fake.request_counts()["/api/pages/{id}"] == 3
            assert await converged(svc, fake)


async def _state_is_set(svc: Service, key: str) -> bool:
    await svc.poller.poll_once()
    return await svc.store.get_state(key) is not None


async def test_periodic_diff_catches_silent_changes(tmp_path: Path) -> None:
    # BookStack's clock an hour behind: no row is re-read for having changed within the
    # second of its read, so only the diff's comparison of placement finds the re-sort.
    async with FakeBookStack(requests_per_minute=RPM, clock=an_hour_behind) as fake:
        fake.seed(pages=80, books=5, seed=5)
        # The probe off: what it finds within a poll, the periodic diff must find alone.
        settings = settings_for(fake, tmp_path / "m.db", reconcile_interval=0.5, probe=False)
        async with running(settings, webhooks_from=fake) as svc:
            # Silent in BookStack (FACTS 2.5 and first section): an attachment, and a
            # re-sort under a sort rule, which moves a chapter's and a page's priority but
            # no updated_at. No handler can derive either; only the diff's listings show
            # them, when it compares placement as well as updated_at.
            truth = fake.truth()
            page = truth["pages"][0]["id"]
            await fake.create_attachment(page, "spec.pdf", content=b"%PDF", extension="pdf")
            chapter = fake.state.chapters[truth["chapters"][0]["id"]]
            chapter.priority += 7
            fake.state.pages[truth["pages"][1]["id"]].priority += 7

            async def done() -> bool:
                await svc.dispatcher.drain(5)
                return await converged(svc, fake)

            await eventually(done, timeout=30)


async def test_sweep_catches_changes_that_move_no_timestamp(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=2, shelves=1, seed=6)
        settings = settings_for(
            fake, tmp_path / "m.db", sweep_share=0.5, sweep_interval=0, requests_per_minute=6000
        )
        async with running(settings) as svc:
            shelf = fake.truth()["shelves"][0]["id"]
            await fake.set_permissions(
                "bookshelf",
                shelf,
                fallback={"view": True, "create": False, "update": False, "delete": False},
                role_permissions=[
                    {"role_id": 3, "view": False, "create": False, "update": False, "delete": False}
                ],
            )
            await fake.copy_shelf_permissions_to_books(shelf)  # silent
            user = fake.truth()["users"][-1]["id"]
            await fake.sso_group_sync(user, [2, 3])  # silent
            # A copied book goes on the shelf with no shelf event and no timestamp moving:
            # Cloner::cloneBook's Bookshelf::appendBook (FACTS 2.5).
            copy = await fake.create_book("A copied book")
            fake.state.shelves[shelf].books.append(copy)

            async def swept() -> bool:
                await svc.dispatcher.drain(5)
                mirror = await svc.store.export()
                truth = fake.truth()
                return all(
                    mirror[section] == truth[section]
                    for section in ("permissions", "users", "shelves")
                )

            await eventually(swept, timeout=40)
            status = await svc.status()
            assert status["sweep"]["progress"] is not None


async def test_the_sweep_stays_within_its_share_of_the_request_budget(tmp_path: Path) -> None:
    """DESIGN 9: the sweep verifies every item within one cycle, and spends no more than
    EVENTSYNC_SWEEP_SHARE of EVENTSYNC_REQUESTS_PER_MINUTE doing it."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=10, books=2, shelves=2, roles=3, permission_share=0.3, seed=6)
        share, budget = 0.05, 6000  # 5 requests a second for the sweep
        settings = settings_for(
            fake,
            tmp_path / "m.db",
            sweep_share=share,
            sweep_interval=0,
            requests_per_minute=budget,
            probe=False,
        )
        async with running(settings) as svc:
            cost = sum(len(hints) for _, hints in await svc._sweep_items())
            assert cost >= 10, "too small a cycle to say anything"

            async def cycled() -> bool:
                return await svc.store.get_state("sweep_last_cycle_seconds") is not None

            await eventually(cycled, timeout=30, what="one sweep cycle")
            seconds = float(await svc.store.get_state("sweep_last_cycle_seconds") or 0)
            assert seconds >= 0.9 * cost / (share * budget / 60), (seconds, cost)


async def test_outage_of_eventsync_during_200_changes_then_reconcile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # BookStack's clock an hour behind ours: nothing may depend on the two agreeing (and the
    # diff at the end re-reads no row as "changed within the second of its read").
    def an_hour_behind() -> datetime:
        return datetime.now(UTC) - timedelta(hours=1)

    async with FakeBookStack(requests_per_minute=RPM, clock=an_hour_behind) as fake:
        fake.seed(pages=150, books=6, seed=7)
        settings = settings_for(fake, tmp_path / "m.db")
        async with running(settings):
            pass
        # Down: 200 changes of many kinds; the webhooks go nowhere.
        pages = [p["id"] for p in fake.truth()["pages"]]
        for i in range(120):
            await fake.update_page(pages[i % len(pages)], html=f"<p>edit {i}</p>")
        for i in range(30):
            await fake.create_page(book_id=1 + i % 5, name=f"New {i}", html="<p>n</p>")
        for i in range(20):
            await fake.delete_page(pages[-1 - i])
        for i in range(10):
            await fake.update_book(1 + i % 6, name=f"Book renamed {i}")
        for i in range(10):
            await fake.set_permissions(
                "page",
                pages[i],
                fallback={"view": False, "create": False, "update": False, "delete": False},
            )
        for i in range(10):
            await fake.update_user(1 + (i % 3), name=f"User {i}")
        for name in (
            "EVENTSYNC_BOOKSTACK_URL",
            "EVENTSYNC_BOOKSTACK_TOKEN_ID",
            "EVENTSYNC_BOOKSTACK_TOKEN_SECRET",
            "EVENTSYNC_DATABASE",
            "EVENTSYNC_REQUESTS_PER_MINUTE",
        ):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("EVENTSYNC_BOOKSTACK_URL", fake.url)
        monkeypatch.setenv("EVENTSYNC_BOOKSTACK_TOKEN_ID", fake.token_id)
        monkeypatch.setenv("EVENTSYNC_BOOKSTACK_TOKEN_SECRET", fake.token_secret)
        monkeypatch.setenv("EVENTSYNC_DATABASE", database_value(tmp_path / "m.db"))
        monkeypatch.setenv("EVENTSYNC_REQUESTS_PER_MINUTE", str(RPM))
        monkeypatch.chdir(tmp_path)
        fake.reset_requests()
        settings = cli.load_settings()
        args = cli.build_parser().parse_args(["reconcile"])
        assert await cli.cmd_reconcile(settings, args) == cli.EXIT_OK
        async with await open_store(tmp_path / "m.db") as store:
            mirror = await store.export()
        assert mirror == fake.truth(), first_difference(mirror, fake.truth())
        # Caught up from the audit log (one read per changed item), then one listing of each
        # kind for what no event reports; nothing read twice.
        counts = fake.request_counts()
        changed_pages = len({pages[i % len(pages)] for i in range(120)} | set(pages[-20:])) + 30
        links = sum(1 for r in fake.requests if r.route == "/api/pages/{id}") - changed_pages
        assert counts["/api/pages"] == 1
        assert 0 <= links <= 20, "page reads beyond the changed pages: links rewritten by renames"
        assert counts["/api/books/{id}"] == len({1 + i % 6 for i in range(10)})
        # The 10 permission changes; the 30 new pages' default permissions cost no read.
        assert counts["/api/content-permissions/{type}/{id}"] == 10
        assert "consistent" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["cleared", "down too long"])
async def test_reconcile_after_a_gap_diffs_everything_thoroughly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    how: str,
) -> None:
    """DESIGN 7 for `eventsync reconcile`: a cleared audit log, or a downtime longer than
    EVENTSYNC_MAX_DOWNTIME, makes it a diff of everything that re-reads every item's
    permissions, and it says why; its plain listing diff could not find what changed here."""
    no_view = {"view": False, "create": False, "update": False, "delete": False}
    viewers = [{"role_id": 3, "view": True, "create": False, "update": False, "delete": False}]
    async with FakeBookStack(requests_per_minute=RPM, clock=an_hour_behind) as fake:
        fake.seed(pages=30, books=3, shelves=1, seed=4)
        shelf = fake.truth()["shelves"][0]
        book = shelf["books"][0]
        await fake.set_permissions("book", book, fallback=no_view)
        await fake.set_permissions("bookshelf", shelf["id"], role_permissions=viewers)
        for page in (1, 2, 3):
            await fake.update_page(page, html=f"<p>read {page}</p>")
        settings = settings_for(fake, tmp_path / "m.db")
        async with running(settings) as svc:
            await svc.poller.poll_once()
            await svc.dispatcher.drain(10)
            assert (await svc.poller.cursor() or 0) >= 3
        # The book, restricted already, takes the shelf's rows: no event, no timestamp moves,
        # and the {is_restricted} search shows it as before.
        assert book in await fake.copy_shelf_permissions_to_books(shelf["id"])
        if how == "cleared":
            fake.clear_activity()
            await fake.update_page(4, html="<p>after the clear</p>")
            said = "diff sync of everything (gap: audit log highest id"
        else:
            async with await open_store(settings.database) as store, store.transaction() as tx:
                await tx.set_state("audit_last_poll_at", time.time() - 3600)
            said = "longer than EVENTSYNC_MAX_DOWNTIME"
        for name in list(os.environ):
            if name.startswith("EVENTSYNC_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("EVENTSYNC_BOOKSTACK_URL", fake.url)
        monkeypatch.setenv("EVENTSYNC_BOOKSTACK_TOKEN_ID", fake.token_id)
        monkeypatch.setenv("EVENTSYNC_BOOKSTACK_TOKEN_SECRET", fake.token_secret)
        monkeypatch.setenv("EVENTSYNC_DATABASE", database_value(tmp_path / "m.db"))
        monkeypatch.setenv("EVENTSYNC_REQUESTS_PER_MINUTE", str(RPM))
        monkeypatch.setenv("EVENTSYNC_MAX_DOWNTIME", "600")
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        args = cli.build_parser().parse_args(["reconcile"])
        assert await cli.cmd_reconcile(cli.load_settings(), args) == cli.EXIT_OK
        assert said in capsys.readouterr().err
        async with await open_store(tmp_path / "m.db") as store:
            mirror = await store.export()
        assert mirror == fake.truth(), first_difference(mirror, fake.truth())


async def test_diff_sync_refreshes_pages_that_include_a_changed_page(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=40, books=4, shelves=2, seed=11)
        target = await _included_page(fake)
        settings = mirror_settings(fake, tmp_path / "m.db", requests_per_minute=RPM)
        async with open_app(settings) as app:
            store, reconciler = app.store, app.reconciler
            assert (await reconciler.full_sync()).complete
            # Changed while eventsync is down: the includers' own rows do not move at all.
            await fake.update_page(target, html="<p>new words inside an include</p>")
            summary = await reconciler.full_sync()
            assert summary.complete
            mirror = await store.export()
            assert mirror == fake.truth(), first_difference(mirror, fake.truth())


async def _included_page(fake: FakeBookStack) -> int:
    import re

    for page in fake.truth()["pages"]:
        found = re.findall(r"\{\{@(\d+)", page["raw_html"] or "")
        if found:
            return int(found[0])
    raise AssertionError("the seeded wiki has no includes")


async def test_periodic_diff_of_an_unchanged_wiki_makes_listing_requests_only(
    tmp_path: Path,
) -> None:
    # Rows last changed an hour ago, as in a wiki at rest (rows changed within a second or two
    # of a read are rightly re-read once: only a later read proves that second held nothing).
    def an_hour_ago() -> datetime:
        return datetime.now(UTC) - timedelta(hours=1)

    async with FakeBookStack(requests_per_minute=RPM, clock=an_hour_ago) as fake:
        fake.seed(pages=120, books=5, seed=12)
        settings = mirror_settings(fake, tmp_path / "m.db", requests_per_minute=RPM)
        async with open_app(settings) as app:
            reconciler = app.reconciler
            assert (await reconciler.full_sync()).complete
            fake.reset_requests()
            summary = await reconciler.full_sync(
                all_permissions=False, set_cursor=False, verify_memberships=False
            )
            assert summary.complete
            reads = {r: n for r, n in fake.request_counts().items() if "{" in r}
            assert reads == {}
            # The listings themselves were made: it is a real diff, not a no-op.
            assert fake.request_counts()["/api/pages"] == 1


async def test_kill_9_during_a_diff_sync_then_reconcile_converges(tmp_path: Path) -> None:
    import os
    import signal
    import sys

    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=300, books=8, seed=13)
        fake.faults.latency = 0.01  # long enough to be killed half-way
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EVENTSYNC_")},
            "EVENTSYNC_BOOKSTACK_URL": fake.url,
            "EVENTSYNC_BOOKSTACK_TOKEN_ID": fake.token_id,
            "EVENTSYNC_BOOKSTACK_TOKEN_SECRET": fake.token_secret,
            "EVENTSYNC_DATABASE": database_value(tmp_path / "m.db"),
            "EVENTSYNC_REQUESTS_PER_MINUTE": str(RPM),
            "EVENTSYNC_LOG_LEVEL": "warning",
        }

        async def reconcile() -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "eventsync",
                "reconcile",
                env=env,
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )

        proc = await reconcile()
        # Kill it once part of the mirror is written, without any chance to clean up.
        await eventually(lambda: _pages_written(tmp_path / "m.db"), timeout=30)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        async with await open_store(tmp_path / "m.db") as store:
            partial = await store.export()
            assert 0 < len(partial["pages"]) < 300
            assert await store.get_state("last_full_sync_at") is None
        await fake.update_page(fake.truth()["pages"][0]["id"], html="<p>while down</p>")
        fake.faults.latency = 0.0
        proc = await reconcile()
        out, err = await proc.communicate()
        assert proc.returncode == 0, out.decode() + err.decode()
        async with await open_store(tmp_path / "m.db") as store:
            mirror = await store.export()
        assert mirror == fake.truth(), first_difference(mirror, fake.truth())


async def _pages_written(db: Path) -> bool:
    if database_value(db) == str(db) and not await asyncio.to_thread(db.exists):
        return False  # a SQLite file the sync has not created yet
    try:
        async with await open_store(database_value(db)) as store:
            return (await store.counts())["page"] > 50
    except StoreError:
        return False


async def test_links_rewritten_by_a_rename_or_move_are_refreshed_without_a_diff(
    tmp_path: Path,
) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=80, books=5, seed=5)
        # No periodic diff, no sweep, no probe (link rewrites move the pages' updated_at,
        # which it would find): only the events and what the handlers derive.
        settings = settings_for(fake, tmp_path / "m.db", reconcile_interval=3600, probe=False)
        async with running(settings, webhooks_from=fake) as svc:
            import re

            linked = {
                int(m)
                for p in fake.truth()["pages"]
                for m in re.findall(r"/page/page-(\d+)", p["raw_html"] or "")
            }
            target = min(linked) if linked else fake.truth()["pages"][0]["id"]
            await fake.update_page(target, name="A brand new title")  # slug changes
            await fake.move_chapter(1, 3)  # its pages' URLs change
            await fake.update_book(2, name="Book with a new name")  # every URL below it

            async def done() -> bool:
                await svc.dispatcher.drain(5)
                return await converged(svc, fake)

            await eventually(done, timeout=20)
            assert await svc.queue.depth() == 0


async def test_attachments_are_diffed_and_their_content_kept_when_asked(tmp_path: Path) -> None:
    """Attachments emit no events (FACTS 2.5): each diff sync mirrors what its listing shows;
    with EVENTSYNC_ATTACHMENT_CONTENT the file (or the link's URL) is kept too, read once per
    new or changed attachment."""
    now = [datetime.now(UTC) - timedelta(hours=1)]

    def clock() -> datetime:
        return now[0]

    async with FakeBookStack(requests_per_minute=RPM, clock=clock) as fake:
        fake.seed(pages=10, books=2, attachments=0, seed=8)
        page = fake.truth()["pages"][0]["id"]
        spec = await fake.create_attachment(page, "spec.pdf", content=b"%PDF-1.7", extension="pdf")
        link = await fake.create_attachment(page, "home", link="https://example.org/home")
        settings = mirror_settings(fake, tmp_path / "m.db", attachment_content=True)
        async with open_app(settings, client=client_for(fake)) as app:
            store, reconciler = app.store, app.reconciler

            async def stored(attachment_id: int) -> tuple[Any, Any]:
                row = await store.get("attachment", attachment_id)
                assert row is not None
                return row["link"], row["content"]

            assert (await reconciler.full_sync()).complete
            assert await stored(spec) == (None, b"%PDF-1.7")
            assert await stored(link) == ("https://example.org/home", None)

            # Changed content moves updated_at: only that attachment is read again.
            now[0] += timedelta(seconds=5)
            await fake.update_attachment(spec, content=b"%PDF-2.0")
            await fake.delete_attachment(link)
            fake.reset_requests()
            assert (await app.apply.sync_attachments()).updated == 1
            assert await stored(spec) == (None, b"%PDF-2.0")
            assert await store.get("attachment", link) is None
            assert fake.request_counts() == {"/api/attachments": 1, "/api/attachments/{id}": 1}
            assert (await store.export())["attachments"] == fake.truth()["attachments"]

            # A read that fails leaves the row to the next diff: nothing half-written.
            now[0] += timedelta(seconds=5)
            await fake.update_attachment(spec, name="spec v3.pdf", content=b"%PDF-3")
            fake.faults.fail_listings = {"/api/attachments/{id}"}
            summary = await reconciler.full_sync()
            assert not summary.complete
            assert await stored(spec) == (None, b"%PDF-2.0")
            fake.faults.fail_listings = set()
            assert (await reconciler.full_sync()).complete
            assert await stored(spec) == (None, b"%PDF-3")
            assert (await store.export())["attachments"] == fake.truth()["attachments"]


async def test_sort_rules_keep_priorities_exact_from_events_alone(tmp_path: Path) -> None:
    """BookStack re-sorts a book with a rule after every change inside it, and every book of
    a rule when it changes, moving no updated_at and sending its webhook first (FACTS, first
    section). With the probe off and the periodic diff an hour away, the events alone must
    keep every priority exact."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=24, books=3, chapters_per_book=2, seed=12)
        fake.resort_delay = 0.3  # the re-sort lags its webhook by this much
        settings = settings_for(
            fake, tmp_path / "m.db", reconcile_interval=3600, probe=False, poll_interval=0.5
        )
        async with running(settings, webhooks_from=fake) as svc:

            async def exact() -> bool:
                await fake.drain_webhooks()  # and the re-sorts that follow them
                await svc.dispatcher.drain(5)
                return await converged(svc, fake)

            book = fake.truth()["books"][0]["id"]
            rule = await fake.create_sort_rule("By name", "name_desc")
            await fake.set_book_sort_rule(book, rule)
            await eventually(exact, timeout=15)
            assert (await svc.store.get("book", book))["sort_rule_id"] == rule

            await fake.create_page(book_id=book, name="zz new page", html="<p>n</p>")
            chapter = next(c["id"] for c in fake.truth()["chapters"] if c["book_id"] == book)
            await fake.update_chapter(chapter, name="aaa renamed chapter")
            await eventually(exact, timeout=15)

            second = fake.truth()["books"][1]["id"]
            await fake.set_book_sort_rule(second, rule)
            await eventually(exact, timeout=15)
            await fake.update_sort_rule(rule, sequence="chapters_first,name_asc")
            await eventually(exact, timeout=15)

            await fake.delete_sort_rule(rule, confirm=True)
            await eventually(exact, timeout=15)
            assert (await svc.store.get("book", book))["sort_rule_id"] is None


async def test_the_cold_sync_and_the_sweep_read_nothing_twice(tmp_path: Path) -> None:
    """The cold sync read every role, shelf and restricted item: the sweep's first cycle
    waits EVENTSYNC_SWEEP_INTERVAL after it instead of reading them all again."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=30, books=3, shelves=2, roles=3, permission_share=0.2, seed=13)
        settings = settings_for(
            fake, tmp_path / "m.db", sweep_share=0.5, requests_per_minute=6000, probe=False
        )
        async with running(settings) as svc:
            await asyncio.sleep(2.0)  # a sweep would have read much by now (50/s)
            await svc.dispatcher.drain(5)
            truth = fake.truth()
            reads = Counter(r.route for r in fake.requests)
            assert reads["/api/roles/{id}"] == len(truth["roles"])
            assert reads["/api/shelves/{id}"] == len(truth["shelves"])
            assert reads["/api/content-permissions/{type}/{id}"] == len(truth["permissions"])
            assert reads["/api/pages/{id}"] == len(truth["pages"])


# ---- a revoked token -------------------------------------------------------------------------


async def readyz(svc: Service) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{svc.port}/readyz") as response,
    ):
        return response.status, await response.json()


async def test_a_revoked_token_costs_a_few_requests_fails_readyz_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """BookStack refuses the sync token (revoked, rotated, expired) while the wiki changes:
    eventsync says so (readyz, status, one error line), spends a handful of requests probing
    instead of its budget, and once the token works again catches up on everything."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=40, books=4, seed=8)
        settings = settings_for(fake, tmp_path / "m.db")
        # Probes 0.25, 0.5, 1, 1, ... s apart: the production 5 s doubling to 120 s, sped up.
        async with running(
            settings, webhooks_from=fake, token_probe_base=0.25, token_probe_cap=1.0
        ) as svc:

            async def ready() -> bool:
                return (await readyz(svc))[0] == 200

            await eventually(ready, 10, "ready after the first audit-log poll")
            before = len(fake.requests)
            with capture_logs() as entries:
                fake.revoke_token()
                # Half the webhooks are lost: those changes are only in the audit log, which
                # cannot be read until the token works again.
                fake.faults.webhook_drop = 0.5
                fake.faults.seed = 3
                no_view = {"view": False, "create": False, "update": False, "delete": False}
                pages = [p["id"] for p in fake.truth()["pages"]]
                for i in range(12):
                    await fake.update_page(pages[i], html=f"<p>while revoked {i}</p>")
                for i in range(3):
                    await fake.create_page(book_id=1 + i, name=f"Born while revoked {i}")
                await fake.delete_page(pages[-1])
                await fake.set_permissions("page", pages[-2], fallback=no_view)
                await fake.update_book(2, description="described while revoked")
                await fake.update_user(2, name="Renamed while revoked")
                await fake.update_chapter(1, name="Chapter renamed while revoked")

                async def refused() -> bool:
                    return svc.client.token.rejected is not None

                await eventually(refused, 10, "the client notices the refusal")
                status, body = await readyz(svc)
                assert status == 503, body
                assert any("rejects the API token" in r for r in body["reasons"]), body

                async def recorded() -> bool:
                    return (await svc.status())["token_rejected"] is not None

                await eventually(recorded, 5, "status records the refusal")
                assert (await svc.status())["token_rejected"].endswith(
                    "(401): No matching API token was found for the provided authorization token"
                )
                args = cli.build_parser().parse_args(["status"])
                assert await cli.cmd_status(settings, args) == cli.EXIT_OK
                assert "API token:       REJECTED by BookStack" in capsys.readouterr().out

                await asyncio.sleep(4.0)  # the revocation lasts; nothing but probes goes out
                during = fake.requests[before:]
                probes = [r for r in during if r.route == "/api/books"]
                print(
                    f"requests during the revocation: {len(during)} ({len(probes)} probes), "
                    f"by route {Counter(r.route for r in during)}"
                )
                assert {r.status for r in during} == {401}
                # The requests in flight when the refusal came (at most one per worker and the
                # poller), then one probe per interval: 0.25 + 0.5 + 1 + 1 + 1 s fit in ~4 s.
                assert len(during) - len(probes) <= settings.fetch_concurrency + 1
                assert 3 <= len(probes) <= 8
                assert await svc.queue.dead_letters() == []
            errors = [e for e in entries if e["log_level"] in ("error", "critical")]
            assert [e["event"] for e in errors] == [
                "BookStack rejects the API token (revoked, rotated or expired?): no request is "
                "sent until it works again; probing it at a growing interval"
            ]
            assert not [e for e in entries if e["log_level"] == "warning"], entries

            fake.restore_token()

            async def caught_up() -> bool:
                return await converged(svc, fake)

            await eventually(caught_up, 20, "the mirror converges after the token works again")
            await eventually(ready, 10, "ready again")
            assert (await svc.status())["token_rejected"] is None
            assert await svc.queue.dead_letters() == []
            # The refusal never passed for a lack of audit access.
            assert await svc.store.get_state("audit_access") == "1"


async def test_serve_started_with_a_rejected_token_waits_and_syncs_once_it_works(
    tmp_path: Path,
) -> None:
    """A token refused from the start (rotated before a restart) stops nothing: serve stays
    up, not ready, probing; the moment the token works the first sync runs."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=2, seed=5)
        fake.revoke_token()
        settings = settings_for(fake, tmp_path / "m.db")
        async with running(
            settings, synced=False, token_probe_base=0.2, token_probe_cap=0.5
        ) as svc:

            async def refused() -> bool:
                return (await svc.status())["token_rejected"] is not None

            await eventually(refused, 10, "the refusal is recorded")
            await asyncio.sleep(1.5)
            status, body = await readyz(svc)
            assert status == 503 and any("rejects the API token" in r for r in body["reasons"])
            assert not svc.stop_event.is_set() and svc.exit_code == 0
            assert len(fake.requests) <= 10, fake.request_counts()  # the first, then probes
            fake.restore_token()
            await asyncio.wait_for(svc.synced.wait(), 10)
            assert await converged(svc, fake)
            assert (await svc.status())["token_rejected"] is None


# ---- a BookStack without the audit-log API ------------------------------------------------------


async def test_without_an_audit_log_api_webhooks_and_diffs_carry_the_mirror(tmp_path: Path) -> None:
    """BookStack before v23.08 answers /api/audit-log with an HTML 404. eventsync says so once
    and runs on webhooks plus diff syncs: no audit-log request per poll, no warning per poll,
    no gap diffs, no webhook taken for unconfirmed; a dropped webhook is caught by the diff.
    When an upgrade brings the audit log, eventsync starts reading it."""
    async with FakeBookStack(requests_per_minute=RPM, audit_log=False) as fake:
        fake.seed(pages=30, books=3, seed=9)
        # The probe off: it would find the lost webhooks' changes before the diff does, and
        # its listing requests would blur the count of diff syncs below.
        settings = settings_for(
            fake,
            tmp_path / "m.db",
            reconcile_interval=1.0,
            webhook_confirm_grace=0.3,
            probe=False,
        )
        with capture_logs() as entries:
            async with running(settings, webhooks_from=fake) as svc:
                status = await svc.status()
                assert (status["audit_log"], status["audit_access"]) == ("no audit-log API", False)
                assert status["audit_cursor"] is None
                assert (await readyz(svc))[0] == 200

                # Webhooks drive it.
                page = await fake.create_page(book_id=1, name="Announced", html="<p>a</p>")
                await fake.update_page(3, html="<p>announced edit</p>")
                await fake.set_permissions("page", 4, fallback={"view": False})
                await fake.set_permissions("page", 4)  # same second, identical webhook body

                async def synced() -> bool:
                    return await converged(svc, fake)

                await eventually(synced, 10, "the webhooks reach the mirror")
                # A lost webhook: the periodic diff finds the change.
                fake.faults.webhook_drop = 1.0
                await fake.update_page(page, html="<p>its webhook was lost</p>")
                await fake.create_page(book_id=2, name="Unannounced")
                await eventually(synced, 10, "the diff sync catches the lost webhooks")
                fake.faults.webhook_drop = 0.0

                await asyncio.sleep(1.5)  # polls, housekeeping and diffs keep running
                assert (await readyz(svc))[0] == 200
                counts = fake.request_counts()
                # One audit-log look per diff sync (it notices an upgrade), none per poll.
                diffs = counts["/api/pages"]
                assert diffs >= 2 and counts["/api/audit-log"] <= diffs + 1, counts
                assert await svc.store.get_state("last_gap") is None
                assert await svc.store.get_state("audit_gap") is None
                assert await svc.queue.unconfirmed_webhooks(time.time()) == 0

                # BookStack upgraded: the next diff starts a cursor and the poller reads on.
                fake.audit_log = True

                async def reading() -> bool:
                    return (await svc.status())["audit_cursor"] is not None

                await eventually(reading, 10, "a cursor once the audit log exists")
                await svc.poller.poll_once()
                assert (await svc.status())["audit_log"] == "readable"
                fake.faults.webhook_drop = 1.0
                await fake.update_book(1, name="Found in the audit log")
                await eventually(synced, 10, "the audit log carries what the webhook lost")
        said = [e for e in entries if "no audit-log API" in e["event"]]
        assert len(said) == 1, said
        assert said[0]["log_level"] == "warning"
        assert not [e for e in entries if e["log_level"] in ("error", "critical")]
        assert not [e for e in entries if "gap" in e["event"]]


@pytest.mark.parametrize("lost", ["no access", "no audit-log API"])
async def test_losing_audit_access_is_said_once_and_the_polls_stop(
    tmp_path: Path, lost: str
) -> None:
    """A 403 on the audit log (the token's role lost 'Manage app settings'): no audit access,
    said once; the poller stops asking (no error per poll), webhooks carry on. The same for
    an HTML 404 (a BookStack from before v23.08, restored in place of a newer one): the
    poller, not a diff sync, is the first to see it."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        # No entity restrictions: the sync user sees what the admin sees.
        fake.seed(pages=20, books=2, permission_share=0.0, seed=2)
        role = await fake.create_role("Sync", permissions=list(ALL_PERMISSIONS))
        user = await fake.create_user("Sync bot", "sync-bot@example.com", roles=[role])
        fake.add_token(user, "sync-id", "sync-secret-0123456789abcdef")
        settings = settings_for(
            fake,
            tmp_path / "m.db",
            bookstack_token_id="sync-id",
            bookstack_token_secret="sync-secret-0123456789abcdef",
            probe=False,  # it would find the page edited below without its webhook
        )
        with capture_logs() as entries:
            async with running(settings, webhooks_from=fake) as svc:
                await svc.poller.poll_once()
                assert await svc.poller.cursor() is not None
                if lost == "no access":
                    without = [p for p in ALL_PERMISSIONS if p != "settings-manage"]
                    await fake.update_role(role, permissions=without)
                else:
                    fake.audit_log = False

                async def forbidden() -> bool:
                    return (await svc.status())["audit_log"] == lost

                await eventually(forbidden, 10, "the poller notices the refusal")
                fake.reset_requests()
                await asyncio.sleep(1.5)  # five poll intervals
                assert "/api/audit-log" not in fake.request_counts()
                await fake.update_page(3, html="<p>after the access went</p>")

                async def synced() -> bool:
                    return await converged(svc, fake)

                await eventually(synced, 10, "webhooks still reach the mirror")
                assert (await readyz(svc))[0] == 200
        words = "cannot read the audit log" if lost == "no access" else "no audit-log API"
        said = [e for e in entries if words in e["event"]]
        assert len(said) == 1, said
        assert not [e for e in entries if e["log_level"] in ("error", "critical")]
