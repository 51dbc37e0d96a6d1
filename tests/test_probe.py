"""The silent-change probe (DESIGN guarantee 9): with the periodic diff an hour away, what no
event reports reaches the mirror within one poll interval, for one request per probed kind."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from helpers import eventually
from structlog.testing import capture_logs
from test_recovery import RPM, running, settings_for

from eventsync.ingest.probe import PROBED, TOTAL_PATIENCE
from eventsync.service import Service
from eventsync.testing import FakeBookStack

POLL = 0.5
BOUND = POLL + 2.0  # the goal: within EVENTSYNC_POLL_INTERVAL + 2 s


async def _attachments(svc: Service) -> dict[int, str]:
    return {a["id"]: a["name"] for a in (await svc.store.export())["attachments"]}


async def _within_bound(svc: Service, check: object, bound: float = BOUND) -> float:
    started = time.monotonic()

    async def ok() -> bool:
        await svc.dispatcher.drain(2)
        return bool(await check())  # type: ignore[operator]

    await eventually(ok, timeout=bound)
    return time.monotonic() - started


async def test_attachments_created_renamed_and_deleted_arrive_within_a_poll(
    tmp_path: Path,
) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=30, books=3, attachments=4, seed=8)
        settings = settings_for(
            fake, tmp_path / "m.db", poll_interval=POLL, reconcile_interval=3600
        )
        async with running(settings, webhooks_from=fake) as svc:
            page = fake.truth()["pages"][3]["id"]
            new = await fake.create_attachment(page, "spec.pdf", content=b"%PDF", extension="pdf")
            await _within_bound(svc, lambda: _has(svc, new, "spec.pdf"))

            await fake.update_attachment(new, name="spec-v2.pdf")
            await _within_bound(svc, lambda: _has(svc, new, "spec-v2.pdf"))

            old = min(a["id"] for a in fake.truth()["attachments"])
            await fake.delete_attachment(old)
            await fake.delete_attachment(new)
            await _within_bound(svc, lambda: _gone(svc, {old, new}))
            assert await svc.store.export() == fake.truth()

            # Its steady cost: one listing request per probed kind and one restricted search
            # (this wiki's fits one page) per poll, nothing else.
            await svc.dispatcher.drain(5)
            fake.reset_requests()
            polls = svc.probe_runs
            await eventually(lambda: _after(svc, polls + 3), timeout=10)
            routes = Counter(r.route for r in fake.requests if r.route != "/api/audit-log")
            probes = svc.probe_runs - polls
            listings = {
                f"/api/{e}" for e in ("attachments", "pages", "chapters", "books", "shelves")
            }
            assert set(routes) <= listings | {"/api/search"}, routes
            assert sum(routes.values()) <= (probes + 1) * (len(PROBED) + 1), routes
            assert routes["/api/search"] <= probes + 1, routes


async def test_an_ownership_migration_is_read_within_a_poll(tmp_path: Path) -> None:
    """A user delete hands their content to another user and moves its updated_at, with no
    event naming the items (FACTS, first section): the probe reads them."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=2, users=4, seed=9)
        settings = settings_for(
            fake, tmp_path / "m.db", poll_interval=POLL, reconcile_interval=3600
        )
        async with running(settings) as svc:  # no webhooks
            page, user = next(
                (p.id, p.owned_by)
                for p in fake.state.pages.values()
                if p.owned_by != 1 and not p.trashed and not p.draft
            )
            # Nor the audit log: its user_delete row would start the handler's own look at
            # what the user owned. Only the probe can see the migration.
            fake.faults.fail_listings = {"/api/audit-log"}
            await fake.delete_user(user, migrate_ownership_to=1)

            async def owned() -> bool:
                row = await svc.store.get("page", page)
                return row is not None and row["owned_by"] == 1

            await _within_bound(svc, owned)


async def test_a_delete_no_event_reports_is_found_by_a_listing_total(tmp_path: Path) -> None:
    """Deletes that no event reports show only in a listing's `total`: the probe starts the
    listing diff of that kind, which removes them."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=2, seed=9)
        settings = settings_for(
            fake, tmp_path / "m.db", poll_interval=POLL, reconcile_interval=3600
        )
        async with running(settings) as svc:  # no webhooks
            fake.faults.fail_listings = {"/api/audit-log"}  # and no audit log
            page = fake.truth()["pages"][2]["id"]
            with capture_logs() as entries:
                await fake.delete_page(page)

                async def gone() -> bool:
                    return await svc.store.get("page", page) is None

                await _within_bound(svc, gone, POLL * TOTAL_PATIENCE + BOUND)
            found = [e for e in entries if e["event"] == "silent changes found"]
            assert any("page" in e["diffs"] for e in found), found


async def _has(svc: Service, attachment_id: int, name: str) -> bool:
    return (await _attachments(svc)).get(attachment_id) == name


async def _gone(svc: Service, ids: set[int]) -> bool:
    return not ids & set(await _attachments(svc))


async def _after(svc: Service, runs: int) -> bool:
    return svc.probe_runs >= runs


async def test_an_ownership_migration_costs_a_few_listings_not_a_read_per_item(
    tmp_path: Path,
) -> None:
    """FACTS, first section: a user delete hands their content on and moves its updated_at,
    and every listing row carries `owned_by`: the handler reads what changed since the delete
    from the four content listings instead of each item's permissions."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=40, books=3, users=4, seed=10)
        user = max(u for u in fake.state.users if u != 1)
        owned = sorted(p.id for p in fake.state.pages.values() if not p.trashed)[:15]
        for page_id in owned:
            fake.state.pages[page_id].owned_by = user
        settings = settings_for(fake, tmp_path / "m.db", probe=False, reconcile_interval=3600)
        async with running(settings, webhooks_from=fake) as svc:
            fake.reset_requests()
            await fake.delete_user(user, migrate_ownership_to=1)

            async def handed_on() -> bool:
                await svc.dispatcher.drain(5)
                rows = [await svc.store.get("page", p) for p in owned]
                return all(r is not None and r["owned_by"] == 1 for r in rows)

            await eventually(handed_on, timeout=15)
            await svc.dispatcher.drain(5)
            assert await svc.store.export() == fake.truth()
            routes = Counter(r.route for r in fake.requests if r.route != "/api/audit-log")
            listings = [r for r in fake.requests if "filter[updated_at:gte]" in r.query]
            assert len(listings) == 4  # shelves, books, chapters, pages
            assert routes["/api/pages/{id}"] == 0, routes
            assert routes["/api/content-permissions/{type}/{id}"] == 0, routes


async def test_a_silent_shelf_permission_copy_is_read_within_a_poll(tmp_path: Path) -> None:
    """Copying a shelf's permissions to its books logs nothing and moves no updated_at; the
    books then show in the {is_restricted} search, which the probe reads on every poll."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=3, shelves=1, permission_share=0.0, seed=14)
        settings = settings_for(
            fake, tmp_path / "m.db", poll_interval=POLL, reconcile_interval=3600
        )
        async with running(settings, webhooks_from=fake) as svc:
            shelf = fake.truth()["shelves"][0]["id"]
            no = {"view": False, "create": False, "update": False, "delete": False}
            await fake.set_permissions("bookshelf", shelf, fallback=no)
            books = await fake.copy_shelf_permissions_to_books(shelf)  # silent
            assert books

            async def copied() -> bool:
                mirror = {
                    (p["content_type"], p["content_id"])
                    for p in (await svc.store.export())["permissions"]
                }
                return {("book", b) for b in books} <= mirror

            await _within_bound(svc, copied)
            assert await svc.store.export() == fake.truth()
