"""Effective access as users and other hosts ask for it (DESIGN: HTTP, Command line; issue 11
Interfaces): `GET /access/...`, `eventsync export --as-user`, `who-can-see`, `can-see`, the
read token that guards what other hosts may read, and the one line that says a sync token
cannot see everything instead of a wrong answer.

Real parts only: the fake BookStack over HTTP on 127.0.0.1, real SQLite files, `serve` in
process for the routes and the commands as subprocesses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import database_value
from test_cli import Cli, assert_no_traceback, assert_one_line_error, closed_port, settings_for

from eventsync.app import open_app, open_store
from eventsync.bookstack.client import BookStackClient
from eventsync.config import Settings
from eventsync.errors import ConfigError
from eventsync.server import check_exposure
from eventsync.service import Service
from eventsync.testing import FakeBookStack
from eventsync.testing.state import ADMIN_USER_ID

pytestmark = pytest.mark.timeout(90)

RPM = 100_000
SECRET = "access-api-secret-0123456789"
READ_TOKEN = "read-token-7c1f9e04b2d86a53"
VIEW_ALL = ["bookshelf-view-all", "book-view-all", "chapter-view-all", "page-view-all"]
DENY = {"view": False, "create": False, "update": False, "delete": False}
ALLOW = {"view": True, "create": False, "update": False, "delete": False}
MANAGER = ["access-api", "users-manage", "user-roles-manage", "settings-manage"]
MANAGER += ["restrictions-manage-all", *VIEW_ALL]


class Wiki:
    """A fake with a known set-up: book `book` (Editors: explicit allow; everyone else may
    not view) holds page `page`; `open_page` is in another book; `reader` has the Viewer
    role, `editor` the Editor role, `both` both."""

    def __init__(self, fake: FakeBookStack) -> None:
        self.fake = fake

    async def build(self) -> Wiki:
        fake = self.fake
        fake.seed(
            pages=12, books=2, shelves=1, users=0, roles=0, attachments=3, permission_share=0.0
        )
        self.book = await fake.create_book("Restricted")
        self.page = await fake.create_page(book_id=self.book, name="Secret", html="<p>s</p>")
        self.open_page = min(p for p in fake.state.pages if p != self.page)
        # Its html includes the secret page: BookStack renders that include blank for whoever
        # cannot see it.
        self.includer = await fake.create_page(
            book_id=fake.state.pages[self.open_page].book_id,
            name="Includer",
            html=f"<p>before</p>{{{{@{self.page}}}}}<p>{{{{@{self.open_page}}}}}</p>",
        )
        self.reader = await fake.create_user("Reader", "reader@example.com", [3])
        self.editor = await fake.create_user("Editor", "editor@example.com", [2])
        self.both = await fake.create_user("Both", "both@example.com", [2, 3])
        await fake.set_permissions(
            "book", self.book, fallback=DENY, role_permissions=[{"role_id": 2, **ALLOW}]
        )
        await fake.update_shelf(1, books=[*fake.state.shelves[1].books, self.book])
        return self


async def sync(fake: FakeBookStack, database: Path, token: tuple[str, str] | None = None) -> None:
    """A complete first full sync into `database`, with `token` (the admin's by default)."""
    async with open_app(Settings(database=database), client=client_of(fake, token)) as app:
        summary = await app.reconciler.full_sync()
        assert summary.complete, summary.problems


def client_of(fake: FakeBookStack, token: tuple[str, str] | None) -> BookStackClient:
    """helpers.client_for, with another user's token."""
    token_id, secret = token or (fake.token_id, fake.token_secret)
    options = {"backoff_base": 0.01, "backoff_cap": 0.05, "max_attempts": 2}
    return BookStackClient(fake.url, token_id, secret, requests_per_minute=RPM, **options)


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def wiki() -> AsyncIterator[Wiki]:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        yield await Wiki(fake).build()


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    async with AsyncExitStack() as stack:

        async def make(
            fake: FakeBookStack, token: tuple[str, str] | None = None, **extra: Any
        ) -> Service:
            token_id, secret = token or (fake.token_id, fake.token_secret)
            settings = Settings(
                bookstack_url=fake.url,
                bookstack_token_id=token_id,
                bookstack_token_secret=secret,
                webhook_secret=SECRET,
                database=tmp_path / "served.db",
                listen="127.0.0.1:0",
                requests_per_minute=RPM,
                sweep_share=0.0,
                **extra,
            )
            client = client_of(fake, token)
            app = await stack.enter_async_context(open_app(settings, client=client))
            svc = Service(app)
            await svc.start()
            stack.push_async_callback(svc.stop)
            await asyncio.wait_for(svc.synced.wait(), 30)
            return svc

        yield make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return Cli(workdir)


async def get(
    http: aiohttp.ClientSession, svc: Service, path: str, token: str | None = None
) -> tuple[int, Any, Any]:
    headers = {"Authorization": token} if token is not None else {}
    async with http.get(f"http://127.0.0.1:{svc.port}{path}", headers=headers) as response:
        try:
            body = await response.json(content_type=None)
        except json.JSONDecodeError:
            body = None
        return response.status, body, response.headers


def can_view(wiki: Wiki, user_id: int, content_type: str, item_id: int) -> bool:
    entity = wiki.fake.state.entity(content_type, item_id)
    assert entity is not None
    return wiki.fake.state.can_view(user_id, entity)


# ---- the routes -------------------------------------------------------------------------------


async def test_access_of_an_item_names_each_roles_status_and_its_viewers(
    wiki: Wiki, make_service: ServiceFactory, http: aiohttp.ClientSession
) -> None:
    svc = await make_service(wiki.fake)
    status, body, _ = await get(http, svc, f"/access/page/{wiki.page}")
    assert status == 200, body
    state = wiki.fake.state
    entity = state.pages[wiki.page]
    assert body["kind"] == "page" and body["id"] == wiki.page and body["content_type"] == "page"
    assert {r["role_id"]: (r["status"], r["owner_id"]) for r in body["roles"]} == {
        r.id: state.view_status(r, entity) for r in state.roles.values()
    }
    by_role = {r["role_id"]: r for r in body["roles"]}
    assert (by_role[2]["name"], by_role[2]["status_name"]) == ("Editor", "explicit allow")
    assert (by_role[3]["name"], by_role[3]["status_name"]) == ("Viewer", "implicit deny")
    assert body["users"] == [u for u in sorted(state.users) if state.can_view(u, entity)]
    assert wiki.editor in body["users"] and wiki.reader not in body["users"]
    # "shelf" or BookStack's "bookshelf" both name a shelf.
    for kind in ("shelf", "bookshelf"):
        status, body, _ = await get(http, svc, f"/access/{kind}/1")
        assert status == 200 and body["content_type"] == "bookshelf" and body["kind"] == "shelf"


async def test_a_users_items_are_listed_by_id_in_pages(
    wiki: Wiki, make_service: ServiceFactory, http: aiohttp.ClientSession
) -> None:
    svc = await make_service(wiki.fake)
    state = wiki.fake.state
    for user_id in (wiki.reader, wiki.editor, ADMIN_USER_ID):
        wanted = [p for p in sorted(state.pages) if can_view(wiki, user_id, "page", p)]
        got: list[int] = []
        after = 0
        while True:
            status, body, _ = await get(
                http, svc, f"/access/users/{user_id}?kind=page&after={after}&limit=5"
            )
            assert status == 200, body
            assert body["user_id"] == user_id and body["kind"] == "page"
            got += body["ids"]
            if body["next_after"] is None:
                break
            assert body["next_after"] == body["ids"][-1] and len(body["ids"]) == 5
            after = body["next_after"]
        assert got == wanted, user_id
    # kind defaults to page; books too.
    _, body, _ = await get(http, svc, f"/access/users/{wiki.reader}")
    assert body["kind"] == "page" and wiki.page not in body["ids"]
    _, body, _ = await get(http, svc, f"/access/users/{wiki.reader}?kind=book")
    assert wiki.book not in body["ids"] and body["ids"]


BAD_QUESTIONS = [
    ("/access/pages/1", 400),
    ("/access/PAGE/1", 200),
    ("/access/page/abc", 400),
    ("/access/page/0", 400),
    ("/access/page/-3", 400),
    ("/access/page/99999999999999999999999", 400),
    ("/access/page/%F0%9F%92%A9", 400),
    ("/access/page/999999", 404),
    ("/access/users/abc", 400),
    ("/access/users/999999", 404),
    ("/access/users/1?kind=attachment", 400),
    ("/access/users/1?limit=0", 400),
    ("/access/users/1?limit=10001", 400),
    ("/access/users/1?limit=ten", 400),
    ("/access/users/1?after=-1", 400),
    ("/access/users/1?after=1e3", 400),
    ("/access/users/1?after=99999999999999999999999", 400),
    ("/access/page", 404),
    ("/access/", 404),
]


async def test_bad_questions_get_a_clear_4xx(
    wiki: Wiki, make_service: ServiceFactory, http: aiohttp.ClientSession
) -> None:
    svc = await make_service(wiki.fake)
    for path, status in BAD_QUESTIONS:
        got, body, _ = await get(http, svc, path)
        assert got == status, (path, body)
        if status != 200:
            assert isinstance(body["error"]["message"], str), path
            assert body["error"]["code"] == status, path


# ---- the read token ---------------------------------------------------------------------------


GUARDED = ("/changes", "/changes?after=0", "/access/page/1", "/access/users/1", "/status")


async def test_the_read_token_guards_the_feed_access_and_status(
    wiki: Wiki, make_service: ServiceFactory, http: aiohttp.ClientSession
) -> None:
    svc = await make_service(wiki.fake, read_token=READ_TOKEN)
    wrong = [
        None,
        "",
        "Bearer",
        f"Bearer {READ_TOKEN[:-1]}",
        f"Bearer {READ_TOKEN}x",
        f"Bearer {READ_TOKEN[:-1]}{chr(ord(READ_TOKEN[-1]) + 1)}",
        f"Token {READ_TOKEN}",
        READ_TOKEN,
        f"Bearer  {READ_TOKEN} extra",
    ]
    for path in (*GUARDED, "/changes/stream"):
        for header in wrong:
            status, body, headers = await get(http, svc, path, header)
            assert status == 401, (path, header, status)
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert READ_TOKEN not in json.dumps(body)
    for path in GUARDED:
        status, _, _ = await get(http, svc, path, f"Bearer {READ_TOKEN}")
        assert status == 200, path
    # Health, readiness, metrics and the webhook route are as they were.
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _, _ = await get(http, svc, path)
        assert status in (200, 503) and status != 401, path
    wiki.fake.add_webhook(f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}")
    await wiki.fake.update_page(wiki.open_page, name="Renamed")
    await wiki.fake.drain_webhooks()
    assert [d.status for d in wiki.fake.webhook_deliveries] == [202]


async def test_without_a_read_token_the_routes_are_open(
    wiki: Wiki, make_service: ServiceFactory, http: aiohttp.ClientSession
) -> None:
    svc = await make_service(wiki.fake)
    for path in GUARDED:
        status, _, _ = await get(http, svc, path)
        assert status == 200, path


async def test_serve_refuses_a_non_loopback_address_without_a_read_token(
    cli: Cli, tmp_path: Path
) -> None:
    port = closed_port()
    base = settings_for(None, tmp_path / "m.db", webhook_secret=SECRET, requests_per_minute="60")
    for listen in (f"0.0.0.0:{port}", f"[::]:{port}"):
        result = await cli("serve", env={**base, "EVENTSYNC_LISTEN": listen})
        assert_one_line_error(result, "EVENTSYNC_READ_TOKEN", "EVENTSYNC_LISTEN")
    assert not (tmp_path / "m.db").exists(), "refused before any start-up work"
    short = {**base, "EVENTSYNC_READ_TOKEN": "short"}
    assert_one_line_error(await cli("serve", env=short), "EVENTSYNC_READ_TOKEN")
    spaced = {**base, "EVENTSYNC_READ_TOKEN": "has a space in it, sixteen+"}
    assert_one_line_error(await cli("export", env=spaced), "EVENTSYNC_READ_TOKEN")


# ---- the commands -----------------------------------------------------------------------------


async def test_who_can_see_and_can_see_say_why(wiki: Wiki, cli: Cli, tmp_path: Path) -> None:
    database = tmp_path / "m.db"
    await sync(wiki.fake, database)
    env = {"EVENTSYNC_DATABASE": database_value(database)}
    result = await cli("who-can-see", "page", str(wiki.page), env=env)
    assert result.code == 0, str(result)
    first, *roles = result.stdout.splitlines()
    viewers = sorted(u for u in wiki.fake.state.users if can_view(wiki, u, "page", wiki.page))
    assert first.endswith(": " + ", ".join(str(u) for u in viewers)), first
    assert any(
        "role Editor: explicit allow on book" in line and "inherited" in line for line in roles
    )
    assert any("role Viewer: everyone else may not view on book" in line for line in roles)
    assert any("role Admin: the admin role sees everything" in line for line in roles)

    yes = await cli("can-see", str(wiki.both), "page", str(wiki.page), env=env)
    assert yes.code == 0, str(yes)
    assert yes.stdout.strip() == (
        f"user {wiki.both} can see page {wiki.page}: role Editor: explicit allow on book "
        f"{wiki.book}, inherited"
    )
    no = await cli("can-see", str(wiki.reader), "page", str(wiki.page), env=env)
    assert no.code == 1, str(no)
    assert no.stdout.strip() == (
        f"user {wiki.reader} cannot see page {wiki.page}: role Viewer: everyone else may not "
        f"view on book {wiki.book}, inherited"
    )
    plain = await cli("can-see", str(wiki.reader), "page", str(wiki.open_page), env=env)
    assert plain.code == 0 and "role permission page-view-all" in plain.stdout, str(plain)


async def test_export_as_user_is_what_that_user_sees(wiki: Wiki, cli: Cli, tmp_path: Path) -> None:
    database = tmp_path / "m.db"
    await sync(wiki.fake, database)
    env = {"EVENTSYNC_DATABASE": database_value(database)}
    sections = ("shelves", "books", "chapters", "pages", "attachments")
    for user_id in (wiki.reader, wiki.editor, ADMIN_USER_ID):
        result = await cli("export", "--as-user", str(user_id), env=env)
        assert result.code == 0, str(result)
        doc = json.loads(result.stdout)
        truth = wiki.fake.state.truth(user_id)
        assert doc == {s: truth[s] for s in sections}, user_id
    doc = json.loads((await cli("export", "--as-user", str(wiki.reader), env=env)).stdout)
    assert wiki.page not in [p["id"] for p in doc["pages"]]
    assert wiki.book not in [b["id"] for b in doc["books"]]
    assert doc["shelves"][0]["books"] and wiki.book not in doc["shelves"][0]["books"]
    includer = next(p for p in doc["pages"] if p["id"] == wiki.includer)
    assert "<p>s</p>" not in includer["html"] and includer["html"].startswith("<p>before</p><p>")
    doc = json.loads((await cli("export", "--as-user", str(wiki.editor), env=env)).stdout)
    includer = next(p for p in doc["pages"] if p["id"] == wiki.includer)
    assert "<p>s</p>" in includer["html"]


async def test_bad_questions_are_one_line_and_no_traceback(
    wiki: Wiki, cli: Cli, tmp_path: Path
) -> None:
    database = tmp_path / "m.db"
    await sync(wiki.fake, database)
    env = {"EVENTSYNC_DATABASE": database_value(database)}
    for args in (
        ("who-can-see", "pages", "1"),
        ("who-can-see", "page", "x"),
        ("who-can-see", "page", "0"),
        ("who-can-see", "page"),
        ("can-see", "one", "page", "1"),
        ("can-see", "1", "page", "-1"),
        ("export", "--as-user", "0"),
        ("export", "--as-user", "99999999999999999999999"),
    ):
        assert_one_line_error(await cli(*args, env=env))
    for args, what in (
        (("who-can-see", "page", "999999"), "no page 999999 in the mirror"),
        (("can-see", "999999", "page", "1"), "no user 999999 in the mirror"),
        (("can-see", "1", "chapter", "999999"), "no chapter 999999 in the mirror"),
        (("export", "--as-user", "999999"), "no user 999999 in the mirror"),
    ):
        result = await cli(*args, env=env)
        assert result.code == 1, str(result)
        assert_no_traceback(result)
        assert result.stderr.strip() == f"eventsync: {what}", str(result)


# ---- a sync token that does not see everything ------------------------------------------------


async def test_a_limited_sync_token_is_said_in_one_line_instead_of_wrong_answers(
    wiki: Wiki, cli: Cli, tmp_path: Path, make_service: ServiceFactory, http: aiohttp.ClientSession
) -> None:
    """A manager's token (every permission a sync needs, but not the admin role) does not
    see a page hidden from everyone but admins: its mirror lacks it, and an answer about
    who can see what would be wrong."""
    fake = wiki.fake
    role = await fake.create_role("Managers", MANAGER)
    manager = await fake.create_user("Manager", "manager@example.com", [role])
    fake.add_token(manager, "manager-token", "manager-secret")
    hidden = await fake.create_page(book_id=wiki.book, name="Admins only", html="")
    await fake.set_permissions("page", hidden, fallback=DENY)
    database = tmp_path / "limited.db"
    await sync(fake, database, ("manager-token", "manager-secret"))
    async with await open_store(database) as store:
        assert await store.get("page", hidden) is None
    env = {"EVENTSYNC_DATABASE": database_value(database)}
    for args in (
        ("export", "--as-user", str(wiki.reader)),
        ("who-can-see", "page", str(wiki.open_page)),
        ("can-see", str(wiki.reader), "page", str(wiki.open_page)),
    ):
        result = await cli(*args, env=env)
        assert_one_line_error(result, "effective access unavailable", f"user {manager}", "admin")
        assert result.stdout == ""
    # The mirror itself is as the token sees it, and exported as ever; status says why.
    assert (await cli("export", env=env)).code == 0
    status = await cli("status", "--json", env=env)
    assert f"user {manager}" in json.loads(status.stdout)["access_unavailable"]
    assert "effective access: unavailable" in (await cli("status", env=env)).stdout

    svc = await make_service(fake, ("manager-token", "manager-secret"))
    for path in (f"/access/page/{wiki.open_page}", f"/access/users/{wiki.reader}"):
        status, body, _ = await get(http, svc, path)
        assert status == 409, body
        assert f"user {manager}" in body["error"]["message"]


async def test_a_token_refused_what_a_sync_needs_is_said_in_one_line(
    wiki: Wiki, cli: Cli, tmp_path: Path
) -> None:
    """A viewer's token may use the API but not list users or roles: its sync is incomplete,
    and the commands say what it was refused rather than answer from what it could read."""
    fake = wiki.fake
    role = await fake.create_role("API viewers", ["access-api", *VIEW_ALL])
    viewer = await fake.create_user("API viewer", "api-viewer@example.com", [role])
    fake.add_token(viewer, "viewer-token", "viewer-secret")
    database = tmp_path / "viewer.db"
    token = ("viewer-token", "viewer-secret")
    async with open_app(Settings(database=database), client=client_of(fake, token)) as app:
        summary = await app.reconciler.full_sync()
    assert not summary.complete
    env = {"EVENTSYNC_DATABASE": database_value(database)}
    result = await cli("who-can-see", "page", str(wiki.open_page), env=env)
    assert_one_line_error(result, "refused /api/users, /api/roles", "admin")
    # An admin's complete sync into the same mirror lifts it.
    await sync(fake, database)
    assert (await cli("who-can-see", "page", str(wiki.open_page), env=env)).code == 0


async def test_the_admins_token_is_trusted_and_a_mirror_not_synced_yet_is_not(
    wiki: Wiki, cli: Cli, tmp_path: Path
) -> None:
    database = tmp_path / "m.db"
    async with await open_store(database) as store:
        assert await store.access_problem() is not None
    env = {"EVENTSYNC_DATABASE": database_value(database)}
    result = await cli("who-can-see", "page", "1", env=env)
    assert_one_line_error(result, "no complete full sync yet")
    # A manager holds what a sync needs too, but cannot see the restricted book: the token
    # that mirrored it is not theirs, so it is the admin's.
    role = await wiki.fake.create_role("Managers", MANAGER)
    manager = await wiki.fake.create_user("Manager", "manager@example.com", [role])
    await sync(wiki.fake, database)
    async with await open_store(database) as store:
        assert await store.access_problem() is None
    status = await cli("status", "--json", env=env)
    assert json.loads(status.stdout)["access_unavailable"] is None
    # Once the manager can see everything the mirror holds, the token might be theirs:
    # BookStack does not say whose a token is, so eventsync does not guess.
    await wiki.fake.update_user(manager, roles=[role, 2])
    await sync(wiki.fake, database)
    async with await open_store(database) as store:
        problem = await store.access_problem()
    assert problem is not None and f"user {manager}" in problem


def test_only_loopback_addresses_may_go_without_a_read_token() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        check_exposure(host, None)
    for host in ("0.0.0.0", "::", "192.0.2.7", "2001:db8::1"):
        with pytest.raises(ConfigError, match="EVENTSYNC_READ_TOKEN"):
            check_exposure(host, None)
        check_exposure(host, READ_TOKEN)
    # A name that does not resolve is check_listen's to report, with its own message.
    check_exposure("no-such-host.invalid", None)
