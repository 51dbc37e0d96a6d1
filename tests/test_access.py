"""Effective view access (DESIGN: Effective access; FACTS §6), held against BookStack itself.

The heart is a property test: random permission set-ups in the fake BookStack (roles with and
without `{type}-view-all`/`-view-own`, role rows and "everyone else" rows at every level,
owners), a running `serve` kept current by webhooks and the audit log, then phases of random
changes (permission rows, owners, page and chapter moves, role permissions, memberships, role
creates and deletes with and without migration, new and deleted pages and users). After each
phase, for every user, `export --as-user` must equal what that user's own token lists from
the fake's API; every item's per-role status must equal the fake's joint_permissions row; the
`access` rows of the change feed, replayed from the start, must give every item's viewers;
and the incrementally kept tables must equal a computation from scratch.

Seeded and bounded: EVENTSYNC_ACCESS_SEED (default 11), EVENTSYNC_ACCESS_SETUPS (3) and
EVENTSYNC_ACCESS_PHASES (4) run it wider. Real parts only: the fake over HTTP on 127.0.0.1,
real SQLite files.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import client_for, first_difference

from eventsync.app import open_app, open_store
from eventsync.config import Settings
from eventsync.service import Service
from eventsync.store.mirror import Store
from eventsync.testing import FakeBookStack
from eventsync.testing.models import Entity, Page, Perm
from eventsync.testing.state import ADMIN_ROLE_ID, ADMIN_USER_ID

SEED = int(os.environ.get("EVENTSYNC_ACCESS_SEED", "11"))
SETUPS = int(os.environ.get("EVENTSYNC_ACCESS_SETUPS", "3"))
PHASES = int(os.environ.get("EVENTSYNC_ACCESS_PHASES", "4"))
pytestmark = pytest.mark.timeout(90 + 60 * SETUPS * PHASES)

SECRET = "access-test-secret-0123456789"
RPM = 100_000
TYPES = ("bookshelf", "book", "chapter", "page")
SECTIONS = {"bookshelf": "shelves", "book": "books", "chapter": "chapters", "page": "pages"}
TOKEN_SECRET = "user-token-secret"


# ---- the random wiki ------------------------------------------------------------------------


def _random_view_permissions(rng: random.Random) -> set[str]:
    perms = {"access-api"}
    for content_type in TYPES:
        if rng.random() < 0.55:
            perms.add(f"{content_type}-view-all")
        if rng.random() < 0.45:
            perms.add(f"{content_type}-view-own")
    return perms


def _random_rows(rng: random.Random, roles: list[int]) -> dict[int, Perm]:
    rows: dict[int, Perm] = {}
    for role_id in rng.sample(roles, k=min(len(roles), rng.choice((0, 1, 1, 2, 3)))):
        rows[role_id] = Perm(view=rng.random() < 0.5, create=False, update=False, delete=False)
    if rng.random() < 0.5 or not rows:
        rows[0] = Perm(view=rng.random() < 0.5, create=False, update=False, delete=False)
    return rows


def _live(fake: FakeBookStack, content_type: str) -> list[Entity]:
    table: dict[int, Any] = {
        "bookshelf": fake.state.shelves,
        "book": fake.state.books,
        "chapter": fake.state.chapters,
        "page": fake.state.pages,
    }[content_type]
    return [e for e in table.values() if not e.trashed and not (isinstance(e, Page) and e.draft)]


async def build_wiki(fake: FakeBookStack, rng: random.Random) -> None:
    """A small wiki whose every role, membership, owner and permission row is random."""
    fake.seed(
        pages=30,
        books=4,
        chapters_per_book=2,
        shelves=2,
        users=0,
        roles=0,
        attachments=10,
        permission_share=0.0,
        seed=rng.randrange(10**6),
    )
    state = fake.state
    for role_id in (2, 3, 4):  # Editor, Viewer, Public: API access, views as installed
        state.roles[role_id].permissions.add("access-api")
    roles = [r for r in state.roles if r != ADMIN_ROLE_ID]
    for index in range(5):
        roles.append(await fake.create_role(f"Random {index}", _random_view_permissions(rng)))
    for index in range(7):
        chosen = rng.sample(roles, k=rng.choice((0, 1, 1, 2, 2, 3)))
        if rng.random() < 0.08:
            chosen.append(ADMIN_ROLE_ID)
        user_id = await fake.create_user(f"User {index}", f"u{index}@example.com", chosen)
        fake.add_token(user_id, f"user-{user_id}", TOKEN_SECRET)
    fake.add_token(ADMIN_USER_ID, f"user-{ADMIN_USER_ID}", TOKEN_SECRET)
    fake.add_token(2, "user-2", TOKEN_SECRET)  # the guest, who has the Public role
    # Includes render blank for a viewer who cannot see the included page.
    pages = _live(fake, "page")
    for page in rng.sample(pages, k=min(len(pages), 6)):
        page.html += f"<p>{{{{@{rng.choice(pages).id}}}}}</p>"
    owners = [*state.users, 999]  # 999: a user deleted without handing on their content
    # Rows on containers matter most: they decide what is below them.
    share = {"bookshelf": 0.4, "book": 0.5, "chapter": 0.5, "page": 0.25}
    for content_type in TYPES:
        for entity in _live(fake, content_type):
            entity.owned_by = rng.choice(owners)
            if rng.random() < share[content_type]:
                state.entity_permissions[(content_type, entity.id)] = _random_rows(rng, roles)


async def random_change(fake: FakeBookStack, rng: random.Random) -> str:
    """One change BookStack reports with an event; returns what it was, for the message."""
    state = fake.state
    roles = [r for r in state.roles if r != ADMIN_ROLE_ID and not state.roles[r].system_name]
    all_roles = [r for r in state.roles if r != ADMIN_ROLE_ID]
    users = [u for u in state.users if u not in (ADMIN_USER_ID, 2)]
    pages = _live(fake, "page")
    chapters = _live(fake, "chapter")
    books = _live(fake, "book")
    roll = rng.random()
    if roll < 0.28:
        content_type = rng.choice(TYPES)
        items = _live(fake, content_type)
        if not items:
            return "nothing"
        entity = rng.choice(items)
        rows = _random_rows(rng, all_roles) if rng.random() < 0.8 else {}
        fallback = rows.pop(0, None)
        owner = rng.choice([*state.users]) if rng.random() < 0.3 else None
        await fake.set_permissions(
            content_type,
            entity.id,
            owner_id=owner,
            fallback=fallback.as_dict() if fallback else None,
            role_permissions=[{"role_id": r, **p.as_dict()} for r, p in rows.items()],
        )
        return f"permissions of {content_type} {entity.id} (owner {owner})"
    if roll < 0.36 and pages:
        page = rng.choice(pages)
        if chapters and rng.random() < 0.5:
            chapter = rng.choice(chapters)
            await fake.move_page(page.id, chapter_id=chapter.id)
            return f"page {page.id} to chapter {chapter.id}"
        book = rng.choice(books)
        await fake.move_page(page.id, book_id=book.id)
        return f"page {page.id} to book {book.id}"
    if roll < 0.43 and chapters and len(books) > 1:
        chapter = rng.choice(chapters)
        book = rng.choice([b for b in books if b.id != chapter.book_id])
        await fake.move_chapter(chapter.id, book.id)
        return f"chapter {chapter.id} to book {book.id}"
    if roll < 0.47 and pages and books:
        # A book sort moves pages between books and chapters with no page event: the
        # mirror patches their placement from the books' contents.
        moves = []
        for page in rng.sample(pages, k=min(len(pages), 3)):
            chapter = rng.choice(chapters) if chapters and rng.random() < 0.5 else None
            book_id = chapter.book_id if chapter else rng.choice(books).id
            moves.append(("page", page.id, book_id, chapter.id if chapter else None, 99))
        await fake.sort_book(moves)
        return f"book sort {[(m[1], m[2], m[3]) for m in moves]}"
    if roll < 0.6 and roles:
        role = rng.choice(roles)
        await fake.update_role(role, permissions=_random_view_permissions(rng))
        return f"permissions of role {role}"
    if roll < 0.75 and users:
        user = rng.choice(users)
        chosen = rng.sample(all_roles, k=rng.choice((0, 1, 2, 3)))
        await fake.update_user(user, roles=chosen)
        return f"roles of user {user}: {chosen}"
    if roll < 0.8:
        role = await fake.create_role("New", _random_view_permissions(rng))
        members = rng.sample(users, k=min(len(users), 2))
        for user in members:
            await fake.update_user(user, roles=[*state.users[user].roles, role])
        return f"new role {role} for {members}"
    if roll < 0.85 and len(roles) > 2:
        role = rng.choice(roles)
        target = rng.choice([r for r in roles if r != role]) if rng.random() < 0.5 else None
        await fake.delete_role(role, migrate_to=target)
        return f"role {role} deleted (members to {target})"
    if roll < 0.92 and books:
        author = rng.choice([ADMIN_USER_ID, *users])
        if chapters and rng.random() < 0.5:
            chapter = rng.choice(chapters)
            page = await fake.create_page(
                chapter_id=chapter.id, name="New", html="<p>n</p>", acting_user_id=author
            )
        else:
            page = await fake.create_page(
                book_id=rng.choice(books).id, name="New", html="<p>n</p>", acting_user_id=author
            )
        return f"new page {page} by {author}"
    if roll < 0.96 and pages:
        page = rng.choice(pages)
        await fake.delete_page(page.id)
        return f"page {page.id} deleted"
    if users and len(users) > 3:
        user = rng.choice(users)
        heir = rng.choice([ADMIN_USER_ID, *[u for u in users if u != user]])
        await fake.delete_user(user, migrate_ownership_to=heir if rng.random() < 0.5 else None)
        return f"user {user} deleted"
    return "nothing"


# ---- what BookStack shows each user ------------------------------------------------------


class Api:
    def __init__(self, fake: FakeBookStack, session: aiohttp.ClientSession) -> None:
        self.fake = fake
        self.session = session

    async def get(self, token: str, path: str, **params: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Token {token}:{TOKEN_SECRET}"}
        async with self.session.get(self.fake.url + path, params=params, headers=headers) as r:
            return r.status, await r.json()

    async def listing(self, token: str, path: str, **params: Any) -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = []
        while True:
            status, body = await self.get(token, path, count=500, offset=len(rows), **params)
            if status == 403:
                return None  # no API access: the user's token lists nothing
            assert status == 200, (path, status, body)
            rows += body["data"]
            if len(rows) >= body["total"] or not body["data"]:
                return rows

    async def seen_by(self, user_id: int, mirror: dict[str, Any]) -> dict[str, Any]:
        """What `user_id`'s own token lists, in the shape of `export --as-user`: the rows of
        the (converged) admin export for what the token lists, shelves' books and pages' html
        as the token reads them."""
        token = f"user-{user_id}"
        out: dict[str, Any] = {s: [] for s in (*SECTIONS.values(), "attachments")}
        if token not in self.fake.state.tokens:
            return out  # a deleted user: no token, nothing seen
        by_id = {s: {r["id"]: r for r in mirror[s]} for s in out}
        listed: dict[str, set[int]] = {}
        for content_type, section in SECTIONS.items():
            path = {"bookshelf": "/api/shelves"}.get(content_type, f"/api/{section}")
            params = {"filter[draft]": 0} if content_type == "page" else {}
            rows = await self.listing(token, path, **params)
            if rows is None:
                return out
            listed[section] = {r["id"] for r in rows}
        for shelf_id in sorted(listed["shelves"]):
            status, body = await self.get(token, f"/api/shelves/{shelf_id}")
            assert status == 200
            out["shelves"].append(
                {**by_id["shelves"][shelf_id], "books": [b["id"] for b in body["books"]]}
            )
        for section in ("books", "chapters"):
            out[section] = [by_id[section][i] for i in sorted(listed[section])]
        for page_id in sorted(listed["pages"]):
            status, body = await self.get(token, f"/api/pages/{page_id}")
            assert status == 200
            out["pages"].append({**by_id["pages"][page_id], "html": body["html"]})
        attachments = await self.listing(token, "/api/attachments") or []
        out["attachments"] = [
            by_id["attachments"][a["id"]]
            for a in sorted(attachments, key=lambda a: a["id"])
            # Attachments of binned pages are listed too; the mirror holds none (DESIGN 13).
            if a["uploaded_to"] in listed["pages"]
        ]
        return out


# ---- checks ---------------------------------------------------------------------------------


def _status_of(fake: FakeBookStack, entity: Entity) -> dict[int, tuple[int, int | None]]:
    return {
        r.id: fake.state.view_status(r, entity) for r in fake.state.roles.values() if r.committed
    }


async def access_problems(svc: Service, fake: FakeBookStack, api: Api) -> list[str]:
    """Every way the mirror's answers differ from what the fake shows (empty: none)."""
    store, state = svc.store, fake.state
    problems: list[str] = []
    mirror = await store.export()
    truth = fake.truth()
    if mirror != truth:
        return [f"mirror not converged: {first_difference(mirror, truth)}"]
    for content_type in TYPES:
        live = {e.id: e for e in _live(fake, content_type)}
        for entity in live.values():
            got = await store.access_of(content_type, entity.id)
            if got is None:
                problems.append(f"{content_type} {entity.id}: no access rows")
                continue
            have = {r["role_id"]: (r["status"], r["owner_id"]) for r in got["roles"]}
            want = _status_of(fake, entity)
            if have != want:
                problems.append(f"{content_type} {entity.id}: roles {have} != {want}")
            viewers = sorted(u for u in state.users if state.can_view(u, entity))
            if got["users"] != viewers:
                problems.append(f"{content_type} {entity.id}: users {got['users']} != {viewers}")
    for user_id in sorted({*state.users, *(u for u in range(1, max(state.users) + 2))}):
        got = await store.export_as_user(user_id)
        want = await api.seen_by(user_id, mirror)
        if got != want:
            problems.append(f"user {user_id}: export --as-user {first_difference(got, want)}")
    return problems


async def converge_access(svc: Service, fake: FakeBookStack, api: Api, what: list[str]) -> None:
    """Wait until the mirror equals BookStack and every answer matches. Events carry most
    changes within a second; what they cannot (a role delete's migration of members racing
    other membership changes: EVENTS.md leaves it to the sweep) a listing diff that reads
    every role catches, as `eventsync reconcile` would."""
    await fake.drain_webhooks()
    started = time.monotonic()
    diffed = False
    while True:
        problems = await access_problems(svc, fake, api)
        if not problems:
            return
        waited = time.monotonic() - started
        if waited > 4 and not diffed:
            diffed = True
            summary = await svc.reconciler.full_sync(set_cursor=False, all_permissions=False)
            assert summary.complete, summary.problems
            continue
        if waited > 45:
            raise AssertionError(f"after {what}: {len(problems)} problem(s), first: {problems[:3]}")
        await asyncio.sleep(0.2)


# BookStack's own per-user query (PermissionApplicator), as SCHEMA.md gives it for `access`.
VIEWERS_SQL = """
SELECT a.content_type, a.content_id, ur.user_id FROM access a
JOIN user_roles ur ON ur.role_id = a.role_id
GROUP BY a.content_type, a.content_id, ur.user_id
HAVING max(a.status) IN (1, 3) OR (max(a.owner_id) = ur.user_id AND max(a.status) != 2)
"""


def snapshot(path: Path) -> tuple[list[tuple[Any, ...]], dict[tuple[str, int], set[int]]]:
    """The feed's access rows and every item's viewers, read in one transaction of a
    connection of its own while serve goes on writing."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        rows = conn.execute(
            "SELECT seq, op, content_type, entity_id, data FROM changes "
            "WHERE entity = 'access' ORDER BY seq"
        ).fetchall()
        viewers: dict[tuple[str, int], set[int]] = {}
        for content_type, content_id, user_id in conn.execute(VIEWERS_SQL):
            viewers.setdefault((content_type, content_id), set()).add(user_id)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return rows, viewers


def assert_feed_matches(path: Path) -> None:
    """Replayed from the start, the feed's access rows give every item's viewers now; and
    each row names only users who really were added or removed."""
    rows, current = snapshot(path)
    replayed: dict[tuple[str, int], set[int]] = {}
    for seq, op, content_type, content_id, data in rows:
        now = replayed.setdefault((content_type, content_id), set())
        change = json.loads(data)
        added, removed = set(change["added"]), set(change["removed"])
        assert added or removed, seq
        assert not added & now and removed <= now, (seq, change, now)
        now |= added
        now -= removed
        if op == "delete":
            assert not now, seq
    assert {k: v for k, v in replayed.items() if v} == current


def joint_permissions(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT * FROM access ORDER BY 1, 2, 3").fetchall()


async def assert_equals_a_computation_from_scratch(store: Store, tmp_path: Path) -> None:
    """The incrementally kept rows equal the first computation's, on a snapshot copy."""
    copy = tmp_path / f"scratch-{time.monotonic_ns()}.db"
    await store.fetchone(f"VACUUM INTO '{copy}'")
    with sqlite3.connect(copy) as conn:
        kept = joint_permissions(conn)
        for table in ("access_items", "access_class_roles", "access_classes"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute("DELETE FROM sync_state WHERE key = 'access_built'")
    async with await open_store(copy):
        pass  # opening it computes everything
    with sqlite3.connect(copy) as conn:
        assert kept == joint_permissions(conn)


# ---- fixtures ---------------------------------------------------------------------------------


ServiceFactory = Callable[[FakeBookStack], Awaitable[Service]]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    async with AsyncExitStack() as stack:
        count = 0

        async def make(fake: FakeBookStack, **extra: Any) -> Service:
            nonlocal count
            count += 1
            settings = Settings(
                bookstack_url=fake.url,
                bookstack_token_id=fake.token_id,
                bookstack_token_secret=fake.token_secret,
                webhook_secret=SECRET,
                database=tmp_path / f"mirror-{count}.db",
                listen="127.0.0.1:0",
                requests_per_minute=RPM,
                poll_interval=0.3,
                sweep_share=0.0,
                **extra,
            )
            app = await stack.enter_async_context(open_app(settings, client=client_for(fake)))
            svc = Service(app)
            await svc.start()
            stack.push_async_callback(svc.stop)
            await asyncio.wait_for(svc.synced.wait(), 30)
            fake.add_webhook(f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}")
            return svc

        yield make


# ---- the property test ------------------------------------------------------------------------


@pytest.mark.parametrize("setup", range(SETUPS))
async def test_every_user_sees_through_the_mirror_what_their_token_lists(
    setup: int, make_service: ServiceFactory, tmp_path: Path
) -> None:
    rng = random.Random(f"{SEED}:{setup}")
    async with FakeBookStack(requests_per_minute=RPM) as fake, aiohttp.ClientSession() as http:
        await build_wiki(fake, rng)
        svc = await make_service(fake)
        api = Api(fake, http)
        await converge_access(svc, fake, api, ["the first sync"])
        assert_feed_matches(svc.settings.database)
        for phase in range(PHASES):
            done = [await random_change(fake, rng) for _ in range(rng.randint(3, 8))]
            await converge_access(svc, fake, api, [f"phase {phase}", *done])
            assert_feed_matches(svc.settings.database)
        await assert_equals_a_computation_from_scratch(svc.store, tmp_path)
