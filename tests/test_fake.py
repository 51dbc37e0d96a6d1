"""Tests of the fake BookStack itself, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from helpers import Receiver

from eventsync.testing import FakeBookStack, Faults
from eventsync.testing.sorting import SortRuleInUseError

pytestmark = pytest.mark.timeout(30)

VIEW_ALL = {"bookshelf-view-all", "book-view-all", "chapter-view-all", "page-view-all"}

Json = dict[str, Any]
FakeFactory = Callable[..., Awaitable[FakeBookStack]]


# ------------------------------------------------------------------ fixtures
@pytest.fixture
async def make_fake() -> AsyncIterator[FakeFactory]:
    fakes: list[FakeBookStack] = []

    async def make(**kwargs: Any) -> FakeBookStack:
        fake = FakeBookStack(**kwargs)
        await fake.start()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        await fake.stop()


@pytest.fixture
async def fake(make_fake: FakeFactory) -> FakeBookStack:
    return await make_fake()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def auth(fake: FakeBookStack, token_id: str | None = None, secret: str | None = None) -> Json:
    return {"Authorization": f"Token {token_id or fake.token_id}:{secret or fake.token_secret}"}


async def get(
    http: aiohttp.ClientSession, fake: FakeBookStack, path: str, headers: Json | None = None
) -> tuple[int, Any, Any]:
    async with http.get(fake.url + path, headers=headers or auth(fake)) as response:
        return response.status, await response.json(), response.headers


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


class Clock:
    """A clock the test moves by hand, so "did updated_at move?" has a clear answer."""

    def __init__(self) -> None:
        self.now = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def activities_after(fake: FakeBookStack, after: int) -> list[str]:
    return [a.type for a in fake.state.activities if a.id > after]


def last_activity_id(fake: FakeBookStack) -> int:
    return fake.state.activities[-1].id if fake.state.activities else 0


async def api_user(fake: FakeBookStack, permissions: set[str], token: str) -> int:
    role_id = await fake.create_role(f"role {token}", permissions)
    user_id = await fake.create_user(f"user {token}", f"{token}@example.com", [role_id])
    fake.add_token(user_id, token, "secret")
    return user_id


# ----------------------------------------------------------------------- auth
async def test_auth_matrix(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    no_api = await fake.create_user("No API", "noapi@example.com", [3])
    fake.add_token(no_api, "noapi", "secret")
    fake.add_token(1, "expired", "secret", expires_at=datetime.now(UTC) - timedelta(days=1))
    unconfirmed = await api_user(fake, {"access-api"}, "unconfirmed")
    fake.state.users[unconfirmed].email_confirmed = False
    fake.state.email_confirmation_required = True

    cases = [
        ({}, 401, "No authorization token found on the request"),
        (
            {"Authorization": "Bearer abc"},
            401,
            "An authorization token was found on the request but the format appeared incorrect",
        ),
        (
            auth(fake, "nope", "x"),
            401,
            "No matching API token was found for the provided authorization token",
        ),
        (
            auth(fake, fake.token_id, "wrong"),
            401,
            "The secret provided for the given used API token is incorrect",
        ),
        (auth(fake, "expired", "secret"), 403, "The authorization token used has expired"),
        (
            auth(fake, "noapi", "secret"),
            403,
            "The owner of the used API token does not have permission to make API calls",
        ),
        (
            auth(fake, "unconfirmed", "secret"),
            401,
            "The email address for the account in use needs to be confirmed",
        ),
    ]
    for headers, status, message in cases:
        async with http.get(fake.url + "/api/books", headers=headers) as response:
            body = await response.json()
            assert (response.status, body) == (
                status,
                {"error": {"message": message, "code": status}},
            ), headers
            assert "X-RateLimit-Remaining" in response.headers
    status, _, _ = await get(http, fake, "/api/books")
    assert status == 200


async def test_permission_gates(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    await api_user(fake, {"access-api", "settings-manage"}, "limited")
    headers = auth(fake, "limited", "secret")
    for path in ("/api/audit-log", "/api/users", "/api/roles", "/api/recycle-bin"):
        status, body, _ = await get(http, fake, path, headers)
        assert status == 403, path
        assert body["error"]["message"] == (
            "You do not have permission to perform the requested action."
        )
    status, _, _ = await get(http, fake, "/api/books", headers)
    assert status == 200


async def test_unknown_route_is_html_404(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    # A real v25.02.4 answers an unknown API path from the web fallback route: an HTML page,
    # with or without a token, before the throttle (real-v25.02.4/api/*.html.head).
    for headers in (auth(fake), {}):
        async with http.get(fake.url + "/api/nothing-here", headers=headers) as response:
            assert response.status == 404
            assert response.content_type == "text/html"
            assert "X-RateLimit-Remaining" not in response.headers
            assert (await response.text()).startswith("<!DOCTYPE html>")
    # A known route with nothing behind it is BookStack's JSON error.
    status, body, _ = await get(http, fake, "/api/pages/999")
    assert (status, body["error"]["code"]) == (404, 404)


# Answers captured from a real BookStack v25.02.4, beside this checkout (../shared/bookstack).
REAL_API = Path(__file__).resolve().parents[2] / "shared" / "bookstack" / "real-v25.02.4" / "api"
REAL_BASE_URL = "http://127.0.0.1:8880"  # where the real instance ran


@pytest.mark.skipif(not REAL_API.is_dir(), reason=f"no real BookStack samples at {REAL_API}")
async def test_error_answers_are_the_real_bookstacks(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    """The errors eventsync tells apart by kind, held to what v25.02.4 answered."""

    def real(name: str) -> Any:
        return json.loads((REAL_API / name).read_text())

    no_token = await get(http, fake, "/api/books", {"Accept": "application/json"})
    assert (no_token[0], no_token[1]) == (401, real("error-401-no-token.json"))
    wrong = await get(http, fake, "/api/books", auth(fake, fake.token_id, "wrong"))
    assert (wrong[0], wrong[1]) == (401, real("error-401-wrong-secret.json"))
    missing = await get(http, fake, "/api/pages/999")
    assert (missing[0], missing[1]) == (404, real("error-404.json"))
    # The fake validates one field at a time; BookStack lists every failing field.
    invalid = real("error-422.json")["error"]
    async with http.post(fake.url + "/api/pages", json={}, headers=auth(fake)) as response:
        body = await response.json()
    assert response.status == invalid["code"] == 422
    assert body["error"]["message"] == invalid["message"]
    assert body["error"]["validation"].items() <= invalid["validation"].items()

    # The capture stops mid-line: the lines before that one, blank ones aside.
    head = (REAL_API / "error-unknown-api-route-404.html.head").read_text().splitlines()[:-1]
    captured = [line for line in head if line.strip()]
    async with http.get(fake.url + "/api/system", headers=auth(fake)) as response:
        html = (await response.text()).replace(fake.url, REAL_BASE_URL)
        assert (response.status, response.content_type) == (404, "text/html")
        assert "X-RateLimit-Limit" not in response.headers
    assert [line for line in html.splitlines() if line.strip()][: len(captured)] == captured


async def test_a_bookstack_before_v23_08_has_no_audit_log_api(
    make_fake: FakeFactory, http: aiohttp.ClientSession
) -> None:
    fake = await make_fake(audit_log=False)
    await fake.create_book("Logged all the same")
    async with http.get(fake.url + "/api/audit-log", headers=auth(fake)) as response:
        assert (response.status, response.content_type) == (404, "text/html")
    assert (await get(http, fake, "/api/books"))[0] == 200
    assert [a.type for a in fake.state.activities] == ["book_create"]  # webhooks still go
    fake.audit_log = True  # upgraded
    status, body, _ = await get(http, fake, "/api/audit-log")
    assert status == 200 and [r["type"] for r in body["data"]] == ["book_create"]


async def test_revoked_token_gets_401_until_restored(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    fake.revoke_token()
    status, body, _ = await get(http, fake, "/api/books")
    assert (status, body["error"]["message"]) == (
        401,
        "No matching API token was found for the provided authorization token",
    )
    fake.restore_token()
    assert (await get(http, fake, "/api/books"))[0] == 200


# ------------------------------------------------------------------- listings
async def test_listing_semantics(make_fake: FakeFactory, http: aiohttp.ClientSession) -> None:
    fake = await make_fake(requests_per_minute=1000)
    fake.seed(pages=600, books=4, shelves=1, attachments=0, permission_share=0)

    status, body, _ = await get(http, fake, "/api/pages")
    assert status == 200
    assert (len(body["data"]), body["total"]) == (100, 600)
    assert set(body["data"][0]) >= {"revision_count", "editor", "book_slug", "chapter_id"}
    assert "html" not in body["data"][0]

    _, body, _ = await get(http, fake, "/api/pages?count=0")
    assert len(body["data"]) == 1
    _, body, _ = await get(http, fake, "/api/pages?count=5000")
    assert len(body["data"]) == 500
    _, body, _ = await get(http, fake, "/api/pages?count=10&offset=595")
    assert [p["id"] for p in body["data"]] == list(range(596, 601))
    assert body["total"] == 600

    _, body, _ = await get(http, fake, "/api/pages?sort=-nonsense&count=3")
    assert [p["id"] for p in body["data"]] == [600, 599, 598]
    _, body, _ = await get(http, fake, "/api/pages?sort=+nonsense&count=3")
    assert [p["id"] for p in body["data"]] == [1, 2, 3]
    _, body, _ = await get(http, fake, "/api/pages?sort=-name&count=2")
    names = sorted((p.name.casefold() for p in fake.state.pages.values()), reverse=True)
    assert [p["name"].casefold() for p in body["data"]] == names[:2]

    _, body, _ = await get(http, fake, "/api/pages?filter[nonsense]=1&count=1")
    assert body["total"] == 600
    _, body, _ = await get(http, fake, "/api/pages?filter[id:gt]=590&count=500")
    assert body["total"] == 10
    _, body, _ = await get(http, fake, "/api/pages?filter[id:lte]=5&filter[id:ne]=3")
    assert [p["id"] for p in body["data"]] == [1, 2, 4, 5]
    _, body, _ = await get(http, fake, "/api/pages?filter[id:bogus]=7")
    assert [p["id"] for p in body["data"]] == [7]
    # Only the op names exist; symbols fall back to eq like any unknown op.
    for op in (">", "<=", "!=", "="):
        query = urlencode({f"filter[id:{op}]": "590"})
        _, body, _ = await get(http, fake, f"/api/pages?{query}")
        assert [p["id"] for p in body["data"]] == [590], op
    _, body, _ = await get(http, fake, "/api/pages?filter[name:like]=page 1__ %25&count=500")
    assert body["total"] == 100  # ids 100..199
    _, body, _ = await get(http, fake, "/api/pages?filter[draft]=1")
    assert body["total"] == 0
    _, body, _ = await get(http, fake, "/api/pages?filter[draft]=0&count=1")
    assert body["total"] == 600

    # /api/roles lists no id: sorting by it falls back to display_name, filtering is ignored.
    _, body, _ = await get(http, fake, "/api/roles?sort=id")
    names = [r["display_name"] for r in body["data"]]
    assert names == sorted(names, key=str.casefold)
    assert {"users_count", "permissions_count", "system_name", "id"} <= set(body["data"][0])
    _, body, _ = await get(http, fake, "/api/roles?filter[id]=1")
    assert body["total"] == len(fake.state.roles)
    _, body, _ = await get(http, fake, "/api/users")
    assert "roles" not in body["data"][0]


async def test_listing_of_2000_pages_is_fast(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    started = time.perf_counter()
    fake.seed(pages=2000, books=20, shelves=4, attachments=100)
    seeded = time.perf_counter()
    for offset in range(0, 2000, 500):
        status, body, _ = await get(http, fake, f"/api/pages?count=500&offset={offset}&sort=id")
        assert status == 200 and len(body["data"]) == 500
    assert seeded - started < 2.0
    assert time.perf_counter() - seeded < 3.0


# ----------------------------------------------------------------- rate limit
async def test_rate_limit(make_fake: FakeFactory, http: aiohttp.ClientSession) -> None:
    frozen = datetime(2020, 1, 1, tzinfo=UTC)
    fake = await make_fake(requests_per_minute=3, clock=lambda: frozen)
    remaining = []
    for headers in (auth(fake), {}, auth(fake)):  # unauthenticated requests count too
        async with http.get(fake.url + "/api/books", headers=headers) as response:
            assert response.headers["X-RateLimit-Limit"] == "3"
            remaining.append(response.headers["X-RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    async with http.get(fake.url + "/api/books", headers=auth(fake)) as response:
        assert response.status == 429
        assert await response.json() == {"error": {"message": "Too Many Attempts.", "code": 429}}
        assert 0 < int(response.headers["Retry-After"]) <= 60
        assert int(response.headers["X-RateLimit-Reset"]) >= int(time.time())
        assert response.headers["X-RateLimit-Remaining"] == "0"
    assert fake.rate_limit_hits == 1
    assert [r.status for r in fake.requests] == [200, 401, 200, 429]


# ---------------------------------------------------------------------- reads
async def test_read_shapes(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    shelf_book = await fake.create_book("Guide", "About", tags=[("topic", "ops")])
    other = await fake.create_book("Other")
    shelf = await fake.create_shelf("Shelf", books=[other, shelf_book])
    chapter = await fake.create_chapter(shelf_book, "Intro")
    included = await fake.create_page(book_id=shelf_book, name="Snippet", html="<p>snip</p>")
    page = await fake.create_page(
        chapter_id=chapter, name="Start", html=f"<p>a</p>{{{{@{included}}}}}", tags=[("k", "v")]
    )
    attachment = await fake.create_attachment(page, "notes", content=b"hello", extension="txt")
    link = await fake.create_attachment(page, "site", link="https://example.com")

    _, body, _ = await get(http, fake, f"/api/pages/{page}")
    assert body["html"] == "<p>a</p><p>snip</p>"
    assert body["raw_html"] == f"<p>a</p>{{{{@{included}}}}}"
    assert body["tags"] == [{"name": "k", "value": "v", "order": 0}]
    assert body["created_by"] == {"id": 1, "name": "Admin", "slug": "admin"}
    assert {"revision_count", "editor", "markdown", "draft", "template"} <= set(body)
    _, body, _ = await get(http, fake, f"/api/pages/{included}")
    assert body["chapter_id"] == 0

    _, body, _ = await get(http, fake, f"/api/books/{shelf_book}")
    assert [(i["type"], i["id"]) for i in body["contents"]] == [
        ("chapter", chapter),
        ("page", included),
    ]
    assert body["contents"][0]["pages"][0]["id"] == page
    assert "type" not in body["contents"][0]["pages"][0]
    assert body["tags"] == [{"name": "topic", "value": "ops", "order": 0}]
    _, body, _ = await get(http, fake, f"/api/chapters/{chapter}")
    assert body["book_slug"] == "guide"
    assert [p["id"] for p in body["pages"]] == [page]
    _, body, _ = await get(http, fake, f"/api/shelves/{shelf}")
    assert [b["id"] for b in body["books"]] == [other, shelf_book]
    assert isinstance(body["books"][0]["created_by"], int)

    _, body, _ = await get(http, fake, f"/api/attachments/{attachment}")
    assert base64.b64decode(body["content"]) == b"hello"
    assert set(body["links"]) == {"html", "markdown"}
    _, body, _ = await get(http, fake, f"/api/attachments/{link}")
    assert (body["external"], body["content"]) == (True, "https://example.com")

    _, body, _ = await get(http, fake, "/api/users/1")
    assert body["roles"] == [{"id": 1, "display_name": "Admin"}]
    _, body, _ = await get(http, fake, "/api/roles/1")
    assert body["permissions"] == sorted(body["permissions"])
    assert {"access-api", "settings-manage", "users-manage"} <= set(body["permissions"])
    assert body["users"] == [{"id": 1, "name": "Admin", "slug": "admin"}]

    await fake.set_permissions(
        "page",
        page,
        fallback={"view": False, "create": False, "update": False, "delete": False},
        role_permissions=[{"role_id": 3, "view": True}],
    )
    _, body, _ = await get(http, fake, f"/api/content-permissions/page/{page}")
    assert body["owner"] == {"id": 1, "name": "Admin", "slug": "admin"}
    assert body["fallback_permissions"] == {
        "inheriting": False,
        "view": False,
        "create": False,
        "update": False,
        "delete": False,
    }
    assert body["role_permissions"] == [
        {
            "role_id": 3,
            "view": True,
            "create": False,
            "update": False,
            "delete": False,
            "role": {"id": 3, "display_name": "Viewer"},
        }
    ]


async def test_visibility_for_non_admin(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    user = await api_user(fake, {"access-api", "page-view-all", "book-view-all"}, "viewer")
    book = await fake.create_book("B")
    hidden = await fake.create_page(book_id=book, name="Hidden", html="")
    shown = await fake.create_page(book_id=book, name="Shown", html="")
    draft = await fake.create_draft(book, "Mine", owner_id=user)
    await fake.create_draft(book, "Admin's", owner_id=1)
    await fake.set_permissions("page", hidden, fallback={"view": False})
    headers = auth(fake, "viewer", "secret")
    _, body, _ = await get(http, fake, "/api/pages", headers)
    assert [p["id"] for p in body["data"]] == [shown, draft]
    status, _, _ = await get(http, fake, f"/api/pages/{hidden}", headers)
    assert status == 404
    # Admin sees the hidden page but never another user's draft.
    _, body, _ = await get(http, fake, "/api/pages")
    assert draft not in [p["id"] for p in body["data"]]
    assert hidden in [p["id"] for p in body["data"]]
    assert [p["id"] for p in fake.truth()["pages"]] == [hidden, shown]


async def test_view_own_counts_only_where_no_permission_row_applies(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    """FACTS §6 step 6 as corrected on a real v25.02.4: `page-view-own` lets the owner see
    a page only while no entity row applies anywhere in its chain; an "everyone else: no
    view" row on the page, its chapter or its book hides it even from its owner."""
    user = await api_user(fake, {"access-api", "page-view-own"}, "owner")
    book = await fake.create_book("B")
    chapter = await fake.create_chapter(book, "C")
    plain = await fake.create_page(book_id=book, name="Plain", html="", acting_user_id=user)
    denied = await fake.create_page(book_id=book, name="Denied", html="", acting_user_id=user)
    under = await fake.create_page(chapter_id=chapter, name="Under", html="", acting_user_id=user)
    other = await fake.create_page(book_id=book, name="Other's", html="")
    await fake.set_permissions("page", denied, fallback={"view": False})
    await fake.set_permissions("chapter", chapter, fallback={"view": False})
    headers = auth(fake, "owner", "secret")
    _, body, _ = await get(http, fake, "/api/pages?filter[draft]=0", headers)
    assert [p["id"] for p in body["data"]] == [plain]
    for page in (denied, under, other):
        status, _, _ = await get(http, fake, f"/api/pages/{page}", headers)
        assert status == 404, page
    # The joint_permissions row carries the owner only on the role-permission path.
    role = fake.state.user_roles(user)[0]
    assert fake.state.view_status(role, fake.state.pages[plain]) == (0, user)
    assert fake.state.view_status(role, fake.state.pages[denied]) == (0, None)
    # An explicit allow for the role shows it, owner or not.
    await fake.set_permissions("page", other, role_permissions=[{"role_id": role.id, "view": True}])
    status, _, _ = await get(http, fake, f"/api/pages/{other}", headers)
    assert status == 200


async def test_explicit_deny_beats_an_implicit_allow_of_another_role(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    viewer = await fake.create_role("All", {"access-api", "page-view-all"})
    denied = await fake.create_role("Denied", {"access-api"})
    allowed = await fake.create_role("Allowed", {"access-api"})
    user = await fake.create_user("Two", "two@example.com", [viewer, denied])
    fake.add_token(user, "two", "secret")
    book = await fake.create_book("B")
    page = await fake.create_page(book_id=book, name="P", html="")
    await fake.set_permissions("book", book, role_permissions=[{"role_id": denied, "view": False}])
    headers = auth(fake, "two", "secret")
    status, _, _ = await get(http, fake, f"/api/pages/{page}", headers)
    assert status == 404
    # An explicit allow on another of the user's roles beats the deny.
    await fake.update_user(user, roles=[viewer, denied, allowed])
    await fake.set_permissions("page", page, role_permissions=[{"role_id": allowed, "view": True}])
    status, _, _ = await get(http, fake, f"/api/pages/{page}", headers)
    assert status == 200


async def test_book_contents_and_shelves_are_filtered_for_the_token_user(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    """A visible page of a hidden chapter is one of the book's top-level items (BookContents
    ::getTree's lone pages); a shelf lists only the books the user may see."""
    user = await api_user(fake, {"access-api", *VIEW_ALL}, "reader")
    role = fake.state.user_roles(user)[0].id
    book = await fake.create_book("B")
    hidden_book = await fake.create_book("Hidden")
    shelf = await fake.create_shelf("S", [hidden_book, book])
    chapter = await fake.create_chapter(book, "Hidden chapter")
    inside = await fake.create_page(chapter_id=chapter, name="Inside", html="")
    shown = await fake.create_page(chapter_id=chapter, name="Shown", html="")
    await fake.set_permissions("chapter", chapter, fallback={"view": False})
    await fake.set_permissions("page", shown, role_permissions=[{"role_id": role, "view": True}])
    await fake.set_permissions("book", hidden_book, fallback={"view": False})
    headers = auth(fake, "reader", "secret")
    _, body, _ = await get(http, fake, f"/api/books/{book}", headers)
    assert [(i["type"], i["id"]) for i in body["contents"]] == [("page", shown)]
    _, body, _ = await get(http, fake, f"/api/shelves/{shelf}", headers)
    assert [b["id"] for b in body["books"]] == [book]
    # The admin's token sees the chapter with both pages inside it.
    _, body, _ = await get(http, fake, f"/api/books/{book}")
    assert [(i["type"], i["id"]) for i in body["contents"]] == [("chapter", chapter)]
    assert [p["id"] for p in body["contents"][0]["pages"]] == [inside, shown]
    status, _, _ = await get(http, fake, f"/api/pages/{inside}", headers)
    assert status == 404


async def test_creating_a_page_checks_page_create_on_the_book(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    """checkOwnableUserAccess($book, 'page-create'): the role permission is page-create-all,
    unless the book's own create rows apply."""
    writer = await api_user(fake, {"access-api", *VIEW_ALL, "page-create-all"}, "writer")
    book = await fake.create_book("B")
    headers = auth(fake, "writer", "secret")
    body = {"book_id": book, "name": "New", "html": "<p>x</p>"}
    async with http.post(fake.url + "/api/pages", json=body, headers=headers) as response:
        assert response.status == 200
    role = fake.state.user_roles(writer)[0].id
    await fake.set_permissions(
        "book", book, role_permissions=[{"role_id": role, "view": True, "create": False}]
    )
    async with http.post(fake.url + "/api/pages", json=body, headers=headers) as response:
        assert response.status == 403


# ------------------------------------------------------------------- cascades
async def test_book_delete_hides_children_and_logs_once(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    book = await fake.create_book("Doomed")
    chapter = await fake.create_chapter(book, "C")
    page = await fake.create_page(chapter_id=chapter, name="P", html="")
    direct = await fake.create_page(book_id=book, name="D", html="")
    cursor = last_activity_id(fake)
    await fake.delete_book(book)
    assert activities_after(fake, cursor) == ["book_delete"]
    for path in (f"/api/chapters/{chapter}", f"/api/pages/{page}", f"/api/pages/{direct}"):
        status, _, _ = await get(http, fake, path)
        assert status == 404, path
    assert [(d["deletable_type"], d["deletable_id"]) for d in fake.deletions()] == [("book", book)]
    _, body, _ = await get(http, fake, "/api/recycle-bin")
    assert body["data"][0]["deletable"]["pages_count"] == 2


async def test_chapter_move_moves_pages_silently(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    source = await fake.create_book("Source")
    target = await fake.create_book("Target")
    chapter = await fake.create_chapter(source, "Moving")
    live = await fake.create_page(chapter_id=chapter, name="Live", html="")
    trashed = await fake.create_page(chapter_id=chapter, name="Trashed", html="")
    await fake.delete_page(trashed)
    cursor = last_activity_id(fake)
    await fake.move_chapter(chapter, target)
    assert activities_after(fake, cursor) == ["chapter_move"]
    _, body, _ = await get(http, fake, f"/api/pages/{live}")
    assert body["book_id"] == target
    assert fake.state.pages[trashed].book_id == target


async def test_link_rewrite_is_silent(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    book = await fake.create_book("Book")
    target = await fake.create_page(book_id=book, name="Target", html="<p>t</p>")
    linking = await fake.create_page(
        book_id=book, name="Linking", html=f'<a href="{fake.url}/books/book/page/target">x</a>'
    )
    before = fake.state.pages[linking].revision_count
    cursor = last_activity_id(fake)
    await fake.update_page(target, name="Renamed")
    assert activities_after(fake, cursor) == ["page_update"]
    _, body, _ = await get(http, fake, f"/api/pages/{linking}")
    assert "/books/book/page/renamed" in body["html"]
    assert body["revision_count"] == before + 1


async def test_sort_logs_book_sort_per_book(fake: FakeBookStack) -> None:
    first = await fake.create_book("First")
    second = await fake.create_book("Second")
    page = await fake.create_page(book_id=first, name="P", html="")
    cursor = last_activity_id(fake)
    await fake.sort_book([("page", page, second, None, 5)])
    assert activities_after(fake, cursor) == ["book_sort", "book_sort"]
    assert {a.loggable_id for a in fake.state.activities if a.id > cursor} == {first, second}
    assert (fake.state.pages[page].book_id, fake.state.pages[page].priority) == (second, 5)


async def test_sort_rules(make_fake: FakeFactory, receiver: Receiver) -> None:
    # FACTS, "Checked against a real BookStack v25.02.4", sort rules.
    clock = Clock()
    fake = await make_fake(clock=clock)
    fake.add_webhook(receiver.url)
    book = await fake.create_book("Book")
    other = await fake.create_book("Other")
    rule = await fake.create_sort_rule("By name", "name_asc")
    created = fake.state.activities[-1]
    assert (created.type, created.detail, created.loggable_id) == (
        "sort_rule_create",
        f"({rule}) By name",
        None,
    )
    assert receiver.bodies[-1]["url"] == f"{fake.url}/settings/sorting/rules/{rule}"
    assert "related_item" not in receiver.bodies[-1]

    clock.tick()
    cursor = last_activity_id(fake)
    await fake.set_book_sort_rule(book, rule)
    assert fake.state.books[book].sort_rule_id == rule
    assert fake.state.books[book].updated_at == clock.now  # a column changed: saved
    await fake.set_book_sort_rule(other, 999)  # no such rule: stored as none
    assert fake.state.books[other].sort_rule_id is None
    assert activities_after(fake, cursor) == ["book_sort", "book_sort"]
    # The assignment's book_sort carries the whole book; a manual sort's the short model.
    assert receiver.bodies[-2]["related_item"]["sort_rule_id"] == rule
    page = await fake.create_page(book_id=book, name="P", html="")
    await fake.sort_book([("page", page, book, None, 3)])
    assert "sort_rule_id" not in receiver.bodies[-1]["related_item"]

    await fake.update_sort_rule(rule, name="By name, renamed")
    assert fake.state.activities[-1].detail == f"({rule}) By name, renamed"
    cursor = last_activity_id(fake)
    with pytest.raises(SortRuleInUseError):
        await fake.delete_sort_rule(rule)  # the first submit only warns
    assert activities_after(fake, cursor) == [] and rule in fake.state.sort_rules
    clock.tick()
    await fake.delete_sort_rule(rule, confirm=True)
    # Books lose the rule with a moved updated_at and no book event.
    assert activities_after(fake, cursor) == ["sort_rule_delete"]
    assert fake.state.books[book].sort_rule_id is None
    assert fake.state.books[book].updated_at == clock.now
    assert fake.state.books[other].updated_at != clock.now


def _order(fake: FakeBookStack, book_id: int) -> list[str]:
    """The book's direct items and chapters by priority, as `kind:name`."""
    state = fake.state
    items: list[Any] = [
        *(p for p in state.book_pages(book_id) if not p.chapter_id and not p.trashed),
        *(c for c in state.book_chapters(book_id) if not c.trashed),
    ]
    return [f"{type(i).__name__.lower()}:{i.name}" for i in sorted(items, key=lambda i: i.priority)]


async def test_books_with_a_sort_rule_are_resorted_silently(make_fake: FakeFactory) -> None:
    """FACTS, first section: BookSorter::runBookAutoSort after every change inside the book,
    on assignment and on a rule update; each operation a stable sort, the last one wins;
    names as lower-cased bytes; no updated_at moves."""
    clock = Clock()
    fake = await make_fake(clock=clock)
    book = await fake.create_book("Sorted")
    for name in ("b page", "10 ten", "A page"):
        await fake.create_page(book_id=book, name=name, html="")
    chapter = await fake.create_chapter(book, "9 nine")
    inner = [await fake.create_page(chapter_id=chapter, name=n, html="") for n in ("z", "y")]
    rule = await fake.create_sort_rule("Chapters first, by name", "chapters_first,name_asc")
    clock.tick()
    stamps = {p.id: p.updated_at for p in fake.state.pages.values()}

    await fake.set_book_sort_rule(book, rule)

    # chapters_first only breaks ties: name_asc (last) decides; "10 ten" before "9 nine".
    assert _order(fake, book) == ["page:10 ten", "chapter:9 nine", "page:A page", "page:b page"]
    assert [fake.state.pages[p].priority for p in inner] == [2, 1]  # z, y → y first
    assert {p.id: p.updated_at for p in fake.state.pages.values()} == stamps

    # A new page takes its place by name; the others move down without an updated_at move.
    clock.tick()
    await fake.create_page(book_id=book, name="0 first", html="")
    assert _order(fake, book)[0] == "page:0 first"
    assert all(fake.state.pages[p].updated_at == t for p, t in stamps.items())

    await fake.update_sort_rule(rule, sequence="name_desc,chapters_first")
    assert _order(fake, book)[0] == "chapter:9 nine"
    assert _order(fake, book)[1:] == ["page:b page", "page:A page", "page:10 ten", "page:0 first"]

    # A manual sort of a book with a rule is re-sorted by the rule at once.
    first = next(p for p in fake.state.book_pages(book) if p.name == "0 first")
    await fake.sort_book([("page", first.id, book, None, 1)])
    assert _order(fake, book)[-1] == "page:0 first"

    # The re-sort can lag the webhook (BookStack sends it first): resort_delay widens that.
    fake.resort_delay = 0.2
    await fake.update_page(first.id, name="zzz last")
    assert _order(fake, book)[-1] == "page:zzz last"  # old place still
    await fake.update_sort_rule(rule, sequence="name_asc")
    assert _order(fake, book)[0] == "chapter:9 nine"  # not yet
    await asyncio.sleep(0.3)
    assert _order(fake, book)[0] == "page:10 ten"


async def test_conversions(fake: FakeBookStack, receiver: Receiver) -> None:
    fake.add_webhook(receiver.url)
    book = await fake.create_book("Handbook")
    chapter = await fake.create_chapter(book, "Part One")
    page = await fake.create_page(chapter_id=chapter, name="P1", html="")
    cursor = last_activity_id(fake)
    receiver.bodies.clear()

    new_book = await fake.convert_chapter_to_book(chapter)
    assert activities_after(fake, cursor) == ["book_create", "book_create_from_chapter"]
    assert receiver.events() == ["book_create", "book_create_from_chapter"]
    assert chapter not in fake.state.chapters
    chapter_create = next(a for a in fake.state.activities if a.type == "chapter_create")
    assert (chapter_create.detail, chapter_create.loggable_id) == ("Part One", None)
    assert (fake.state.pages[page].book_id, fake.state.pages[page].chapter_id) == (new_book, 0)

    second = await fake.create_chapter(book, "Part Two")
    await fake.create_page(book_id=book, name="Loose", html="")
    cursor = last_activity_id(fake)
    shelf = await fake.convert_book_to_shelf(book)
    assert activities_after(fake, cursor) == [
        "bookshelf_create",
        "book_create",
        "book_create_from_chapter",
        "bookshelf_create_from_book",
    ]
    assert second not in fake.state.chapters
    assert fake.state.books[book].name == "Handbook Pages"
    assert fake.state.shelves[shelf].books[-1] == book


# ---------------------------------------------------------------- recycle bin
async def test_recycle_bin_restore_is_announced_before_it_happens(
    fake: FakeBookStack, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    book = await fake.create_book("Book")
    page = await fake.create_page(book_id=book, name="P", html="")
    await fake.delete_page(page)
    fake.add_webhook(receiver.url, events=["recycle_bin_restore"])
    seen: list[int] = []

    async def on_body(body: Json) -> None:
        seen.append((await get(http, fake, f"/api/pages/{page}"))[0])

    receiver.on_body = on_body
    deletion = fake.deletions()[0]["id"]
    async with http.put(f"{fake.url}/api/recycle-bin/{deletion}", headers=auth(fake)) as resp:
        assert await resp.json() == {"restore_count": 1}
    assert seen == [404]
    assert "related_item" not in receiver.bodies[0]
    assert receiver.bodies[0]["url"].endswith(f"/settings/recycle-bin/{deletion}/restore")
    assert (await get(http, fake, f"/api/pages/{page}"))[0] == 200
    assert fake.state.activities[-1].detail == f"Deletion ({deletion}) for page ({page}) P"


async def test_restore_with_trashed_parent_restores_nothing(fake: FakeBookStack) -> None:
    book = await fake.create_book("Book")
    page = await fake.create_page(book_id=book, name="P", html="")
    await fake.delete_page(page)
    await fake.delete_book(book)
    page_deletion = fake.deletions()[0]["id"]
    assert await fake.recycle_bin_restore(page_deletion) == 0
    assert fake.state.pages[page].trashed
    assert [d["deletable_type"] for d in fake.deletions()] == ["book"]
    # Restoring the book brings back every trashed child, the separately deleted page too.
    assert await fake.recycle_bin_restore(fake.deletions()[0]["id"]) == 2
    assert not fake.state.pages[page].trashed


async def test_destroy_anonymises_history(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    book = await fake.create_book("Book")
    await fake.create_book("Bystander")
    shelf = await fake.create_shelf("Shelf", books=[book])
    page = await fake.create_page(book_id=book, name="Gone", html="")
    await fake.delete_book(book)
    cursor = last_activity_id(fake)
    count = await fake.recycle_bin_destroy(fake.deletions()[0]["id"])
    assert count == 2
    assert activities_after(fake, cursor) == ["recycle_bin_destroy"]
    rows = [a for a in fake.state.activities if a.type in ("page_create", "book_delete")]
    assert [(a.detail, a.loggable_id) for a in rows] == [("Gone", None), ("Book", None)]
    assert fake.state.shelves[shelf].books == []
    assert page not in fake.state.pages

    await fake.delete_book(2)
    cursor = last_activity_id(fake)
    await fake.recycle_bin_empty()
    assert activities_after(fake, cursor) == ["recycle_bin_empty"]
    assert fake.state.activities[-1].detail == ""
    assert fake.deletions() == []


async def test_zero_lifetime_clears_at_once(make_fake: FakeFactory) -> None:
    fake = await make_fake(recycle_bin_lifetime=0)
    book = await fake.create_book("Short lived")
    await fake.delete_book(book)
    assert book not in fake.state.books
    assert fake.state.activities[-1].type == "book_delete"
    assert fake.state.activities[-1].loggable_id is None


# ------------------------------------------------------------------ audit log
async def test_clear_activity_restarts_ids(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    await fake.create_book("One")
    await fake.create_book("Two")
    _, body, _ = await get(http, fake, "/api/audit-log?sort=-id")
    assert [r["id"] for r in body["data"]] == [2, 1]
    assert body["data"][0]["user"] == {"id": 1, "name": "Admin", "slug": "admin"}
    assert body["data"][0]["loggable_type"] == "book"
    assert body["data"][0]["detail"] == "(2) Two"
    fake.clear_activity()
    await fake.log_ignored_activity("auth_login", "standard; (1) Admin")
    _, body, _ = await get(http, fake, "/api/audit-log")
    assert [(r["id"], r["type"], r["loggable_id"]) for r in body["data"]] == [
        (1, "auth_login", None)
    ]


# ------------------------------------------------------------------- webhooks
async def test_webhook_bodies(fake: FakeBookStack, receiver: Receiver) -> None:
    hook = fake.add_webhook(receiver.url, name="mirror")
    book = await fake.create_book("Book")
    page = await fake.create_page(book_id=book, name="Page", html="<p>1</p>")
    await fake.update_page(page, html="<p>2</p>")
    user = await fake.create_user("Bob", "bob@example.com", [2])
    await fake.log_ignored_activity("settings_update", "features")

    bodies = {b["event"]: b for b in receiver.bodies}
    update = bodies["page_update"]
    assert set(update) == {
        "event",
        "text",
        "triggered_at",
        "triggered_by",
        "triggered_by_profile_url",
        "webhook_id",
        "webhook_name",
        "url",
        "related_item",
    }
    assert update["text"] == 'Admin updated page "Page"'
    assert (update["webhook_id"], update["webhook_name"]) == (hook, "mirror")
    assert update["triggered_by"] == {"id": 1, "name": "Admin", "slug": "admin"}
    assert update["url"] == f"{fake.url}/books/book/page/page"
    item = update["related_item"]
    assert set(item) == {
        "id",
        "book_id",
        "chapter_id",
        "name",
        "slug",
        "priority",
        "created_at",
        "updated_at",
        "created_by",
        "updated_by",
        "owned_by",
        "draft",
        "revision_count",
        "template",
        "editor",
        "current_revision",
    }
    assert item["owned_by"] == {"id": 1, "name": "Admin", "slug": "admin"}
    assert item["current_revision"]["revision_number"] == 2
    assert item["current_revision"]["type"] == "version"
    assert update["triggered_at"].endswith(".000000Z")

    assert "current_revision" not in bodies["book_create"]["related_item"]
    created = bodies["user_create"]
    assert "url" not in created
    assert created["related_item"] == {"id": user, "name": "Bob", "slug": "bob"}
    ignored = bodies["settings_update"]
    assert "related_item" not in ignored and "url" not in ignored


async def test_user_create_webhook_arrives_before_commit(
    fake: FakeBookStack, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    fake.add_webhook(receiver.url, events=["user_create", "role_delete"])
    seen: list[tuple[str, int, int]] = []

    async def on_body(body: Json) -> None:
        item_id = body["related_item"]["id"]
        path = "users" if body["event"] == "user_create" else "roles"
        status, _, _ = await get(http, fake, f"/api/{path}/{item_id}")
        _, log, _ = await get(http, fake, "/api/audit-log?sort=-id&count=1")
        seen.append((body["event"], status, len(log["data"])))

    receiver.on_body = on_body
    user = await fake.create_user("Early", "early@example.com")
    assert seen == [("user_create", 404, 0)]
    assert (await get(http, fake, f"/api/users/{user}"))[0] == 200

    role = await fake.create_role("Temp")
    await fake.update_user(user, roles=[role])
    await fake.delete_role(role, migrate_to=3)
    assert seen[-1][:2] == ("role_delete", 200)  # still there while the webhook is sent
    assert (await get(http, fake, f"/api/roles/{role}"))[0] == 404
    assert fake.state.users[user].roles == {3}


async def test_role_delete_migration_detaches_previous_members(fake: FakeBookStack) -> None:
    old = await fake.create_role("Old")
    target = await fake.create_role("Target")
    leaver = await fake.create_user("Leaver", "l@example.com", [old])
    stayer = await fake.create_user("Stayer", "s@example.com", [target])
    await fake.delete_role(old, migrate_to=target)
    assert fake.state.users[leaver].roles == {target}
    assert fake.state.users[stayer].roles == set()


async def test_webhook_timeout_is_swallowed(fake: FakeBookStack, receiver: Receiver) -> None:
    async def slow(body: Json) -> None:
        import asyncio

        await asyncio.sleep(1)

    receiver.on_body = slow
    fake.add_webhook(receiver.url, timeout=0.1)
    fake.add_webhook("http://127.0.0.1:9/unreachable")
    started = time.perf_counter()
    await fake.create_book("Book")
    assert time.perf_counter() - started < 0.9
    assert all(d.error for d in fake.webhook_deliveries)


# --------------------------------------------------------------------- faults
async def test_request_faults(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    fake.seed(pages=30, books=2, attachments=0, permission_share=0)
    fake.faults.outage = True
    assert (await get(http, fake, "/api/books"))[0] == 503
    fake.faults.outage = False

    fake.faults.error_rate = 1.0
    fake.faults.error_status = 502
    assert (await get(http, fake, "/api/books"))[0] == 502
    fake.faults.error_rate = 0.5
    statuses = [(await get(http, fake, "/api/books"))[0] for _ in range(20)]
    assert {200, 502} == set(statuses)
    fake.faults.error_rate = 0.0

    fake.faults.short_listings = {"/api/pages"}
    _, body, _ = await get(http, fake, "/api/pages?count=10")
    assert (len(body["data"]), body["total"]) == (9, 30)
    fake.faults.short_listings = set()
    fake.faults.fail_listings = {"/api/pages"}
    assert (await get(http, fake, "/api/pages"))[0] == 500
    assert (await get(http, fake, "/api/books"))[0] == 200
    fake.faults.fail_listings = set()

    # Permanent refusals, by route or by path, only once the token is accepted.
    fake.faults.error_routes = {"/api/pages/{id}": (422, "The given data was invalid.")}
    status, body, _ = await get(http, fake, "/api/pages/2")
    assert (status, body["error"]) == (422, {"message": "The given data was invalid.", "code": 422})
    assert (await get(http, fake, "/api/pages/2", auth(fake, "nope", "x")))[0] == 401
    fake.faults.error_routes = {"/api/pages/3": (400, "Bad request")}
    assert (await get(http, fake, "/api/pages/3"))[0] == 400
    assert (await get(http, fake, "/api/pages/2"))[0] == 200
    fake.faults.error_routes = {}

    assert fake.request_counts()["/api/books"] == 23
    assert [r.status for r in fake.requests if r.route == "/api/pages"] == [200, 500]
    assert [r.status for r in fake.requests if r.route == "/api/pages/{id}"] == [422, 401, 400, 200]
    fake.reset_requests()
    assert fake.requests == []


async def test_error_rate_is_deterministic(make_fake: FakeFactory) -> None:
    async def run() -> list[int]:
        fake = await make_fake()
        fake.faults = Faults(error_rate=0.5, seed=7)
        async with aiohttp.ClientSession() as http:
            return [(await get(http, fake, "/api/books"))[0] for _ in range(12)]

    assert await run() == await run()


async def test_webhook_faults(fake: FakeBookStack, receiver: Receiver) -> None:
    fake.add_webhook(receiver.url)
    fake.faults.webhook_drop = 1.0
    await fake.create_book("Dropped")
    assert receiver.bodies == []
    fake.faults.webhook_drop = 0.0
    fake.faults.webhook_duplicate = 1.0
    await fake.create_book("Twice")
    assert receiver.events() == ["book_create", "book_create"]
    fake.faults.webhook_duplicate = 0.0
    fake.faults.webhook_delay = 0.2
    await fake.create_book("Late")
    assert len(receiver.bodies) == 2
    await fake.drain_webhooks()
    assert len(receiver.bodies) == 3


# ---------------------------------------------------------------- HTTP writes
async def test_http_writes(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    headers = auth(fake)
    async with http.post(
        fake.url + "/api/books", json={"name": "Via API"}, headers=headers
    ) as resp:
        book = (await resp.json())["id"]
    other = await fake.create_book("Other")
    async with http.post(
        fake.url + "/api/pages",
        json={"book_id": book, "name": "P", "markdown": "hello"},
        headers=headers,
    ) as resp:
        page = await resp.json()
        assert (page["editor"], page["html"]) == ("markdown", "<p>hello</p>")
    cursor = last_activity_id(fake)
    async with http.put(
        f"{fake.url}/api/pages/{page['id']}", json={"book_id": other}, headers=headers
    ) as resp:
        assert (await resp.json())["book_id"] == other
    assert activities_after(fake, cursor) == ["page_move", "page_update"]
    async with http.post(fake.url + "/api/pages", json={"name": "x"}, headers=headers) as resp:
        assert resp.status == 422
    async with http.put(
        f"{fake.url}/api/content-permissions/book/{book}",
        json={"fallback_permissions": {"inheriting": False, "view": True}},
        headers=headers,
    ) as resp:
        assert (await resp.json())["fallback_permissions"]["inheriting"] is False
    async with http.delete(f"{fake.url}/api/books/{book}", headers=headers) as resp:
        assert resp.status == 204
    assert fake.state.activities[-1].type == "book_delete"
    assert fake.state.activities[-1].ip == "127.0.0.1"


# ---------------------------------------------------------- updated_at (Eloquent save)
async def test_updated_at_moves_only_when_a_column_changes(make_fake: FakeFactory) -> None:
    clock = Clock()
    fake = await make_fake(clock=clock)
    editor = await fake.create_user("Ed", "ed@example.com", [1])
    book = await fake.create_book("Book", "About")
    other = await fake.create_book("Other")
    shelf = await fake.create_shelf("Shelf", books=[book])
    created = fake.state.books[book].updated_at

    def stamp(entity: Any) -> datetime:
        return entity.updated_at  # type: ignore[no-any-return]

    clock.tick()
    cursor = last_activity_id(fake)
    await fake.update_shelf(shelf, books=[book, other])  # a pivot sync only
    assert stamp(fake.state.shelves[shelf]) == created
    assert activities_after(fake, cursor) == ["bookshelf_update"]
    await fake.update_book(book, name="Book", description="About")  # nothing dirty
    assert stamp(fake.state.books[book]) == created
    await fake.update_book(book, default_template_id=0)  # already none
    assert stamp(fake.state.books[book]) == created
    await fake.update_book(book, tags=[])  # tags given: touch()
    assert stamp(fake.state.books[book]) == clock.now
    clock.tick()
    await fake.update_book(book, acting_user_id=editor)  # updated_by is a column
    assert stamp(fake.state.books[book]) == clock.now
    clock.tick()
    await fake.update_book(book, description="New")
    assert stamp(fake.state.books[book]) == clock.now

    # Pages: PageRepo::update always saves revision_count, so updated_at always moves.
    page = await fake.create_page(book_id=book, name="P", html="<p>x</p>")
    clock.tick()
    await fake.update_page(page)
    assert stamp(fake.state.pages[page]) == clock.now

    user = await fake.create_user("Bob", "bob@example.com", [3])
    role = await fake.create_role("Role", ["page-view-all"])
    user_created = stamp(fake.state.users[user])
    role_created = stamp(fake.state.roles[role])
    clock.tick()
    await fake.update_user(user, roles=[2, role])  # UserRepo::setUserRoles: a pivot sync
    await fake.update_user(user, name="Bob", email="bob@example.com")
    assert stamp(fake.state.users[user]) == user_created
    await fake.update_role(role, permissions=["book-view-all"])  # a pivot sync
    await fake.update_role(role, display_name="Role")
    assert stamp(fake.state.roles[role]) == role_created
    assert fake.state.roles[role].permissions == {"book-view-all"}
    await fake.update_user(user, email="robert@example.com")
    await fake.update_role(role, description="changed")
    assert stamp(fake.state.users[user]) == clock.now
    assert stamp(fake.state.roles[role]) == clock.now


async def test_moves_and_sorts_bump_only_what_they_change(make_fake: FakeFactory) -> None:
    clock = Clock()
    fake = await make_fake(clock=clock)
    book = await fake.create_book("Book")
    chapter = await fake.create_chapter(book, "C")
    page = await fake.create_page(book_id=book, name="P", html="")
    stay = await fake.create_page(book_id=book, name="Stay", html="")
    clock.tick()
    await fake.move_page(page, chapter_id=chapter)  # same book, new chapter: saved
    assert fake.state.pages[page].updated_at == clock.now
    clock.tick()
    priority = fake.state.pages[stay].priority
    await fake.sort_book([("page", stay, book, None, priority)])  # no change: no save
    await fake.move_page(stay, book_id=book)  # changeBook to where it is: nothing dirty
    assert fake.state.pages[stay].updated_at != clock.now
    # book_sort follows the involved books' query order (ids), not the sort map's order.
    other = await fake.create_book("Other")
    cursor = last_activity_id(fake)
    await fake.sort_book([("page", stay, other, None, 3), ("page", page, book, chapter, 7)])
    logged = [a.loggable_id for a in fake.state.activities if a.id > cursor]
    assert logged == [book, other]


# ------------------------------------------------------------- link rewrites
async def test_link_rewrites_follow_stored_references(
    fake: FakeBookStack, http: aiohttp.ClientSession
) -> None:
    book = await fake.create_book("Book")
    target = await fake.create_page(book_id=book, name="Target", html="<p>t</p>")
    rel = "/books/book/page/target"
    old = fake.url + rel
    absolute = await fake.create_page(
        book_id=book,
        name="Absolute",
        html=f'<p>Read {old} or <a href="{old}#part">this</a> or <a href="{rel}">x</a></p>',
    )
    relative = await fake.create_page(
        book_id=book, name="Relative", html='<a href="/books/book/page/target">rel</a>'
    )
    markdown = await fake.create_page(
        book_id=book, name="Markdown", markdown=f"Go [there]({old}) or see {old}\n\n[ref]: {old}"
    )
    permalink = await fake.create_page(
        book_id=book, name="Permalink", html=f'<a href="{fake.url}/link/{target}">p</a>'
    )
    # A link that resolved to nothing when it was saved is no reference, even if it would now.
    early = await fake.create_page(
        book_id=book, name="Early", html=f'<a href="{fake.url}/books/book/page/later">l</a>'
    )
    later = await fake.create_page(book_id=book, name="Later", html="")
    pages = fake.state.pages
    counts = {p: pages[p].revision_count for p in (absolute, relative, markdown, permalink, early)}
    cursor = last_activity_id(fake)

    await fake.update_page(target, name="Renamed")
    await fake.update_page(later, name="Much Later")

    assert activities_after(fake, cursor) == ["page_update", "page_update"]
    new = f"{fake.url}/books/book/page/renamed"
    # Only the href of an <a> changes, with the rest of the href kept; text stays.
    assert pages[absolute].html == (
        f'<p>Read {old} or <a href="{new}#part">this</a> or <a href="{rel}">x</a></p>'
    )
    assert pages[markdown].markdown == f"Go [there]({new}) or see {old}\n\n[ref]: {new}"
    assert pages[permalink].html == f'<a href="{fake.url}/link/{target}">p</a>'
    assert pages[relative].html == '<a href="/books/book/page/target">rel</a>'
    assert pages[early].html == f'<a href="{fake.url}/books/book/page/later">l</a>'
    expected = {absolute: 1, relative: 0, markdown: 1, permalink: 1, early: 0}
    for page_id, bump in expected.items():
        assert pages[page_id].revision_count == counts[page_id] + bump, pages[page_id].name
    revision = pages[permalink].revisions[-1]
    assert (revision.summary, revision.created_by) == ("System auto-update of internal links", 1)
    _, body, _ = await get(http, fake, f"/api/pages/{absolute}")
    assert body["revision_count"] == counts[absolute] + 1


async def test_link_rewrites_reach_descriptions_and_book_children(make_fake: FakeFactory) -> None:
    clock = Clock()
    fake = await make_fake(clock=clock)
    book = await fake.create_book("Guide")
    page = await fake.create_page(book_id=book, name="Start", html="")
    link = f"{fake.url}/books/guide/page/start"
    shelf = await fake.create_shelf(
        "Shelf", description_html=f'<p>Begin <a href="{link}">here</a></p>'
    )
    chapter = await fake.create_chapter(
        book, "Intro", description_html=f'<p><a href="{fake.url}/books/guide">the guide</a></p>'
    )
    linking = await fake.create_page(book_id=book, name="Linking", html=f'<a href="{link}">s</a>')
    assert fake.state.shelves[shelf].description == "Begin here"
    before = fake.state.pages[linking].revision_count
    clock.tick()
    cursor = last_activity_id(fake)
    # A book rename rewrites links to the book and to everything in it.
    await fake.update_book(book, name="Manual")
    assert activities_after(fake, cursor) == ["book_update"]
    shelf_row = fake.state.shelves[shelf]
    assert shelf_row.description_html == (
        f'<p>Begin <a href="{fake.url}/books/manual/page/start">here</a></p>'
    )
    assert shelf_row.updated_at == clock.now
    assert fake.state.chapters[chapter].description_html == (
        f'<p><a href="{fake.url}/books/manual">the guide</a></p>'
    )
    assert fake.state.pages[linking].revision_count == before + 1
    assert fake.state.pages[page].updated_at != clock.now  # moved URL, but not saved


async def test_seeded_links_behave_like_stored_references(make_fake: FakeFactory) -> None:
    fake = await make_fake()
    fake.seed(pages=200, books=5, seed=2)
    pages = fake.state.pages

    def linking(prefix: str) -> list[tuple[int, int]]:
        """(linking page, target page) for seeded links written with `prefix`."""
        found = []
        for page in pages.values():
            for target in pages.values():
                if f'href="{prefix}{fake.state.path_of(target)}"' in page.html:
                    found.append((page.id, target.id))
        return found

    absolute, relative = linking(fake.url), linking("")
    assert absolute and relative
    source, target = absolute[0]
    before = pages[source].revision_count
    await fake.update_page(target, name="Completely renamed")
    assert f'href="{fake.state.url_of(pages[target])}"' in pages[source].html
    assert pages[source].revision_count == before + 1
    source, target = next((s, t) for s, t in relative if (s, t) not in absolute)
    before_html = pages[source].html
    await fake.update_page(target, name="Renamed as well")
    assert pages[source].html == before_html  # host-less: no reference, no rewrite


async def test_seeding_before_start_moves_links_to_the_app_url() -> None:
    fake = FakeBookStack()
    fake.seed(pages=60, books=3, seed=1)
    assert any('href="http://localhost/books/' in p.html for p in fake.state.pages.values())
    await fake.start()
    try:
        html = "".join(p.html for p in fake.state.pages.values())
        assert "http://localhost/" not in html
        assert f'href="{fake.url}/books/' in html
    finally:
        await fake.stop()


def test_link_helpers_rewrite_like_reference_updater() -> None:
    from eventsync.testing.links import anchor_hrefs, rewrite_hrefs, rewrite_markdown

    old, new = "http://app/books/x", "http://app/books/y"
    html = (
        "<A HREF='HTTP://APP/books/x/page/p?a=1&amp;b=2'>1</A>"
        "<a title=t href=http://app/books/x>2</a>"
        '<img src="http://app/books/x"><a data-href="http://app/books/x">3</a> http://app/books/x'
    )
    assert anchor_hrefs(html) == ["HTTP://APP/books/x/page/p?a=1&b=2", "http://app/books/x"]
    assert rewrite_hrefs(html, old, new) == (
        '<A HREF="http://app/books/y/page/p?a=1&amp;b=2">1</A>'
        '<a title=t href="http://app/books/y">2</a>'
        '<img src="http://app/books/x"><a data-href="http://app/books/x">3</a> http://app/books/x'
    )
    markdown = f"[a]({old}/page/p) {old} ![i]({old}.png)\n[r]: {old}/page/q\n`{old}`"
    assert rewrite_markdown(markdown, old, new) == (
        f"[a]({new}/page/p) {old} ![i]({new}.png)\n[r]: {new}/page/q\n`{old}`"
    )


# -------------------------------------------------------------- users, recycle bin
async def test_user_delete_migrates_live_items_and_bumps_them(make_fake: FakeFactory) -> None:
    clock = Clock()
    fake = await make_fake(clock=clock)
    leaver = await fake.create_user("Leaver", "l@example.com", [2])
    heir = await fake.create_user("Heir", "h@example.com", [2])
    book = await fake.create_book("Book", acting_user_id=leaver)
    live = await fake.create_page(book_id=book, name="Live", html="", acting_user_id=leaver)
    gone = await fake.create_page(book_id=book, name="Gone", html="", acting_user_id=leaver)
    await fake.delete_page(gone)
    clock.tick()
    cursor = last_activity_id(fake)
    await fake.delete_user(leaver, migrate_ownership_to=heir)
    assert activities_after(fake, cursor) == ["user_delete"]
    for entity in (fake.state.books[book], fake.state.pages[live]):
        assert (entity.owned_by, entity.updated_at) == (heir, clock.now)
    assert fake.state.pages[gone].owned_by == leaver  # the SoftDeletes scope skips it
    with pytest.raises(ValueError):
        await fake.delete_user(1)  # the only admin
    with pytest.raises(ValueError):
        await fake.delete_user(2)  # the guest


async def test_recycle_bin_listing_and_restore_timestamps(
    make_fake: FakeFactory, http: aiohttp.ClientSession
) -> None:
    clock = Clock()
    fake = await make_fake(clock=clock)
    book = await fake.create_book("Book")
    page = await fake.create_page(book_id=book, name="P", html="")
    await fake.delete_book(book)
    _, body, _ = await get(http, fake, "/api/recycle-bin")
    deletable = body["data"][0]["deletable"]
    assert "deleted_at" not in deletable
    assert deletable["pages_count"] == 1
    clock.tick()
    await fake.recycle_bin_restore(body["data"][0]["id"])
    assert fake.state.books[book].updated_at == clock.now
    assert fake.state.pages[page].updated_at == clock.now
    _, body, _ = await get(http, fake, f"/api/pages/{page}")
    assert body["updated_at"] == clock.now.strftime("%Y-%m-%dT%H:%M:%S.000000Z")


# ------------------------------------------------------- messages, shelves, conversions
async def test_not_found_messages(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    cases = {
        "/api/shelves/99": "Shelf not found",
        "/api/books/99": "Book not found",
        "/api/users/99": r"No query results for model [BookStack\Users\Models\User] 99",
        "/api/roles/99": r"No query results for model [BookStack\Users\Models\Role] 99",
        "/api/attachments/99": r"No query results for model [BookStack\Uploads\Attachment] 99",
        "/api/content-permissions/bookshelf/99": (
            r"No query results for model [BookStack\Entities\Models\Bookshelf] 99"
        ),
    }
    for path, message in cases.items():
        status, body, _ = await get(http, fake, path)
        assert (status, body["error"]["message"]) == (404, message), path
    status, body, _ = await get(http, fake, "/api/content-permissions/nonsense/1")
    assert (status, body["error"]["message"]) == (
        500,
        'Provided type "nonsense" is not a valid entity type',
    )
    async with http.put(f"{fake.url}/api/recycle-bin/99", headers=auth(fake)) as resp:
        body = await resp.json()
        assert (resp.status, body["error"]["message"]) == (
            404,
            r"No query results for model [BookStack\Entities\Models\Deletion] 99",
        )


async def test_copy_shelf_permissions_skips_trashed_books(fake: FakeBookStack) -> None:
    live = await fake.create_book("Live")
    trashed = await fake.create_book("Trashed")
    shelf = await fake.create_shelf("Shelf", books=[live, trashed])
    await fake.set_permissions("bookshelf", shelf, fallback={"view": False})
    await fake.delete_book(trashed)
    assert await fake.copy_shelf_permissions_to_books(shelf) == [live]
    assert ("book", live) in fake.state.entity_permissions
    assert ("book", trashed) not in fake.state.entity_permissions


async def test_book_to_shelf_takes_chapters_in_id_order(fake: FakeBookStack) -> None:
    book = await fake.create_book("Handbook")
    first = await fake.create_chapter(book, "First", description="one")
    second = await fake.create_chapter(book, "Second")
    # Sort the second chapter in front: $book->chapters still comes back in id order.
    await fake.sort_book([("chapter", second, book, None, 1), ("chapter", first, book, None, 9)])
    await fake.create_draft(book, "Draft", owner_id=1)  # a direct page, drafts count
    shelf = await fake.convert_book_to_shelf(book)
    names = [fake.state.books[b].name for b in fake.state.shelves[shelf].books]
    assert names == ["First", "Second", "Handbook Pages"]
    first_book = fake.state.books[fake.state.shelves[shelf].books[0]]
    assert (first_book.description, first_book.description_html) == ("one", "<p>one</p>")


async def test_small_bookstack_details(fake: FakeBookStack, http: aiohttp.ClientSession) -> None:
    book = await fake.create_book("Book")
    chapter = await fake.create_chapter(book, "C")
    await fake.create_page(book_id=book, name="Loose", html="")
    # PageRepo::getNewPriority: after the chapter's last page, the new draft itself counted.
    first = await fake.create_page(chapter_id=chapter, name="First", html="")
    second = await fake.create_page(chapter_id=chapter, name="Second", html="")
    assert (fake.state.pages[first].priority, fake.state.pages[second].priority) == (1, 2)
    # Empty markdown does not win over html.
    await fake.update_page(first, html="<p>kept</p>", markdown="")
    assert (fake.state.pages[first].html, fake.state.pages[first].editor) == (
        "<p>kept</p>",
        "wysiwyg",
    )
    # descriptionHtml() always wraps the text, even an empty one.
    _, body, _ = await get(http, fake, f"/api/books/{book}")
    assert body["description_html"] == "<p></p>"
    # Unknown permission names are dropped (RolePermission lookup by name).
    role = await fake.create_role("R", ["page-view-all", "made-up"])
    assert fake.state.roles[role].permissions == {"page-view-all"}
    # priority is fillable on pages: given, it wins over the computed one.
    async with http.post(
        fake.url + "/api/pages",
        json={"chapter_id": chapter, "name": "Placed", "html": "", "priority": 9},
        headers=auth(fake),
    ) as resp:
        assert (await resp.json())["priority"] == 9
    # An attachment update sets no updated_by and saves only what changed.
    editor = await fake.create_user("Ed", "ed@example.com", [1])
    attachment = await fake.create_attachment(first, "a", link="https://example.com")
    stamp = fake.state.attachments[attachment].updated_at
    await fake.update_attachment(attachment, name="b", acting_user_id=editor)
    assert fake.state.attachments[attachment].updated_by == 1
    fake.state.attachments[attachment].updated_at = stamp - timedelta(days=1)
    await fake.update_attachment(attachment, name="b")
    assert fake.state.attachments[attachment].updated_at == stamp - timedelta(days=1)
    # updateOwnerFromId ignores a user that does not exist.
    async with http.put(
        f"{fake.url}/api/content-permissions/book/{book}",
        json={"owner_id": 999},
        headers=auth(fake),
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["owner"]["id"] == 1


# ---------------------------------------------------------------------- truth
async def test_truth_shape_and_seed_determinism(make_fake: FakeFactory) -> None:
    first = await make_fake()
    first.seed(pages=120, seed=3)
    truth = first.truth()
    assert set(truth) == {
        "shelves",
        "books",
        "chapters",
        "pages",
        "attachments",
        "users",
        "roles",
        "permissions",
    }
    expected_keys = {
        "shelves": {"id", "name", "slug", "description", "books", "tags"},
        "books": {"id", "name", "slug", "description", "sort_rule_id", "tags"},
        "chapters": {"id", "book_id", "name", "slug", "description", "priority", "tags"},
        "pages": {
            "id",
            "book_id",
            "chapter_id",
            "name",
            "slug",
            "priority",
            "draft",
            "template",
            "revision_count",
            "raw_html",
            "html",
            "markdown",
            "updated_at",
            "tags",
        },
        "attachments": {
            "id",
            "name",
            "extension",
            "uploaded_to",
            "external",
            "order",
            "updated_at",
        },
        "users": {"id", "name", "slug", "email", "roles"},
        "roles": {"id", "display_name", "description", "permissions", "users"},
        "permissions": {
            "content_type",
            "content_id",
            "owner_id",
            "inheriting",
            "fallback",
            "role_permissions",
        },
    }
    for section, keys in expected_keys.items():
        assert truth[section], section
        assert set(truth[section][0]) == keys, section
        if section != "permissions":
            ids = [row["id"] for row in truth[section]]
            assert ids == sorted(ids), section
    assert any(p["chapter_id"] is None for p in truth["pages"])
    assert any(p["html"] != p["raw_html"] for p in truth["pages"])  # includes rendered
    assert any(t["tags"] for t in truth["pages"])
    assert any(a["external"] for a in truth["attachments"])
    assert set(truth["permissions"][0]["fallback"]) == {"view", "create", "update", "delete"}

    # Seeded links are absolute URLs to the app, so they carry each fake's port.
    def portless(fake: FakeBookStack) -> Any:
        return json.loads(json.dumps(fake.truth()).replace(fake.url, "http://app"))

    html = "".join(p["raw_html"] for p in truth["pages"])
    assert f'href="{first.url}/books/' in html  # rewritable links
    assert 'href="/books/' in html  # and host-less ones BookStack leaves alone
    second = await make_fake()
    second.seed(pages=120, seed=3)
    assert portless(second) == portless(first)
    third = await make_fake()
    third.seed(pages=120, seed=4)
    assert portless(third) != portless(first)
    assert first.state.activities == []
