"""Effective access at scale (issue 11): a 20,000-page wiki with 50 roles and 500 users.

1. The first full sync (`eventsync reconcile --full` in its own process, access kept as it
   goes): its CPU time and peak RSS.
2. The first computation of access for that mirror (its access tables emptied, as a mirror
   from before migration 0012 has them; in its own process): CPU, wall, peak RSS, and that
   it equals what the sync kept incrementally. Goal: CPU within 2x the full sync's own.
3. Single changes, each one transaction on the synced mirror, with the rows it wrote
   (access items, class rows, `access` feed rows) and its time: a permission change on a
   book with 1,000 pages, a role's permission change, a page move (a sort's placement
   patch, and a page read with a new book), a user's new role. Goal: each within 100 ms.
4. `GET /access/users/{id}` for a user with 5 roles over all 20,000 pages, over HTTP on
   127.0.0.1. Goal: within 200 ms.

    .venv/bin/python tests/bench/access.py [--pages 20000] [--roles 50] [--users 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from eventsync import answers
from eventsync.app import open_store
from eventsync.logging import configure_logging
from eventsync.store.mirror import Store
from eventsync.testing import FakeBookStack

GOAL_FIRST = 2.0  # first computation CPU / full sync CPU
GOAL_CHANGE_MS = 100.0
GOAL_LIST_MS = 200.0
TYPES = ("bookshelf", "book", "chapter", "page")
T_LATER = 4_000_000_000.0  # "read at" for the changes: later than any read of the sync


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build_wiki(fake: FakeBookStack, args: argparse.Namespace) -> int:
    """Seed the fake; give the roles a spread of view permissions (most with view-all, some
    with only view-own, a few with none for a type) and one user exactly five roles.
    Returns that user's id."""
    fake.seed(
        pages=args.pages,
        books=args.books,
        chapters_per_book=args.chapters_per_book,
        shelves=10,
        users=args.users,
        roles=args.roles,
        attachments=args.pages // 100,
        permission_share=args.permission_share,
        seed=args.seed,
    )
    rng = random.Random(args.seed)
    state = fake.state
    seeded = [r for r in state.roles.values() if r.display_name.startswith("Seeded")]
    for role in seeded:
        role.permissions -= {f"{t}-view-all" for t in TYPES} | {f"{t}-view-own" for t in TYPES}
        for content_type in TYPES:
            if rng.random() < 0.8:
                role.permissions.add(f"{content_type}-view-all")
            if rng.random() < 0.3:
                role.permissions.add(f"{content_type}-view-own")
    users = [u for u in state.users.values() if u.name.startswith("Seeded")]
    for user in users:
        user.roles = set(rng.sample([r.id for r in seeded], k=rng.randint(1, 3)))
    five = users[0]
    five.roles = {r.id for r in seeded[:5]}
    return five.id


async def full_sync(fake: FakeBookStack, db: Path, workdir: Path, args: argparse.Namespace) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSYNC_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(
        EVENTSYNC_BOOKSTACK_URL=fake.url,
        EVENTSYNC_BOOKSTACK_TOKEN_ID=fake.token_id,
        EVENTSYNC_BOOKSTACK_TOKEN_SECRET=fake.token_secret,
        EVENTSYNC_DATABASE=str(db),
        EVENTSYNC_REQUESTS_PER_MINUTE="100000",
        EVENTSYNC_FETCH_CONCURRENCY="8",
        EVENTSYNC_LOG_FORMAT="json",
        EVENTSYNC_LOG_LEVEL="warning",
    )
    before = child_cpu()
    started = time.monotonic()
    with (workdir / "reconcile.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "eventsync",
            "reconcile",
            "--full",
            "--json",
            env=env,
            cwd=workdir,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        out, _ = await proc.communicate()
    if proc.returncode != 0:
        print(out.decode()[-3000:], (workdir / "reconcile.log").read_text()[-3000:])
        raise SystemExit("the full sync failed")
    return {
        "summary": json.loads(out),
        "cpu": child_cpu() - before,
        "wall": time.monotonic() - started,
        "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def first_computation_child(db: str) -> None:
    """In a process of its own: empty the access tables (a mirror from before migration
    0012), open the store (which computes access for everything), print the figures."""
    with sqlite3.connect(db) as conn:
        for table in ("access_items", "access_class_roles", "access_classes"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute("DELETE FROM sync_state WHERE key = 'access_built'")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    async def run() -> None:
        cpu, wall = time.process_time(), time.monotonic()
        store = await open_store(db)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        await store.close()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"cpu": cpu, "wall": wall, "rss_mb": rss, "rss_before_mb": rss_before}))

    asyncio.run(run())


async def first_computation(db: Path, copy: Path) -> Any:
    shutil.copyfile(db, copy)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--first-computation",
        str(copy),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    return json.loads(out)


def joint_permissions(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT * FROM access ORDER BY 1, 2, 3").fetchall()


async def one_change(store: Store, label: str, change: Any) -> tuple[str, float, Any]:
    started = time.monotonic()
    async with store.transaction() as tx:
        await change(tx)
    ms = (time.monotonic() - started) * 1000
    return label, ms, tx.access_stats


async def changes(store: Store, rng: random.Random, keep: int) -> list[tuple[str, float, Any]]:
    """The single changes, in one transaction each, on the synced mirror (user `keep`'s
    roles stay as they are)."""
    sizes = await store.fetchall(
        "SELECT book_id, count(*) FROM pages GROUP BY book_id ORDER BY 2 DESC LIMIT 3"
    )
    (book, pages), (other, _), (third, third_pages) = sizes[0], sizes[1], sizes[2]
    roles = [r[0] for r in await store.fetchall("SELECT id FROM roles WHERE system_name = ''")]
    busiest = await store.fetchone(
        "SELECT role_id FROM user_roles GROUP BY role_id ORDER BY count(*) DESC LIMIT 1"
    )
    assert busiest is not None
    out = []

    async def book_rows(tx: Any, book: int = book) -> None:
        await tx.set_permissions(
            "book",
            book,
            {
                "owner_id": 1,
                "inheriting": False,
                "fallback": {"view": False, "create": False, "update": False, "delete": False},
                "role_permissions": [
                    {
                        "role_id": roles[0],
                        "view": True,
                        "create": True,
                        "update": True,
                        "delete": False,
                    }
                ],
            },
            T_LATER,
        )

    # The first change of a process loads its caches (roles, members, classes): a second
    # of the same kind shows the steady state.
    out.append(await one_change(store, f"permissions of book {book} ({pages} pages)", book_rows))

    async def book_rows_again(tx: Any) -> None:
        await book_rows(tx, third)

    label = f"  again, book {third} ({third_pages} pages)"
    out.append(await one_change(store, label, book_rows_again))

    role = await store.get("role", busiest[0])
    assert role is not None
    permissions = set(json.loads(role["permissions"])) ^ {"page-view-all"}

    async def role_change(tx: Any) -> None:
        await tx.upsert("role", {**role, "permissions": sorted(permissions)}, T_LATER + 1)

    members = len(await store.role_members(busiest[0]))
    label = f"role {busiest[0]} ({members} members): page-view-all"
    out.append(await one_change(store, label, role_change))

    async def role_back(tx: Any) -> None:
        back = {**role, "permissions": json.loads(role["permissions"])}
        await tx.upsert("role", back, T_LATER + 1.5)

    out.append(await one_change(store, "  again, and back", role_back))

    page = await store.fetchone(
        "SELECT id FROM pages WHERE book_id = ? AND chapter_id IS NULL LIMIT 1", (other,)
    )
    assert page is not None

    async def sort_move(tx: Any) -> None:
        await tx.patch("page", page[0], {"book_id": book, "chapter_id": None}, T_LATER + 2)

    out.append(await one_change(store, f"page {page[0]} moved into book {book} (sort)", sort_move))
    row = await store.get("page", page[0])
    assert row is not None

    async def read_move(tx: Any) -> None:
        moved = {**row, "book_id": other, "tags": json.loads(row["tags"])}
        await tx.upsert("page", moved, T_LATER + 3)

    out.append(await one_change(store, f"page {page[0]} back to book {other} (read)", read_move))
    user = await store.fetchone(
        "SELECT id FROM users WHERE id > 2 AND id != ? ORDER BY id LIMIT 1", (keep,)
    )
    assert user is not None
    held = await store.user_role_ids(user[0])
    gained = rng.choice([r for r in roles if r not in held])

    async def membership(tx: Any) -> None:
        await tx.set_user_roles(user[0], [*held, gained], T_LATER + 4)

    out.append(await one_change(store, f"user {user[0]} gains role {gained}", membership))
    return out


async def user_listing(store: Store, user_id: int, pages: int) -> list[tuple[str, float, int]]:
    app = web.Application()
    for path, handler in answers.routes(store):
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    out = []
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}/access/users/{user_id}?kind=page"

            async def fetch(query: str) -> Any:
                async with http.get(base + query) as response:
                    assert response.status == 200, await response.text()
                    return await response.json()

            await fetch("&limit=1")  # a warm connection and store
            started = time.monotonic()
            body = await fetch(f"&limit={answers.MAX_LIMIT}")
            ids = list(body["ids"])
            while body["next_after"] is not None:
                body = await fetch(f"&after={body['next_after']}&limit={answers.MAX_LIMIT}")
                ids += body["ids"]
            out.append(
                (
                    f"every page ({pages}) by {answers.MAX_LIMIT}",
                    time.monotonic() - started,
                    len(ids),
                )
            )
            started = time.monotonic()
            body = await fetch("&limit=1000")
            out.append(("the first 1,000", time.monotonic() - started, len(body["ids"])))
            started = time.monotonic()
            body = await fetch(f"&after={pages // 2}&limit=1000")
            out.append(("1,000 from the middle", time.monotonic() - started, len(body["ids"])))
    finally:
        await runner.cleanup()
    return out


async def run(args: argparse.Namespace) -> int:
    configure_logging("json", "warning")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="eventsync-access-") as tmp:
        workdir = Path(tmp)
        db = workdir / "mirror.db"
        async with FakeBookStack(requests_per_minute=10_000_000) as fake:
            seeding = time.monotonic()
            five = build_wiki(fake, args)
            print(
                f"wiki: {len(fake.state.pages)} pages, {len(fake.state.chapters)} chapters, "
                f"{len(fake.state.books)} books, {len(fake.state.shelves)} shelves, "
                f"{len(fake.state.roles)} roles, {len(fake.state.users)} users, "
                f"{len(fake.state.entity_permissions)} items with permission rows "
                f"(seeded in {time.monotonic() - seeding:.0f} s)"
            )
            sync = await full_sync(fake, db, workdir, args)
        if args.keep is not None:
            shutil.copyfile(db, args.keep)
        summary = sync["summary"]
        print(
            f"\nfirst full sync (`eventsync reconcile --full`, access kept as it goes): "
            f"complete {summary['complete']}, {summary['requests']} requests, "
            f"CPU {sync['cpu']:.1f} s, wall {sync['wall']:.1f} s, peak RSS {sync['rss_mb']:.0f} MB"
        )
        async with await open_store(db) as store:
            counts = {
                r[0]: r[1]
                for r in await store.fetchall(
                    "SELECT 'classes', count(*) FROM access_classes UNION ALL "
                    "SELECT 'class rows', count(*) FROM access_class_roles UNION ALL "
                    "SELECT 'items', count(*) FROM access_items UNION ALL "
                    "SELECT 'joint_permissions rows (the view)', count(*) FROM access UNION ALL "
                    "SELECT 'access feed rows', count(*) FROM changes WHERE entity = 'access'"
                )
            }
        print("  access tables: " + ", ".join(f"{n} {what}" for what, n in counts.items()))

        first = await first_computation(db, workdir / "first.db")
        ratio = first["cpu"] / sync["cpu"]
        same = joint_permissions(db) == joint_permissions(workdir / "first.db")
        print(
            f"\nfirst computation (access tables emptied, then computed in one transaction):\n"
            f"  CPU {first['cpu']:.2f} s, wall {first['wall']:.2f} s, peak RSS "
            f"{first['rss_mb']:.0f} MB ({first['rss_mb'] - first['rss_before_mb']:.0f} MB "
            f"above the process before it)\n"
            f"  CPU / full sync CPU: {ratio:.3f} "
            f"(goal <= {GOAL_FIRST}: {verdict(ratio <= GOAL_FIRST)})\n"
            f"  equals what the sync kept incrementally: {'OK' if same else 'NO'}"
        )

        async with await open_store(db) as store:
            done = await changes(store, rng, five)
            print("\nsingle changes (one transaction each, commit included):")
            slowest = 0.0
            for label, ms, stats in done:
                slowest = max(slowest, ms)
                print(
                    f"  {label:<48} {ms:7.1f} ms  rows: {stats.items} items, "
                    f"{stats.class_rows} class rows, {stats.changes} access feed rows"
                )
            print(
                f"  slowest {slowest:.1f} ms (goal <= {GOAL_CHANGE_MS:.0f} ms: "
                f"{verdict(slowest <= GOAL_CHANGE_MS)})"
            )
            roles = await store.user_role_ids(five)
            listing = await user_listing(store, five, args.pages)
            print(f"\nGET /access/users/{five} (roles {roles}) over HTTP on 127.0.0.1:")
            for label, seconds, n in listing:
                print(f"  {label:<30} {seconds * 1000:7.1f} ms  ({n} ids)")
            whole = listing[0][1] * 1000
            print(
                f"  every page: {whole:.1f} ms (goal <= {GOAL_LIST_MS:.0f} ms: "
                f"{verdict(whole <= GOAL_LIST_MS)})"
            )
    ok = summary["complete"] and same and ratio <= GOAL_FIRST
    ok = ok and slowest <= GOAL_CHANGE_MS and whole <= GOAL_LIST_MS
    return 0 if ok else 1


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--first-computation":
        first_computation_child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20_000)
    parser.add_argument("--books", type=int, default=20, help="20: 1,000 pages a book")
    parser.add_argument("--chapters-per-book", type=int, default=5)
    parser.add_argument("--roles", type=int, default=50)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--permission-share", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="keep a copy of the synced mirror here")
    args = parser.parse_args()
    if not 2 <= args.books <= args.pages <= 100_000 or args.roles < 5:
        parser.error("need 2 <= --books <= --pages <= 100,000 and --roles >= 5")
    raise SystemExit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
