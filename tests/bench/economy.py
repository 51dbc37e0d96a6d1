"""API economy in steady state (DESIGN guarantee 4): an in-process Service against the fake
BookStack with webhooks AND the audit log; a stream of mixed changes, each reported by both.

Reports BookStack API requests per changed entity, by route, excluding the initial full sync
(the fake's request log is reset after it) and the audit-log polls (counted apart: one per
poll is the design's allowance; the silent-change probe's listing requests, one per
probed kind and poll, are counted in and also shown apart). Goal <= 1.05. A create costs
one read: its content permissions are BookStack's default and written without a read.

    .venv/bin/python tests/bench/economy.py [--changes 500] [--spacing 0.02]
        [--backend sqlite|postgres] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import backend

from eventsync.app import open_app
from eventsync.config import Settings
from eventsync.events import DIFF_KEY, FETCH
from eventsync.logging import configure_logging
from eventsync.service import Service
from eventsync.testing import FakeBookStack

SECRET = "bench-economy-secret-0123456789"
RPM = 100_000
AUDIT = "/api/audit-log"


def live(table: dict[int, Any]) -> list[int]:
    return sorted(i for i, e in table.items() if not getattr(e, "trashed", False))


class Changes:
    """Random mixed changes on the fake, each naming the entity it changes (its "kind:id")."""

    def __init__(self, fake: FakeBookStack, seed: int) -> None:
        self.fake = fake
        self.state = fake.state
        self.rng = random.Random(seed)
        self.n = 0
        self.kinds: collections.Counter[str] = collections.Counter()
        self.entities: list[str] = []

    def pick(self, ids: list[int]) -> int:
        return self.rng.choice(ids)

    def published_pages(self) -> list[int]:
        return [i for i in live(self.state.pages) if not self.state.pages[i].draft]

    def book_chapters(self, book_id: int) -> list[int]:
        return [i for i in live(self.state.chapters) if self.state.chapters[i].book_id == book_id]

    async def one(self) -> None:
        self.n += 1
        n, rng, fake = self.n, self.rng, self.fake
        books = live(self.state.books)
        pages = self.published_pages()
        roll = rng.random()
        kind: str
        key: str
        if roll < 0.40:
            kind, pid = "page update", self.pick(pages)
            await fake.update_page(pid, html=f"<p>economy edit {n}</p>")
            key = f"page:{pid}"
        elif roll < 0.48:
            kind, bid = "book update", self.pick(books)
            await fake.update_book(bid, description=f"economy description {n}")
            key = f"book:{bid}"
        elif roll < 0.52:
            kind = "chapter update"
            cid = self.pick(live(self.state.chapters))
            await fake.update_chapter(cid, description=f"economy chapter {n}")
            key = f"chapter:{cid}"
        elif roll < 0.54:
            kind, sid = "shelf update", self.pick(live(self.state.shelves))
            await fake.update_shelf(sid, description=f"economy shelf {n}")
            key = f"shelf:{sid}"
        elif roll < 0.64:
            kind = "page create"
            pid = await fake.create_page(
                book_id=self.pick(books), name=f"Economy page {n}", html=f"<p>{n}</p>"
            )
            key = f"page:{pid}"
        elif roll < 0.66:
            kind = "chapter create"
            cid = await fake.create_chapter(self.pick(books), f"Economy chapter {n}")
            key = f"chapter:{cid}"
        elif roll < 0.74:
            kind, pid = "page move", self.pick(pages)
            target = self.pick([b for b in books if b != self.state.pages[pid].book_id] or books)
            await fake.move_page(pid, book_id=target)
            key = f"page:{pid}"
        elif roll < 0.76:
            kind = "chapter move"
            cid = self.pick(live(self.state.chapters))
            target = self.pick([b for b in books if b != self.state.chapters[cid].book_id])
            await fake.move_chapter(cid, target)
            key = f"chapter:{cid}"
        elif roll < 0.84:
            kind, pid = "page delete", self.pick(pages)
            await fake.delete_page(pid)
            key = f"page:{pid}"
        elif roll < 0.92:
            kind = "permissions"
            ctype = rng.choice(["page", "page", "chapter", "book"])
            table = {"page": pages, "chapter": live(self.state.chapters), "book": books}[ctype]
            eid = self.pick(table)
            role = self.pick([r for r in self.state.roles if not self.state.roles[r].system_name])
            allow = rng.random() < 0.5
            await fake.set_permissions(
                ctype,
                eid,
                fallback=None
                if rng.random() < 0.3
                else {"view": True, "create": allow, "update": allow, "delete": False},
                role_permissions=[
                    {
                        "role_id": role,
                        "view": True,
                        "create": False,
                        "update": allow,
                        "delete": False,
                    }
                ],
            )
            key = f"{ctype}:{eid}"
        elif roll < 0.96:
            kind = "user update"
            uid = self.pick([u for u in self.state.users if u != 1])
            await fake.update_user(uid, name=f"Economy user {n}")
            key = f"user:{uid}"
        elif roll < 0.98:
            kind = "user create"
            roles = [self.pick(list(self.state.roles))]
            uid = await fake.create_user(f"New user {n}", f"new{n}@example.com", roles=roles)
            key = f"user:{uid}"
        else:
            kind = "role update"
            rid = self.pick([r for r in self.state.roles if not self.state.roles[r].system_name])
            await fake.update_role(rid, description=f"economy role {n}")
            key = f"role:{rid}"
        self.kinds[kind] += 1
        self.entities.append(key)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


async def run(args: argparse.Namespace) -> None:
    configure_logging("json", "warning")
    workdir = Path(tempfile.mkdtemp(prefix="eventsync-economy-"))
    async with (
        backend.database(args, workdir, "economy") as db,
        FakeBookStack(requests_per_minute=RPM) as fake,
    ):
        fake.seed(pages=args.pages, books=args.pages // 20, users=10, roles=4, seed=args.seed)
        settings = Settings(
            bookstack_url=fake.url,
            bookstack_token_id=fake.token_id,
            bookstack_token_secret=fake.token_secret,
            webhook_secret=SECRET,
            **db.settings(),
            listen="127.0.0.1:0",
            requests_per_minute=RPM,
            poll_interval=args.poll_interval,
            # What the steady state costs per change; the sweep and the periodic diff are
            # budgeted separately (EVENTSYNC_SWEEP_SHARE, EVENTSYNC_RECONCILE_INTERVAL).
            sweep_share=0.0,
            reconcile_interval=86_400,
        )
        async with open_app(settings) as app:
            store = app.store
            svc = Service(app)
            await svc.start()
            try:
                await asyncio.wait_for(svc.synced.wait(), 60)
                fake.add_webhook(f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}")
                await svc.dispatcher.drain(30)
                sync_requests = len(fake.requests)
                fake.reset_requests()
                changes = Changes(fake, args.seed)
                started = time.monotonic()
                for _ in range(args.changes):
                    await changes.one()
                    await asyncio.sleep(args.spacing)
                # Let the audit poller read (and pair) every row, and the queue empty.
                await asyncio.sleep(args.poll_interval + 1.0)
                await svc.poller.poll_once()
                await svc.dispatcher.drain(60)
                took = time.monotonic() - started
                settled = await eventually(lambda: _idle(svc), timeout=10.0)
                events = await svc.queue.event_counts()
                mirror, truth = await store.export(), fake.truth()
                counted = list(fake.requests)
                # Then what the periodic diff (off above) would catch: not counted.
                await svc.queue.enqueue(DIFF_KEY, [FETCH])
                await svc.dispatcher.drain(60)
                after_diff = await store.export()
                fake.requests[:] = counted
            finally:
                await svc.stop()
    print(f"backend: {db.description}")
    report(fake, changes, sync_requests, took, settled, events, mirror, truth, args)
    print("after one periodic diff sync (not counted above):")
    print_differences(after_diff, truth)


async def _idle(svc: Service) -> bool:
    return await svc.queue.depth() == 0 and svc.dispatcher.in_flight == 0


def report(
    fake: FakeBookStack,
    changes: Changes,
    sync_requests: int,
    took: float,
    settled: bool,
    events: dict[str, int],
    mirror: dict[str, Any],
    truth: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    by_route = fake.request_counts()
    total = sum(by_route.values())
    audit = by_route.get(AUDIT, 0)
    work = total - audit
    entities = len(changes.entities)
    distinct = len(set(changes.entities))
    print(f"initial full sync: {sync_requests} requests (excluded)")
    print(
        f"{entities} changes ({distinct} distinct entities) in {took:.1f} s, "
        f"spacing {args.spacing * 1000:.0f} ms; queue settled: {settled}"
    )
    print("changes: " + ", ".join(f"{k} {v}" for k, v in sorted(changes.kinds.items())))
    print(f"events:  {events}")
    print("API requests by route:")
    for route, count in by_route.most_common():
        print(f"  {count:6}  {route}")
    statuses = collections.Counter(r.status for r in fake.requests)
    print(f"statuses: {dict(statuses)}")
    probes = sum(
        1 for r in fake.requests if r.query.get("sort") == "-updated_at" or r.route == "/api/search"
    )
    print(f"audit-log requests: {audit} (polls; not counted below)")
    print(
        f"silent-change probe requests: {probes} (one listing request per probed kind and "
        f"one restricted search per poll, every {args.poll_interval:g} s; included below)"
    )
    print(f"requests per changed entity: {work / entities:.3f}  (goal <= 1.05)")
    print(f"  without the probe: {(work - probes) / entities:.3f}")
    print(f"  per distinct entity: {work / distinct:.3f}")
    print(f"mirror equals truth: {mirror == truth}")
    print_differences(mirror, truth)


def print_differences(mirror: dict[str, Any], truth: dict[str, Any]) -> None:
    if mirror == truth:
        print("  no differences")
        return
    for section in truth:
        a = {r.get("id", r.get("content_id")): r for r in mirror[section]}
        b = {r.get("id", r.get("content_id")): r for r in truth[section]}
        diff = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
        if diff:
            fields: collections.Counter[str] = collections.Counter()
            for k in diff:
                ra, rb = a.get(k) or {}, b.get(k) or {}
                fields.update(f for f in set(ra) | set(rb) if ra.get(f) != rb.get(f))
            print(
                f"  {section}: {len(diff)} differ (ids {sorted(diff, key=str)[:8]}); "
                f"fields: {dict(fields)}"
            )
    print(
        "  (silent side effects, FACTS 2.5: link rewrites move updated_at and the periodic "
        "diff finds them; rendered includes change only `html` and nothing finds them)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=500)
    parser.add_argument("--spacing", type=float, default=0.02, help="seconds between changes")
    parser.add_argument("--pages", type=int, default=400)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    backend.add_arguments(parser)
    args = parser.parse_args()
    backend.check_arguments(parser, args)
    if not 1 <= args.changes <= 5000:
        parser.error("--changes must be between 1 and 5000")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
