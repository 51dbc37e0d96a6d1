"""Webhook bodies and audit-log rows → Events: keys, hints and rejections (pure parsing).

Every body and row here is a real one: produced by the fake BookStack for a real mutation, then
handed to `from_webhook` / `from_audit`. Only the malformed bodies are written by hand.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from eventsync.bookstack.client import BookStackClient
from eventsync.events import (
    DEFAULT_PERMISSIONS,
    EXPECT_GONE,
    EXPECT_PRESENT,
    FETCH,
    IGNORED,
    MOVE,
    PERMISSIONS,
    RESOLVE_DESTROY,
    RESOLVE_RESTORE,
    ROLES_REFRESH,
    SORT,
    SUBTREE,
    BadEvent,
    Event,
    from_audit,
    from_webhook,
)
from eventsync.testing import FakeBookStack

RPM = 100_000
Mutation = Callable[[FakeBookStack], Awaitable[Any]]
FakeFactory = Callable[..., Awaitable[FakeBookStack]]


@pytest.fixture
async def make_fake() -> AsyncIterator[FakeFactory]:
    """Factory: a started, seeded fake whose webhooks go to a path it answers 404 to (every
    body is still recorded in `fake.webhook_deliveries`, exactly as it was POSTed)."""
    fakes: list[FakeBookStack] = []

    async def make(**seed: Any) -> FakeBookStack:
        fake = FakeBookStack(requests_per_minute=RPM)
        await fake.start()
        fakes.append(fake)
        fake.seed(**{"pages": 12, "books": 3, "shelves": 2, "seed": 5, **seed})
        fake.add_webhook(f"{fake.url}/webhook-sink")
        return fake

    yield make
    for fake in fakes:
        await fake.stop()


async def bodies_of(fake: FakeBookStack, mutate: Mutation) -> list[dict[str, Any]]:
    """The webhook bodies BookStack sent for one mutation, in order."""
    before = len(fake.webhook_deliveries)
    await mutate(fake)
    await fake.drain_webhooks()
    return [copy.deepcopy(d.body) for d in fake.webhook_deliveries[before:]]


async def body_of(fake: FakeBookStack, mutate: Mutation, event: str) -> dict[str, Any]:
    matching = [b for b in await bodies_of(fake, mutate) if b["event"] == event]
    assert len(matching) == 1, f"expected one {event} webhook, got {len(matching)}"
    return matching[0]


async def audit_rows(fake: FakeBookStack) -> list[dict[str, Any]]:
    """The fake's audit log, read through the real API client."""
    async with BookStackClient(
        fake.url, fake.token_id, fake.token_secret, requests_per_minute=RPM
    ) as client:
        return [row async for row in client.audit_log_after(0)]


def deletion_id_of(fake: FakeBookStack, deletable_type: str, deletable_id: int) -> int:
    for row in fake.deletions():
        if row["deletable_type"] == deletable_type and row["deletable_id"] == deletable_id:
            return int(row["id"])
    raise AssertionError(f"no deletion for {deletable_type} {deletable_id}")


# ---- from_webhook: content ----------------------------------------------------------------


async def test_page_create_webhook_keys_the_new_page_and_its_default_permissions(
    make_fake: FakeFactory,
) -> None:
    fake = await make_fake()
    created: list[int] = []

    async def create(f: FakeBookStack) -> None:
        created.append(await f.create_page(book_id=1, name="Fresh page", html="<p>hi</p>"))

    body = await body_of(fake, create, "page_create")
    event = from_webhook(body)

    assert event.source == "webhook"
    assert event.type == "page_create"
    assert event.key == f"page:{created[0]}"
    # A created page has no permission rows of its own (BookStack sets none on create, copies
    # included): they are written as the default, not read.
    assert event.hints == {FETCH, DEFAULT_PERMISSIONS}
    assert not event.ignored
    expected_at = datetime.fromisoformat(body["triggered_at"].replace("Z", "+00:00"))
    assert event.at == expected_at.timestamp()
    assert event.activity_id is None  # webhooks carry no activity id (FACTS 1.4)
    assert event.payload == body


CONTENT_CASES: list[tuple[str, Mutation, str, frozenset[str]]] = [
    ("page_update", lambda f: f.update_page(2, html="<p>new</p>"), "page:2", frozenset({FETCH})),
    ("page_move", lambda f: f.move_page(2, book_id=3), "page:2", frozenset({FETCH})),
    ("page_delete", lambda f: f.delete_page(2), "page:2", frozenset({FETCH})),
    ("chapter_update", lambda f: f.update_chapter(1, name="Ch"), "chapter:1", frozenset({FETCH})),
    ("chapter_move", lambda f: f.move_chapter(1, 3), "chapter:1", frozenset({FETCH, MOVE})),
    ("chapter_delete", lambda f: f.delete_chapter(1), "chapter:1", frozenset({FETCH})),
    ("book_update", lambda f: f.update_book(2, name="B2"), "book:2", frozenset({FETCH})),
    ("book_delete", lambda f: f.delete_book(2), "book:2", frozenset({FETCH})),
    (
        "book_sort",
        lambda f: f.sort_book([("page", 2, 3, None, 9)]),
        "book:3",
        frozenset({FETCH, SORT}),
    ),
    ("bookshelf_update", lambda f: f.update_shelf(1, name="S"), "shelf:1", frozenset({FETCH})),
    ("bookshelf_delete", lambda f: f.delete_shelf(1), "shelf:1", frozenset({FETCH})),
]


@pytest.mark.parametrize(
    ("event_type", "mutate", "key", "hints"),
    CONTENT_CASES,
    ids=[c[0] for c in CONTENT_CASES],
)
async def test_content_webhooks_key_their_entity(
    make_fake: FakeFactory,
    event_type: str,
    mutate: Mutation,
    key: str,
    hints: frozenset[str],
) -> None:
    fake = await make_fake()
    bodies = [b for b in await bodies_of(fake, mutate) if b["event"] == event_type]
    assert bodies, f"the fake sent no {event_type}"
    events = [from_webhook(b) for b in bodies]
    assert key in {e.key for e in events}
    for event in events:
        assert event.hints == hints


async def test_creates_and_conversions_key_the_new_item(make_fake: FakeFactory) -> None:
    fake = await make_fake()
    ids: dict[str, int] = {}

    async def create_all(f: FakeBookStack) -> None:
        ids["book"] = await f.create_book("New book")
        ids["chapter"] = await f.create_chapter(ids["book"], "New chapter")
        ids["shelf"] = await f.create_shelf("New shelf", books=[ids["book"]])
        ids["converted"] = await f.convert_chapter_to_book(ids["chapter"])

    events = [from_webhook(b) for b in await bodies_of(fake, create_all)]
    by_type = {e.type: e for e in events}
    assert by_type["book_create_from_chapter"].key == f"book:{ids['converted']}"
    assert by_type["book_create_from_chapter"].hints == {FETCH, PERMISSIONS, SUBTREE}
    assert by_type["chapter_create"].key == f"chapter:{ids['chapter']}"
    assert by_type["bookshelf_create"].key == f"shelf:{ids['shelf']}"
    assert f"book:{ids['book']}" in {e.key for e in events if e.type == "book_create"}
    for event in events:
        if event.type.endswith("_create"):
            assert event.hints == {FETCH, DEFAULT_PERMISSIONS}, event


async def test_book_to_shelf_conversion_keys_the_new_shelf(make_fake: FakeFactory) -> None:
    fake = await make_fake()
    shelves: list[int] = []

    async def convert(f: FakeBookStack) -> None:
        shelves.append(await f.convert_book_to_shelf(1))

    body = await body_of(fake, convert, "bookshelf_create_from_book")
    event = from_webhook(body)
    assert event.key == f"shelf:{shelves[0]}"
    assert event.hints == {FETCH, PERMISSIONS, SUBTREE}


@pytest.mark.parametrize(
    ("content_type", "content_id", "kind"),
    [
        ("page", 4, "page"),
        ("chapter", 2, "chapter"),
        ("book", 2, "book"),
        ("bookshelf", 1, "shelf"),
    ],
)
@pytest.mark.parametrize("with_url", [True, False], ids=["url", "shape-only"])
async def test_permissions_update_names_the_right_kind(
    make_fake: FakeFactory, content_type: str, content_id: int, kind: str, with_url: bool
) -> None:
    fake = await make_fake()

    async def restrict(f: FakeBookStack) -> None:
        await f.set_permissions(
            content_type,
            content_id,
            fallback={"view": False, "create": False, "update": False, "delete": False},
        )

    body = await body_of(fake, restrict, "permissions_update")
    if not with_url:
        # The URL decides; without one the related_item's shape is the fallback.
        del body["url"]
    event = from_webhook(body)
    assert event.key == f"{kind}:{content_id}"
    assert event.hints == {PERMISSIONS}


async def test_revision_restore_keys_the_page_not_the_revision(make_fake: FakeFactory) -> None:
    fake = await make_fake()
    await fake.update_page(7, html="<p>second version</p>")
    await fake.update_page(7, html="<p>third version</p>")  # restore the second: a new id
    body = await body_of(fake, lambda f: f.restore_revision(7), "revision_restore")
    revision_id = body["related_item"]["id"]
    assert revision_id != 7, "pick a page whose revision id differs, or this proves nothing"
    event = from_webhook(body)
    assert event.key == "page:7"
    assert event.hints == {FETCH}


@pytest.mark.parametrize(
    ("event_type", "hint"),
    [("recycle_bin_restore", RESOLVE_RESTORE), ("recycle_bin_destroy", RESOLVE_DESTROY)],
)
async def test_recycle_bin_webhooks_key_the_deletion_from_the_url(
    make_fake: FakeFactory, event_type: str, hint: str
) -> None:
    fake = await make_fake()
    await fake.delete_page(3)
    await fake.delete_book(2)  # a second deletion, so the id is not simply 1
    deletion = deletion_id_of(fake, "book", 2)
    assert deletion != 1

    async def act(f: FakeBookStack) -> None:
        if event_type == "recycle_bin_restore":
            await f.recycle_bin_restore(deletion)
        else:
            await f.recycle_bin_destroy(deletion)

    body = await body_of(fake, act, event_type)
    assert "related_item" not in body  # Deletion is not a BookStack Model (FACTS 1.3)
    event = from_webhook(body)
    assert event.key == f"deletion:{deletion}"
    assert event.hints == {hint}


# ---- from_webhook: users and roles --------------------------------------------------------


async def test_user_and_role_webhooks_key_by_related_item(make_fake: FakeFactory) -> None:
    fake = await make_fake()
    ids: dict[str, int] = {}

    async def admin(f: FakeBookStack) -> None:
        ids["user"] = await f.create_user("Quinn", "quinn@example.com", roles=[2])
        await f.update_user(ids["user"], roles=[3])
        ids["role"] = await f.create_role("Temp role", ["page-view-all"])
        await f.update_role(ids["role"], description="changed")
        await f.delete_role(ids["role"], migrate_to=2)
        await f.delete_user(ids["user"])

    events = [from_webhook(b) for b in await bodies_of(fake, admin)]
    got = [(e.type, e.key, e.hints) for e in events]
    user, role = f"user:{ids['user']}", f"role:{ids['role']}"
    assert got == [
        ("user_create", user, {FETCH, EXPECT_PRESENT}),
        ("user_update", user, {FETCH}),
        ("role_create", role, {FETCH, EXPECT_PRESENT}),
        ("role_update", role, {FETCH}),
        ("role_delete", role, {FETCH, EXPECT_GONE, ROLES_REFRESH}),
        ("user_delete", user, {FETCH}),
    ]


# ---- from_webhook: ignored and rejected ---------------------------------------------------


async def test_ignored_and_unknown_types_are_accepted_with_no_key(make_fake: FakeFactory) -> None:
    fake = await make_fake()
    body = await body_of(
        fake, lambda f: f.log_ignored_activity("auth_login", "standard; (1) Admin"), "auth_login"
    )
    login = from_webhook(body)
    assert login.key is None and login.ignored and login.hints == frozenset()

    # BookStack adds activity types over time: a new one is not an error.
    future = from_webhook({**body, "event": "some_future_event", "related_item": {"id": 3}})
    assert future.key is None and future.ignored
    assert future.type == "some_future_event"


@pytest.mark.parametrize(
    "raw",
    [
        [],
        [{"event": "page_update"}],
        "page_update",
        42,
        None,
        {},
        {"text": "Admin updated page"},
        {"event": None},
        {"event": 5},
        {"event": ["page_update"]},
        {"event": {"type": "page_update"}},
        {"event": ""},
        {"event": "x" * 101},
    ],
    ids=lambda raw: repr(raw)[:30],
)
def test_bodies_that_are_not_webhooks_are_bad_events(raw: Any) -> None:
    with pytest.raises(BadEvent):
        from_webhook(raw)


@pytest.mark.parametrize(
    "raw",
    [
        {"event": "page_update"},
        {"event": "page_update", "related_item": {"name": "no id"}},
        {"event": "page_update", "related_item": {"id": "12"}},
        {"event": "page_update", "related_item": [12]},
        {"event": "revision_restore", "related_item": {"id": 3}},
        {"event": "recycle_bin_restore", "url": "http://wiki/settings/recycle-bin/x/restore"},
        {"event": "permissions_update", "related_item": {"id": 3}},
    ],
    ids=lambda raw: repr(raw)[:40],
)
def test_routed_events_that_name_no_item_are_bad_events(raw: dict[str, Any]) -> None:
    with pytest.raises(BadEvent):
        from_webhook(raw)


@pytest.mark.parametrize(
    "raw",
    [
        # `True` is an int to Python: it became the key "page:True", a job that crashes on
        # every attempt until it is dead-lettered.
        {"event": "page_update", "related_item": {"id": True}},
        {"event": "revision_restore", "related_item": {"id": 3, "page_id": True}},
        # Beyond SQLite's 64-bit INTEGER: the inbox commit raised OverflowError (a 500).
        {
            "event": "page_update",
            "triggered_at": "2024-10-15T10:00:00.000000Z",
            "related_item": {"id": 2**64},
        },
    ],
    ids=["bool-id", "bool-page-id", "id-over-64-bits"],
)
def test_item_ids_must_be_real_ids(raw: dict[str, Any]) -> None:
    """A webhook is untrusted input: only a 64-bit integer (not a bool) can be an id."""
    with pytest.raises(BadEvent):
        from_webhook(raw)


def test_unparseable_trigger_time_is_no_time_not_an_error() -> None:
    event = from_webhook(
        {"event": "page_update", "triggered_at": "yesterday", "related_item": {"id": 4}}
    )
    assert event.key == "page:4"
    assert event.at is None


# ---- from_audit ---------------------------------------------------------------------------


async def test_audit_rows_of_content_key_by_loggable(make_fake: FakeFactory) -> None:
    fake = await make_fake()
    await fake.update_page(2, html="<p>x</p>")
    await fake.update_chapter(1, name="Renamed chapter")
    await fake.update_book(3, name="Renamed book")
    await fake.update_shelf(2, name="Renamed shelf")
    await fake.move_chapter(1, 2)
    await fake.set_permissions(
        "bookshelf", 1, fallback={"view": True, "create": False, "update": False, "delete": False}
    )
    rows = await audit_rows(fake)
    events = [from_audit(r) for r in rows]

    assert [(e.type, e.key) for e in events] == [
        ("page_update", "page:2"),
        ("chapter_update", "chapter:1"),
        ("book_update", "book:3"),
        ("bookshelf_update", "shelf:2"),
        ("chapter_move", "chapter:1"),
        ("permissions_update", "shelf:1"),
    ]
    for row, event in zip(rows, events, strict=True):
        assert event.source == "audit"
        assert event.activity_id == row["id"]
        expected = datetime.fromisoformat(row["created_at"].replace("Z", "+00:00"))
        assert event.at == expected.astimezone(UTC).timestamp()
    assert events[4].hints == {FETCH, MOVE}
    assert events[5].hints == {PERMISSIONS}


async def test_audit_rows_of_users_and_roles_key_by_detail(make_fake: FakeFactory) -> None:
    fake = await make_fake()
    user = await fake.create_user("Robin (the second)", "robin@example.com", roles=[2])
    role = await fake.create_role("(7) tricky name")
    await fake.update_user(user, roles=[role])
    await fake.delete_role(role, migrate_to=3)
    await fake.delete_user(user)
    rows = await audit_rows(fake)
    assert rows[0]["detail"].startswith(f"({user}) ")
    events = [from_audit(r) for r in rows]

    assert [(e.type, e.key) for e in events] == [
        ("user_create", f"user:{user}"),
        ("role_create", f"role:{role}"),
        ("user_update", f"user:{user}"),
        ("role_delete", f"role:{role}"),
        ("user_delete", f"user:{user}"),
    ]
    assert events[0].hints == {FETCH, EXPECT_PRESENT}
    assert events[3].hints == {FETCH, EXPECT_GONE, ROLES_REFRESH}


async def test_audit_revision_restore_keys_the_page(make_fake: FakeFactory) -> None:
    fake = await make_fake()
    await fake.update_page(5, html="<p>v2</p>")
    await fake.restore_revision(5)
    rows = await audit_rows(fake)
    restore = next(r for r in rows if r["type"] == "revision_restore")
    assert restore["loggable_id"] is None  # a revision is not loggable: the detail says it
    event = from_audit(restore)
    assert event.key == "page:5"
    assert event.hints == {FETCH}


async def test_audit_recycle_bin_rows_key_the_deletion_and_name_the_entity(
    make_fake: FakeFactory,
) -> None:
    fake = await make_fake()
    await fake.delete_book(2)
    await fake.delete_shelf(1)
    book_deletion = deletion_id_of(fake, "book", 2)
    shelf_deletion = deletion_id_of(fake, "bookshelf", 1)
    await fake.recycle_bin_restore(book_deletion)
    await fake.recycle_bin_destroy(shelf_deletion)
    rows = {r["type"]: r for r in await audit_rows(fake)}

    restore = rows["recycle_bin_restore"]
    assert restore["detail"].startswith(f"Deletion ({book_deletion}) for book (2) ")
    event = from_audit(restore)
    assert event.key == f"deletion:{book_deletion}"
    assert event.payload["entity"] == "book:2"
    assert event.hints == {RESOLVE_RESTORE}

    destroy = from_audit(rows["recycle_bin_destroy"])
    assert destroy.key == f"deletion:{shelf_deletion}"
    assert destroy.payload["entity"] == "shelf:1"  # BookStack's "bookshelf" is our "shelf"
    assert destroy.hints == {RESOLVE_DESTROY}


async def test_audit_rows_anonymised_by_a_permanent_delete_name_nothing(
    make_fake: FakeFactory,
) -> None:
    fake = await make_fake()
    await fake.update_page(6, html="<p>edited</p>")
    await fake.delete_page(6)
    await fake.recycle_bin_destroy(deletion_id_of(fake, "page", 6))
    rows = await audit_rows(fake)
    anonymised = [r for r in rows if r["type"] in ("page_update", "page_delete")]
    assert len(anonymised) == 2
    for row in anonymised:
        assert row["loggable_id"] is None and not row["detail"].startswith("(")
        event = from_audit(row)
        assert event.key is None and event.ignored
        assert event.hints == frozenset()
        assert event.activity_id == row["id"]  # still deduped by id


async def test_audit_rows_of_ignored_and_unknown_types_name_nothing(
    make_fake: FakeFactory,
) -> None:
    fake = await make_fake()
    await fake.log_ignored_activity("auth_login", "standard; (1) Admin")
    await fake.log_ignored_activity("settings_update", "features")
    await fake.log_ignored_activity("brand_new_type", "(3) something")
    events = [from_audit(r) for r in await audit_rows(fake)]
    assert [e.type for e in events] == ["auth_login", "settings_update", "brand_new_type"]
    for event in events:
        # auth_login's detail holds "(1) Admin": an ignored type must not parse it as a user.
        assert event.key is None and event.ignored


@pytest.mark.parametrize(
    "row",
    [
        {},
        {"id": "7", "type": "page_update", "loggable_type": "page", "loggable_id": "3"},
        {"id": 7, "type": "user_update", "detail": "no id here"},
        {"id": 7, "type": "recycle_bin_restore", "detail": "Deletion"},
        {"id": 7, "type": "page_update", "loggable_type": "comment", "loggable_id": 3},
    ],
    ids=["empty", "string-ids", "user-without-id", "bare-deletion", "unknown-loggable"],
)
def test_odd_audit_rows_name_nothing_instead_of_failing(row: dict[str, Any]) -> None:
    event = from_audit(row)
    assert event.key is None


# ---- both sources agree -------------------------------------------------------------------


async def test_webhook_and_audit_row_of_each_change_agree_on_type_and_key(
    make_fake: FakeFactory,
) -> None:
    """Pairing (one fetch per change) relies on both sources naming the same entity."""
    fake = await make_fake()

    async def everything(f: FakeBookStack) -> None:
        page = await f.create_page(chapter_id=1, name="Pair me", html="<p>a</p>")
        await f.update_page(page, html="<p>b</p>")
        await f.restore_revision(page)
        await f.move_page(page, book_id=3)
        await f.move_chapter(2, 3)
        await f.sort_book([("page", 2, 3, None, 4)])
        await f.set_permissions("chapter", 1, owner_id=1)
        await f.update_book(1, name="Book one")
        await f.update_shelf(1, books=[1, 2])
        user = await f.create_user("Pat", "pat@example.com", roles=[3])
        await f.update_user(user, name="Patricia")
        role = await f.create_role("Pair role")
        await f.delete_role(role)
        await f.delete_book(3)
        await f.recycle_bin_restore(deletion_id_of(f, "book", 3))
        await f.delete_page(page)

    hooks = [from_webhook(b) for b in await bodies_of(fake, everything)]
    audits = [from_audit(r) for r in await audit_rows(fake)]
    assert len(hooks) == len(audits) > 15

    def pairs(events: list[Event]) -> list[tuple[str, str | None]]:
        return [(e.type, e.key) for e in events]

    assert pairs(hooks) == pairs(audits)
    for hook, audit in zip(hooks, audits, strict=True):
        assert hook.hints == audit.hints, hook.type
        assert hook.at is not None and audit.at is not None
        assert abs(hook.at - audit.at) <= 2.0  # queue.PAIR_WINDOW


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        # A registration by password: the detail is the User.
        ({"event": "auth_register", "related_item": {"id": 7, "name": "A", "slug": "a"}}, 7),
        # A social registration: the detail is the SocialAccount, whose own id is not the
        # user's (FACTS 1.2, SocialAccount descriptor).
        (
            {
                "event": "auth_register",
                "related_item": {"id": 12, "user_id": 7, "driver": "github", "driver_id": "9"},
            },
            7,
        ),
    ],
    ids=["user", "social-account"],
)
def test_auth_register_keys_the_registered_user(raw: dict[str, Any], key: int) -> None:
    event = from_webhook(raw)
    assert event.key == f"user:{key}"
    assert EXPECT_PRESENT in event.hints


@pytest.mark.parametrize("detail", ["(7) Alice", "github; (7) Alice", "azure-ad; (7) Alice"])
def test_audit_auth_register_keys_the_user_from_either_descriptor(detail: str) -> None:
    event = from_audit({"id": 9, "type": "auth_register", "detail": detail})
    assert event.key == "user:7"


# ---- the real samples of a BookStack v25.02.4 ----------------------------------------------

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "bookstack" / "real-v25.02.4"


def _real(folder: str) -> list[Path]:
    files = sorted((REAL / folder).glob("*.json"))
    assert files, f"the real samples are missing: {REAL / folder}"
    return files


@pytest.mark.parametrize("path", _real("webhooks"), ids=lambda p: p.stem)
def test_every_real_webhook_body_parses_to_its_item(path: Path) -> None:
    """Each real webhook body either names the item its route says, or is ignored on purpose."""
    raw = json.loads(path.read_text())
    event = from_webhook(raw, path.read_text())
    assert event.type == path.stem
    if path.stem in IGNORED or path.stem == "sort_rule_create":
        assert event.ignored
        return
    assert event.key is not None, raw
    kind, _, item_id = event.key.partition(":")
    if kind == "sort_rule":
        assert raw["url"].endswith(f"/settings/sorting/rules/{item_id}")
    elif kind == "deletion":
        assert f"/settings/recycle-bin/{item_id}" in raw["url"]
    elif path.stem == "revision_restore":
        assert int(item_id) == raw["related_item"]["page_id"]
    else:
        assert int(item_id) == raw["related_item"]["id"]


@pytest.mark.parametrize("path", _real("audit"), ids=lambda p: p.stem)
def test_every_real_audit_row_parses_to_its_item(path: Path) -> None:
    row = json.loads(path.read_text())
    event = from_audit(row)
    assert event.type == path.stem and event.activity_id == row["id"]
    if path.stem in IGNORED or path.stem == "sort_rule_create":
        assert event.ignored
        return
    assert event.key is not None, row
    kind, _, item_id = event.key.partition(":")
    if row["loggable_id"] is not None:
        assert int(item_id) == row["loggable_id"]
    elif kind == "page":  # a revision restore names its page in the detail
        assert f"page ID {item_id}" in row["detail"]
    elif kind == "deletion":
        assert row["detail"].startswith(f"Deletion ({item_id})")
    else:
        assert row["detail"].startswith(f"({item_id}) ")
    if path.stem == "sort_rule_update":
        assert SORT in event.hints  # its books are re-sorted silently
