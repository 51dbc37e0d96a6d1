"""The access tables kept by the store itself, on a real database file: each kind of input
change recomputes what it must (and only that), in the same transaction, with the change
feed's `access` rows naming exactly the users who gained or lost sight of an item.

A small wiki is written through the store's own Tx methods, as the handlers write it:

    roles   1 Admin (admin)   2 Viewers (view-all everywhere)   3 Owners (page-view-own)
            4 Editors (nothing)
    users   1: Admin   10: Viewers   11: Owners   12: Editors   13: Viewers + Editors
    book 1 ─ chapter 1 ─ page 1 (owner 11)      book 2 ─ page 3 (owner 11)
           └ page 2 (owner 11, directly in the book)           shelf 1
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventsync import access as rules
from eventsync.store.mirror import Store, Tx

T0 = 1_700_000_000.0
VIEW_ALL = [f"{t}-view-all" for t in rules.CONTENT_TYPES]
ROLES = {
    1: ("Admin", "admin", [*VIEW_ALL, "access-api", "users-manage", "user-roles-manage"]),
    2: ("Viewers", "", VIEW_ALL),
    3: ("Owners", "", ["page-view-own"]),
    4: ("Editors", "", []),
}
USERS = {1: [1], 10: [2], 11: [3], 12: [4], 13: [2, 4]}
DENY = {"view": False, "create": False, "update": False, "delete": False}
ALLOW = {"view": True, "create": False, "update": False, "delete": False}


def role_row(role_id: int, permissions: list[str] | None = None) -> dict[str, Any]:
    name, system_name, perms = ROLES[role_id]
    return {
        "id": role_id,
        "display_name": name,
        "description": "",
        "system_name": system_name,
        "external_auth_id": "",
        "mfa_enforced": False,
        "permissions": sorted(perms if permissions is None else permissions),
    }


def content(kind: str, item_id: int, owner: int = 1, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"id": item_id, "name": f"{kind} {item_id}", "slug": f"{kind}-{item_id}"}
    row.update({"description": "", "priority": 0, "draft": False, "template": False})
    row.update({"revision_count": 1, "updated_at": "2024-10-15T10:00:00.000000Z"})
    row.update({"owned_by": owner, "created_by": owner, "updated_by": owner, "tags": []})
    row.update(fields)
    return row


def perms(owner: int, fallback: dict[str, bool] | None = None, **roles: dict[str, bool]) -> Any:
    return {
        "owner_id": owner,
        "inheriting": fallback is None,
        "fallback": fallback or {},
        "role_permissions": [{"role_id": int(r[1:]), **v} for r, v in roles.items()],
    }


async def write_wiki(tx: Tx) -> None:
    for role_id in ROLES:
        await tx.upsert("role", role_row(role_id), T0)
    for user_id, roles in USERS.items():
        await tx.upsert("user", {"id": user_id, "name": f"U{user_id}", "slug": f"u{user_id}"}, T0)
        await tx.set_user_roles(user_id, roles, T0)
    await tx.upsert("shelf", content("shelf", 1), T0)
    for book_id in (1, 2):
        await tx.upsert("book", content("book", book_id), T0)
    await tx.upsert("chapter", content("chapter", 1, book_id=1), T0)
    await tx.upsert("page", content("page", 1, 11, book_id=1, chapter_id=1), T0)
    await tx.upsert("page", content("page", 2, 11, book_id=1), T0)
    await tx.upsert("page", content("page", 3, 11, book_id=2), T0)
    for content_type, item_id in (
        ("bookshelf", 1),
        ("book", 1),
        ("book", 2),
        ("chapter", 1),
        ("page", 1),
        ("page", 2),
        ("page", 3),
    ):
        owner = 11 if content_type == "page" else 1
        await tx.set_permissions(content_type, item_id, perms(owner), T0)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "mirror.db") as store:
        async with store.transaction() as tx:
            await write_wiki(tx)
        yield store


async def viewers(store: Store, content_type: str, item_id: int) -> list[int]:
    found = await store.access_of(content_type, item_id)
    assert found is not None, (content_type, item_id)
    return list(found["users"])


async def statuses(store: Store, content_type: str, item_id: int) -> dict[int, tuple[Any, ...]]:
    found = await store.access_of(content_type, item_id)
    assert found is not None
    return {r["role_id"]: (r["status"], r["owner_id"]) for r in found["roles"]}


async def access_feed(store: Store, after: int) -> dict[tuple[str, int], tuple[str, Any]]:
    out = {}
    for row in await store.changes(after, 10_000):
        if row["entity"] == "access":
            key = (row["content_type"], row["entity_id"])
            assert key not in out, "one access row per item and transaction"
            out[key] = (row["op"], (row["data"]["added"], row["data"]["removed"]))
    return out


# ---- the wiki as written -------------------------------------------------------------------


async def test_the_rows_are_joint_permissions_as_bookstack_builds_them(store: Store) -> None:
    # Admin: explicit allow with the owner; Viewers: page-view-all; Owners: page-view-own,
    # so its row carries the owner; Editors: nothing.
    assert await statuses(store, "page", 1) == {1: (3, 11), 2: (1, None), 3: (0, 11), 4: (0, None)}
    assert await viewers(store, "page", 1) == [1, 10, 11, 13]
    # The owner rule is for pages only here (Owners has page-view-own, no book-view-own).
    assert await viewers(store, "book", 1) == [1, 10, 13]
    rows = await store.fetchall(
        "SELECT role_id, status, owner_id FROM access WHERE content_type = 'page' AND "
        "content_id = 1 ORDER BY role_id"
    )
    assert [tuple(r) for r in rows] == [(1, 3, 11), (2, 1, None), (3, 0, 11), (4, 0, None)]


async def test_creating_and_deleting_items_is_in_the_access_feed(store: Store) -> None:
    seq = await store.last_seq()
    async with store.transaction() as tx:
        await tx.upsert("page", content("page", 4, 12, book_id=2), T0 + 1)
    assert await access_feed(store, seq) == {("page", 4): ("upsert", ([1, 10, 13], []))}
    seq = await store.last_seq()
    async with store.transaction() as tx:
        await tx.delete("book", 2, T0 + 2)
    assert await access_feed(store, seq) == {
        ("book", 2): ("delete", ([], [1, 10, 13])),
        ("page", 3): ("delete", ([], [1, 10, 11, 13])),
        ("page", 4): ("delete", ([], [1, 10, 13])),
    }
    assert await store.access_of("page", 3) is None
    assert (await store.fetchone("SELECT count(*) FROM access_items WHERE content_id = 3"))[0] == 0


# ---- content permissions -------------------------------------------------------------------


async def test_a_book_permission_change_recomputes_everything_below_it_and_nothing_else(
    store: Store,
) -> None:
    seq = await store.last_seq()
    async with store.transaction() as tx:
        # Everyone else may not view book 1; Editors may.
        await tx.set_permissions("book", 1, perms(1, DENY, r4=ALLOW), T0 + 1)
    for content_type, item_id in (("book", 1), ("chapter", 1), ("page", 1), ("page", 2)):
        got = await statuses(store, content_type, item_id)
        # Admin's rows carry the owner; a row that applies leaves everyone else's without.
        assert {r: s for r, (s, _o) in got.items()} == {1: 3, 2: 0, 3: 0, 4: 3}
        assert got[3][1] is None, "view-own counts only where no row applies"
    assert await viewers(store, "page", 1) == [1, 12, 13]
    feed = await access_feed(store, seq)
    assert feed == {
        ("book", 1): ("upsert", ([12], [10])),
        ("chapter", 1): ("upsert", ([12], [10])),
        # The owner (11) loses the page too: an "everyone else" row on the book applies.
        ("page", 1): ("upsert", ([12], [10, 11])),
        ("page", 2): ("upsert", ([12], [10, 11])),
    }
    # Book 2's page and the shelf were not touched.
    assert await viewers(store, "page", 3) == [1, 10, 11, 13]


async def test_the_first_row_of_the_role_wins_and_a_fallback_ends_the_walk(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.set_permissions("book", 1, perms(1, None, r2=DENY, r4=ALLOW), T0 + 1)
        await tx.set_permissions("chapter", 1, perms(1, ALLOW, r4=DENY), T0 + 1)
    # Page 1: chapter rows first (Editors denied, everyone else allowed), and the walk
    # stops there, so the book's deny for Viewers does not reach it.
    got = await statuses(store, "page", 1)
    assert {r: s for r, (s, _o) in got.items()} == {1: 3, 2: 1, 3: 1, 4: 2}
    # Page 2 sits in the book directly: the book's rows decide for Viewers and Editors;
    # no row applies to Owners (another role's row is not theirs, and there is no
    # fallback), so their role permissions do, view-own with them.
    got = await statuses(store, "page", 2)
    assert got == {1: (3, 11), 2: (2, None), 3: (0, 11), 4: (3, None)}
    # User 13 has Viewers (explicit deny on page 2) and Editors (explicit allow): allow wins.
    assert await viewers(store, "page", 2) == [1, 11, 12, 13]


async def test_an_explicit_deny_on_one_role_beats_an_implicit_allow_on_another(
    store: Store,
) -> None:
    async with store.transaction() as tx:
        await tx.set_permissions("page", 3, perms(11, None, r4=DENY), T0 + 1)
    # 13 has Viewers (implicit allow) and Editors (explicit deny): max status is the deny.
    assert await viewers(store, "page", 3) == [1, 10, 11]
    # The owner's view-own fails the same way when one of their roles is explicitly denied.
    async with store.transaction() as tx:
        await tx.set_user_roles(11, [3, 4], T0 + 2)
    assert await viewers(store, "page", 3) == [1, 10]


async def test_a_view_only_change_of_create_rights_recomputes_nothing_below(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.set_permissions("book", 1, perms(1, None, r4=ALLOW), T0 + 1)
    seq = await store.last_seq()
    async with store.transaction() as tx:
        granted = {**ALLOW, "create": True, "update": True}
        await tx.set_permissions("book", 1, perms(1, None, r4=granted), T0 + 2)
        assert tx.access.subtrees == set(), "view rows unchanged: nothing below is recomputed"
    assert await access_feed(store, seq) == {}


# ---- placement and owners ------------------------------------------------------------------


async def test_a_page_moved_by_a_sort_inherits_from_its_new_book(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.set_permissions("book", 2, perms(1, DENY), T0 + 1)
    seq = await store.last_seq()
    async with store.transaction() as tx:
        # A book sort's patch: placement only, no read of the page itself.
        assert await tx.patch("page", 2, {"book_id": 2, "chapter_id": None}, T0 + 2)
    assert await viewers(store, "page", 2) == [1]
    assert await access_feed(store, seq) == {("page", 2): ("upsert", ([], [10, 11, 13]))}


async def test_an_owner_change_recomputes_that_item_only(store: Store) -> None:
    seq = await store.last_seq()
    async with store.transaction() as tx:
        assert await tx.set_owner("page", 1, 12, None, T0 + 1)
    assert await statuses(store, "page", 1) == {1: (3, 12), 2: (1, None), 3: (0, 12), 4: (0, None)}
    # 12 has Editors (no view-own): the page is not theirs to see; 11 lost it.
    assert await access_feed(store, seq) == {("page", 1): ("upsert", ([], [11]))}
    async with store.transaction() as tx:
        await tx.set_user_roles(12, [3], T0 + 2)
    assert 12 in await viewers(store, "page", 1)


async def test_the_owner_is_the_one_the_newest_read_named(store: Store) -> None:
    """A permissions read (an owner changed through BookStack's permissions API) names the
    new owner before the item's own read does; an older item read must not undo it, and a
    read that cannot name the owner (a deleted user) keeps the id BookStack keeps."""
    async with store.transaction() as tx:
        await tx.set_permissions("page", 2, perms(12), T0 + 5)
    assert (await store.get("page", 2) or {})["owned_by"] == 12
    async with store.transaction() as tx:
        await tx.upsert("page", content("page", 2, 11, book_id=1, name="edited"), T0 + 3)
    assert (await store.get("page", 2) or {})["owned_by"] == 12
    assert (await statuses(store, "page", 2))[3] == (0, 12)
    async with store.transaction() as tx:
        await tx.upsert("page", content("page", 2, None, book_id=1, name="again"), T0 + 9)
    assert (await statuses(store, "page", 2))[1] == (3, 12)


# ---- roles and memberships -------------------------------------------------------------------


async def test_a_role_change_recomputes_that_role_only(store: Store) -> None:
    seq = await store.last_seq()
    async with store.transaction() as tx:
        await tx.upsert("role", role_row(4, ["page-view-all"]), T0 + 1)
    # Every page shows Editors' new status; shelves, books and chapters do not change.
    for page_id in (1, 2, 3):
        assert (await statuses(store, "page", page_id))[4] == (1, None)
    assert (await statuses(store, "book", 1))[4] == (0, None)
    # Only user 12 gained sight (13 saw the pages already, through Viewers).
    assert await access_feed(store, seq) == {
        ("page", 1): ("upsert", ([12], [])),
        ("page", 2): ("upsert", ([12], [])),
        ("page", 3): ("upsert", ([12], [])),
    }


async def test_a_role_change_writes_the_rows_of_that_role_only(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "m.db") as store:
        async with store.transaction() as tx:
            await write_wiki(tx)
        before = set(await class_rows(store))
        async with store.transaction() as tx:
            await tx.upsert("role", role_row(4, ["page-view-all"]), T0 + 1)
        stats = tx.access_stats
        after = set(await class_rows(store))
    changed = {row[1] for row in before ^ after}
    assert changed == {4}
    # One row per class of pages (their statuses for Editors), nothing else.
    page_classes = {row[0] for row in after if row[1] == 4 and row[2] == 1}
    assert stats.class_rows == len(page_classes) and stats.items == 0


async def class_rows(store: Store) -> list[tuple[int, int, int, int]]:
    rows = await store.fetchall("SELECT class_id, role_id, status, own FROM access_class_roles")
    return [tuple(r) for r in rows]  # type: ignore[misc]


async def test_membership_changes_move_no_rows_but_change_who_sees(store: Store) -> None:
    before = await class_rows(store)
    seq = await store.last_seq()
    async with store.transaction() as tx:
        await tx.set_user_roles(12, [2], T0 + 1)  # Editors → Viewers
        await tx.set_role_users(3, [], T0 + 1)  # Owners loses 11
    assert await class_rows(store) == before
    feed = await access_feed(store, seq)
    assert feed == {
        ("bookshelf", 1): ("upsert", ([12], [])),
        ("book", 1): ("upsert", ([12], [])),
        ("book", 2): ("upsert", ([12], [])),
        ("chapter", 1): ("upsert", ([12], [])),
        ("page", 1): ("upsert", ([12], [11])),
        ("page", 2): ("upsert", ([12], [11])),
        ("page", 3): ("upsert", ([12], [11])),
    }
    assert await store.visible_ids(11, "page") == []
    assert await store.visible_ids(12, "page") == [1, 2, 3]


async def test_a_deleted_role_takes_its_rows_and_its_members_sight(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.set_permissions("page", 3, perms(11, None, r4=ALLOW), T0 + 1)
    assert 12 in await viewers(store, "page", 3)
    seq = await store.last_seq()
    async with store.transaction() as tx:
        await tx.delete("role", 4, T0 + 2)
    assert (await store.fetchone("SELECT count(*) FROM access WHERE role_id = 4"))[0] == 0
    assert await access_feed(store, seq) == {("page", 3): ("upsert", ([], [12]))}
    assert await viewers(store, "page", 3) == [1, 10, 11, 13]


async def test_a_user_deleted_loses_sight_of_everything(store: Store) -> None:
    seq = await store.last_seq()
    async with store.transaction() as tx:
        await tx.delete("user", 10, T0 + 1)
    feed = await access_feed(store, seq)
    assert set(feed) == {
        ("bookshelf", 1),
        ("book", 1),
        ("book", 2),
        ("chapter", 1),
        ("page", 1),
        ("page", 2),
        ("page", 3),
    }
    assert all(change == ("upsert", ([], [10])) for change in feed.values())


# ---- transactions and processes ---------------------------------------------------------------


async def test_a_rolled_back_transaction_leaves_access_as_it_was(store: Store) -> None:
    before = await class_rows(store)
    seq = await store.last_seq()
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.upsert("role", role_row(4, ["page-view-all"]), T0 + 1)
            await tx.set_user_roles(12, [2], T0 + 1)
            await tx.flush_access()  # what the commit would do, then the commit fails
            raise RuntimeError("boom")
    assert await class_rows(store) == before
    assert await store.last_seq() == seq
    # The store's cache is not fooled by what it saw inside the rolled-back transaction.
    assert await viewers(store, "page", 1) == [1, 10, 11, 13]
    async with store.transaction() as tx:
        await tx.upsert("page", content("page", 9, 1, book_id=2), T0 + 2)
    assert await viewers(store, "page", 9) == [1, 10, 13]


async def test_another_process_sees_role_and_membership_changes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with await Store.open(path) as one, await Store.open(path) as other:
        async with one.transaction() as tx:
            await write_wiki(tx)
        assert await viewers(other, "page", 1) == [1, 10, 11, 13]  # its cache is warm now
        async with one.transaction() as tx:
            await tx.upsert("role", role_row(4, ["page-view-all"]), T0 + 1)
            await tx.set_user_roles(11, [], T0 + 1)
        # A page the other process writes gets Editors' new rows and today's members.
        async with other.transaction() as tx:
            await tx.upsert("page", content("page", 7, 1, book_id=2), T0 + 2)
        assert await viewers(other, "page", 7) == [1, 10, 12, 13]
        assert await viewers(other, "page", 1) == [1, 10, 12, 13]


async def test_an_existing_mirror_gets_its_first_computation_without_feed_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    async with await Store.open(path) as store:
        async with store.transaction() as tx:
            await write_wiki(tx)
        expected = [tuple(r) for r in await store.fetchall("SELECT * FROM access ORDER BY 1,2,3")]
    # As a mirror made before migration 0012 would be: no access rows, none in the feed.
    with sqlite3.connect(path) as conn:
        for table in ("access_items", "access_class_roles", "access_classes"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute("DELETE FROM changes WHERE entity = 'access'")
        conn.execute("DELETE FROM sync_state WHERE key = 'access_built'")
    async with await Store.open(path) as store:
        rows = [tuple(r) for r in await store.fetchall("SELECT * FROM access ORDER BY 1,2,3")]
        assert rows == expected
        assert await access_feed(store, 0) == {}


# ---- per user ---------------------------------------------------------------------------------


async def test_a_users_list_is_paged_by_id(store: Store) -> None:
    async with store.transaction() as tx:
        for page_id in range(20, 40):
            await tx.upsert("page", content("page", page_id, 11, book_id=2), T0 + 1)
        await tx.set_permissions("page", 25, perms(11, DENY), T0 + 1)
    every = await store.visible_ids(10, "page")
    assert every == [1, 2, 3, *(i for i in range(20, 40) if i != 25)]
    paged: list[int] = []
    after = 0
    while page := await store.visible_ids(10, "page", after, 7):
        paged += page
        after = page[-1]
    assert paged == every
    # The owner with only view-own sees what they own where no row applies.
    assert await store.visible_ids(11, "page") == [1, 2, 3, *(i for i in range(20, 40) if i != 25)]
    assert await store.visible_ids(999, "page") == []


async def test_classes_no_item_belongs_to_are_dropped(store: Store) -> None:
    async def classes() -> int:
        row = await store.fetchone("SELECT count(*) FROM access_classes")
        return int(row[0]) if row else 0

    baseline = await classes()
    async with store.transaction() as tx:
        await tx.set_permissions("book", 1, perms(1, DENY, r4=ALLOW), T0 + 1)
    assert await classes() > baseline
    async with store.transaction() as tx:
        await tx.set_permissions("book", 1, perms(1), T0 + 2)
    assert await classes() == baseline
    orphans = await store.fetchone(
        "SELECT count(*) FROM access_class_roles WHERE class_id NOT IN (SELECT id FROM "
        "access_classes)"
    )
    assert orphans is not None and orphans[0] == 0
