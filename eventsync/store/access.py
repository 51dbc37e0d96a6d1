"""The access tables (migration 0012): effective view access kept current inside each write
transaction, and the queries that answer from them.

Everything here runs on the database thread with the plain sqlite3 connection (one hop per
transaction, however many items it touches: `Tx.run`). The rule itself is eventsync/access.py;
this module only gathers its inputs, stores its results and works out who gained or lost
sight of what.

A transaction's writes only note what they changed (`AccessChanges`); `flush` runs before
COMMIT and brings the access tables up to date with work in proportion to those changes:
an item's class and owner, the items below a book or chapter whose rows changed, one role's
rows in every class, and, for membership changes, only the classes where a changed user's
view flips. It also writes one `access` change-feed row per item whose set of viewers
changed, with the users added and removed.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from eventsync import access as rules
from eventsync.access import Role, RoleStatus, Signature

Key = tuple[str, int]  # (content type, id): ("page", 12)
ITEM_TABLES = {"bookshelf": "shelves", "book": "books", "chapter": "chapters", "page": "pages"}
# sync_state keys: random tokens that change whenever roles (their permissions, a delete)
# or memberships change, so that a process's cache notices another process's commits.
ROLES_GENERATION = "access_roles_generation"
MEMBERS_GENERATION = "access_members_generation"
# Set once the access tables were filled for the mirror (the first computation).
BUILT = "access_built"
CHUNK = 500  # ids per IN (...) list, well below SQLite's variable limit
_NEVER = "\0never"


def _chunks(ids: Sequence[int], size: int = CHUNK) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _marks(n: int) -> str:
    return ", ".join("?" for _ in range(n))


@dataclass
class AccessChanges:
    """What one transaction changed among the inputs of access (filled by Tx's writes)."""

    items: set[Key] = field(default_factory=set)
    # Books and chapters whose own rows changed: everything below them is recomputed too.
    subtrees: set[Key] = field(default_factory=set)
    roles: set[int] = field(default_factory=set)
    # (user, role) → member before this transaction, for each pair it added or removed.
    pairs: dict[tuple[int, int], bool] = field(default_factory=dict)
    everything: bool = False
    # False for the first computation of an existing mirror: its change feed predates
    # access, and a reader starts from the tables.
    emit: bool = True

    def __bool__(self) -> bool:
        return bool(self.items or self.subtrees or self.roles or self.pairs or self.everything)

    def membership(self, user_id: int, role_id: int, was_member: bool) -> None:
        self.pairs.setdefault((user_id, role_id), was_member)


@dataclass
class _Item:
    content_type: str
    content_id: int
    book_id: int | None
    chapter_id: int | None
    owner_id: int | None


class AccessCache:
    """What every transaction needs and seldom changes: the roles, each class's rows and
    signature, the members of each role as bit masks. Used on the database thread only;
    checked against the generation tokens at each use."""

    def __init__(self) -> None:
        self.roles_generation: str | None = _NEVER
        self.roles: dict[int, Role] = {}
        self.class_rows: dict[int, dict[int, RoleStatus]] = {}
        # Class ids are never reused, so these stay valid across every generation.
        self.signatures: dict[int, Signature] = {}
        self.members_generation: str | None = _NEVER
        self.users: list[int] = []
        self.position: dict[int, int] = {}
        self.members: dict[int, int] = {}

    @staticmethod
    def _generations(conn: sqlite3.Connection) -> tuple[str | None, str | None]:
        found = dict(
            conn.execute(
                "SELECT key, value FROM sync_state WHERE key IN (?, ?)",
                (ROLES_GENERATION, MEMBERS_GENERATION),
            ).fetchall()
        )
        return found.get(ROLES_GENERATION), found.get(MEMBERS_GENERATION)

    def sync(self, conn: sqlite3.Connection) -> None:
        roles_generation, members_generation = self._generations(conn)
        if roles_generation != self.roles_generation:
            self.load_roles(conn)
            self.class_rows.clear()
            self.roles_generation = roles_generation
        if members_generation != self.members_generation:
            self.load_members(conn)
            self.members_generation = members_generation

    def load_roles(self, conn: sqlite3.Connection) -> None:
        self.roles = {
            int(r[0]): Role(
                id=int(r[0]),
                name=str(r[1]),
                system_name=str(r[2] or ""),
                permissions=frozenset(json.loads(r[3] or "[]")),
            )
            for r in conn.execute("SELECT id, display_name, system_name, permissions FROM roles")
        }

    def load_members(self, conn: sqlite3.Connection) -> None:
        pairs = conn.execute("SELECT user_id, role_id FROM user_roles ORDER BY user_id").fetchall()
        self.users = sorted({int(u) for u, _ in pairs})
        self.position = {u: i for i, u in enumerate(self.users)}
        members: dict[int, int] = {}
        for user_id, role_id in pairs:
            members[int(role_id)] = members.get(int(role_id), 0) | 1 << self.position[user_id]
        self.members = members

    def rows(self, conn: sqlite3.Connection, class_ids: Iterable[int]) -> None:
        """Load the rows of these classes into the cache (those it lacks)."""
        missing = sorted({c for c in class_ids if c not in self.class_rows})
        for chunk in _chunks(missing):
            for c in chunk:
                self.class_rows[c] = {}
            for class_id, role_id, status, own in conn.execute(
                "SELECT class_id, role_id, status, own FROM access_class_roles "
                f"WHERE class_id IN ({_marks(len(chunk))})",
                chunk,
            ):
                self.class_rows[class_id][role_id] = (int(status), bool(own))

    def signature(self, conn: sqlite3.Connection, class_id: int) -> Signature | None:
        if class_id not in self.signatures:
            row = conn.execute(
                "SELECT signature FROM access_classes WHERE id = ?", (class_id,)
            ).fetchone()
            if row is None:
                return None
            self.signatures[class_id] = rules.parse_signature(row[0])
        return self.signatures[class_id]


def _bump(conn: sqlite3.Connection, key: str) -> str:
    token = secrets.token_hex(8)
    conn.execute(
        "INSERT INTO sync_state (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, token),
    )
    return token


# ---- inputs ---------------------------------------------------------------------------------

_ITEM_SELECT = {
    "page": "SELECT e.id, e.book_id, e.chapter_id, e.owned_by",
    "chapter": "SELECT e.id, e.book_id, NULL, e.owned_by",
    "book": "SELECT e.id, NULL, NULL, e.owned_by",
    "bookshelf": "SELECT e.id, NULL, NULL, e.owned_by",
}


def _load_items(
    conn: sqlite3.Connection, content_type: str, ids: Sequence[int] | None
) -> dict[int, _Item]:
    """The mirrored items of one type (all of them for ids=None) with their placement and
    owner (`owned_by`: the store keeps there the owner the newest read named, an item's own
    read or its content permissions')."""
    base = f"{_ITEM_SELECT[content_type]} FROM {ITEM_TABLES[content_type]} e"
    queries: list[tuple[str, Sequence[Any]]] = []
    if ids is None:
        queries.append((base, ()))
    else:
        for chunk in _chunks(ids):
            queries.append((f"{base} WHERE e.id IN ({_marks(len(chunk))})", chunk))
    found: dict[int, _Item] = {}
    for sql, params in queries:
        for item_id, book_id, chapter_id, owned_by in conn.execute(sql, params):
            found[item_id] = _Item(
                content_type, item_id, book_id, chapter_id or None, owned_by or None
            )
    return found


def level_rows(
    conn: sqlite3.Connection, content_type: str, ids: Sequence[int] | None
) -> dict[int, dict[int, bool]]:
    """Each item's own view rows (FALLBACK for "everyone else"); items without are left out."""
    out: dict[int, dict[int, bool]] = {}
    fallback = (
        "SELECT content_id, fallback_view FROM content_permissions "
        "WHERE content_type = ? AND inheriting = 0"
    )
    role_rows = (
        'SELECT content_id, role_id, "view" FROM content_role_permissions WHERE content_type = ?'
    )
    batches: Iterable[Sequence[int] | None] = [None] if ids is None else _chunks(sorted(ids))
    for chunk in batches:
        where = "" if chunk is None else f" AND content_id IN ({_marks(len(chunk))})"
        params = (content_type, *(chunk or ()))
        for content_id, view in conn.execute(fallback + where, params):
            out.setdefault(content_id, {})[rules.FALLBACK] = bool(view)
        for content_id, role_id, view in conn.execute(role_rows + where, params):
            out.setdefault(content_id, {})[int(role_id)] = bool(view)
    return out


def _subtree_keys(conn: sqlite3.Connection, key: Key) -> set[Key]:
    content_type, content_id = key
    keys = {key}
    if content_type == "book":
        for (page_id,) in conn.execute("SELECT id FROM pages WHERE book_id = ?", (content_id,)):
            keys.add(("page", page_id))
        for (chapter_id,) in conn.execute(
            "SELECT id FROM chapters WHERE book_id = ?", (content_id,)
        ):
            keys.add(("chapter", chapter_id))
    elif content_type == "chapter":
        for (page_id,) in conn.execute("SELECT id FROM pages WHERE chapter_id = ?", (content_id,)):
            keys.add(("page", page_id))
    return keys


def _signatures(
    conn: sqlite3.Connection, items: dict[str, dict[int, _Item]], everything: bool
) -> dict[Key, Signature]:
    """Each item's signature, from its own rows and its chapter's and book's."""
    wanted: dict[str, set[int]] = {t: set() for t in ITEM_TABLES}
    for content_type, found in items.items():
        for item in found.values():
            wanted[content_type].add(item.content_id)
            if item.chapter_id:
                wanted["chapter"].add(item.chapter_id)
            if item.book_id:
                wanted["book"].add(item.book_id)
    rows = {
        t: level_rows(conn, t, None if everything else sorted(ids))
        for t, ids in wanted.items()
        if ids
    }
    out: dict[Key, Signature] = {}
    for content_type, found in items.items():
        own = rows.get(content_type, {})
        for item in found.values():
            levels = [own.get(item.content_id, {})]
            if item.chapter_id:
                levels.append(rows.get("chapter", {}).get(item.chapter_id, {}))
            if item.book_id:
                levels.append(rows.get("book", {}).get(item.book_id, {}))
            out[(content_type, item.content_id)] = rules.signature(content_type, levels)
    return out


def _class_for(conn: sqlite3.Connection, cache: AccessCache, sig: Signature) -> tuple[int, int]:
    """The class id of a signature, created (with a row per role) when new; and the rows
    written for it."""
    text = rules.signature_text(sig)
    row = conn.execute("SELECT id FROM access_classes WHERE signature = ?", (text,)).fetchone()
    if row is not None:
        cache.signatures.setdefault(row[0], sig)
        return int(row[0]), 0
    cur = conn.execute(
        "INSERT INTO access_classes (content_type, signature) VALUES (?, ?) RETURNING id",
        (sig[0], text),
    )
    class_id = int(cur.fetchone()[0])
    statuses = rules.class_statuses(sig, cache.roles.values())
    conn.executemany(
        "INSERT INTO access_class_roles (class_id, role_id, status, own) VALUES (?, ?, ?, ?)",
        [(class_id, r, s, int(o)) for r, (s, o) in statuses.items()],
    )
    cache.signatures[class_id] = sig
    cache.class_rows[class_id] = statuses
    return class_id, len(statuses)


# ---- the flush --------------------------------------------------------------------------------


@dataclass
class FlushStats:
    """Rows written by one flush (the benchmark's "work done")."""

    items: int = 0
    class_rows: int = 0
    changes: int = 0

    @property
    def rows(self) -> int:
        return self.items + self.class_rows + self.changes


def flush(
    conn: sqlite3.Connection, cache: AccessCache, changes: AccessChanges, now_iso: str
) -> FlushStats:
    """Bring the access tables up to date with what this transaction changed, and write an
    `access` change-feed row for each item whose set of viewers changed."""
    stats = FlushStats()
    if not changes:
        return stats
    cache.sync(conn)
    if changes.pairs:
        cache.members_generation = _bump(conn, MEMBERS_GENERATION)
        cache.load_members(conn)
    role_before = _refresh_roles(conn, cache, changes, stats)
    before, after = _refresh_items(conn, cache, changes, stats)
    if changes.emit:
        stats.changes = _viewer_changes(conn, cache, changes, role_before, before, after, now_iso)
    _collect_garbage(conn, cache, {v[0] for v in before.values() if v is not None}, changes)
    if changes.everything:
        conn.execute(
            "INSERT INTO sync_state (key, value) VALUES (?, '1') "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (BUILT,),
        )
    return stats


def _refresh_roles(
    conn: sqlite3.Connection, cache: AccessCache, changes: AccessChanges, stats: FlushStats
) -> dict[tuple[int, int], RoleStatus | None]:
    """Recompute the rows of the roles this transaction wrote or deleted, in every class
    (a role's rows depend on its own permissions only). Returns the rows as they were, for
    each (class, role) that changed."""
    if not (changes.roles or changes.everything):
        return {}
    cache.load_roles(conn)
    role_ids = set(changes.roles)
    if changes.everything:
        role_ids |= set(cache.roles)
        role_ids |= {r for (r,) in conn.execute("SELECT DISTINCT role_id FROM access_class_roles")}
    if not role_ids:
        return {}
    ordered = sorted(role_ids)
    current: dict[tuple[int, int], RoleStatus] = {}
    for chunk in _chunks(ordered):
        for class_id, role_id, status, own in conn.execute(
            "SELECT class_id, role_id, status, own FROM access_class_roles "
            f"WHERE role_id IN ({_marks(len(chunk))})",
            chunk,
        ):
            current[(class_id, role_id)] = (int(status), bool(own))
    before: dict[tuple[int, int], RoleStatus | None] = {}
    upserts: list[tuple[int, int, int, int]] = []
    deletes: list[tuple[int, int]] = []
    for class_id, text in conn.execute("SELECT id, signature FROM access_classes"):
        sig = cache.signatures.get(class_id) or rules.parse_signature(text)
        cache.signatures[class_id] = sig
        for role_id in ordered:
            role = cache.roles.get(role_id)
            new = rules.role_status(role, sig) if role is not None else None
            old = current.get((class_id, role_id))
            if new == old:
                continue
            before[(class_id, role_id)] = old
            if new is None:
                deletes.append((class_id, role_id))
            else:
                upserts.append((class_id, role_id, new[0], int(new[1])))
    conn.executemany("DELETE FROM access_class_roles WHERE class_id = ? AND role_id = ?", deletes)
    conn.executemany(
        "INSERT INTO access_class_roles (class_id, role_id, status, own) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (class_id, role_id) DO UPDATE SET status = excluded.status, "
        "own = excluded.own",
        upserts,
    )
    stats.class_rows += len(deletes) + len(upserts)
    # The roles as this connection sees them now; the class rows are reloaded as needed.
    cache.class_rows.clear()
    cache.roles_generation = _bump(conn, ROLES_GENERATION)
    return before


Placement = tuple[int, int | None]  # (class id, owner id) of one item


def _refresh_items(
    conn: sqlite3.Connection, cache: AccessCache, changes: AccessChanges, stats: FlushStats
) -> tuple[dict[Key, Placement | None], dict[Key, Placement | None]]:
    """Recompute the class and owner of every item this transaction touched (and of what is
    below a book or chapter whose rows changed). Returns, for the items whose class or owner
    changed, what it was and what it is (None: not an item, before or now)."""
    everything = changes.everything
    keys: set[Key] = set(changes.items)
    for key in changes.subtrees:
        keys |= _subtree_keys(conn, key)
    if not keys and not everything:
        return {}, {}
    by_type: dict[str, list[int]] = {t: [] for t in ITEM_TABLES}
    for content_type, content_id in keys:
        by_type[content_type].append(content_id)
    items = {
        t: _load_items(conn, t, None if everything else sorted(ids))
        for t, ids in by_type.items()
        if ids or everything
    }
    if everything:
        # Every item there is, and every row the tables hold (of items gone since).
        keys |= {(t, i) for t, found in items.items() for i in found}
        keys |= set(conn.execute("SELECT content_type, content_id FROM access_items"))
        by_type = {t: [] for t in ITEM_TABLES}
        for content_type, content_id in keys:
            by_type[content_type].append(content_id)
    sigs = _signatures(conn, items, changes.everything)
    class_of: dict[Signature, int] = {}
    now: dict[Key, Placement | None] = {}
    for key in keys:
        item = items.get(key[0], {}).get(key[1])
        if item is None:
            now[key] = None
            continue
        sig = sigs[key]
        if sig not in class_of:
            class_of[sig], written = _class_for(conn, cache, sig)
            stats.class_rows += written
        now[key] = (class_of[sig], item.owner_id)
    was: dict[Key, Placement | None] = dict.fromkeys(keys)
    for content_type, ids in by_type.items():
        for chunk in _chunks(sorted(ids)):
            for content_id, class_id, owner_id in conn.execute(
                "SELECT content_id, class_id, owner_id FROM access_items WHERE content_type = ? "
                f"AND content_id IN ({_marks(len(chunk))})",
                (content_type, *chunk),
            ):
                was[(content_type, content_id)] = (class_id, owner_id)
    before = {k: v for k, v in was.items() if v != now[k]}
    after = {k: now[k] for k in before}
    conn.executemany(
        "DELETE FROM access_items WHERE content_type = ? AND content_id = ?",
        [k for k, v in after.items() if v is None],
    )
    conn.executemany(
        "INSERT INTO access_items (content_type, content_id, class_id, owner_id) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (content_type, content_id) DO UPDATE SET "
        "class_id = excluded.class_id, owner_id = excluded.owner_id",
        [(*k, *v) for k, v in after.items() if v is not None],
    )
    stats.items += len(after)
    return before, after


def _viewer_changes(
    conn: sqlite3.Connection,
    cache: AccessCache,
    changes: AccessChanges,
    role_before: dict[tuple[int, int], RoleStatus | None],
    before: dict[Key, Placement | None],
    after: dict[Key, Placement | None],
    now_iso: str,
) -> int:
    """Write the change-feed rows of the items whose set of viewers changed; returns how
    many."""
    # Bit positions: the members' index, plus users who lost their last role here.
    position = dict(cache.position)
    users = list(cache.users)
    for user_id, _role in changes.pairs:
        if user_id not in position:
            position[user_id] = len(users)
            users.append(user_id)
    members_now = cache.members
    members_was = dict(members_now)
    for (user_id, role_id), was_member in changes.pairs.items():
        bit = 1 << position[user_id]
        members_was[role_id] = (
            members_was.get(role_id, 0) | bit if was_member else members_was.get(role_id, 0) & ~bit
        )
    old_overrides: dict[int, dict[int, RoleStatus | None]] = {}
    for (class_id, role_id), old in role_before.items():
        old_overrides.setdefault(class_id, {})[role_id] = old

    def rows_now(class_id: int) -> dict[int, RoleStatus]:
        cache.rows(conn, [class_id])
        return cache.class_rows[class_id]

    def rows_was(class_id: int) -> dict[int, RoleStatus]:
        rows = dict(rows_now(class_id))
        for role_id, old in old_overrides.get(class_id, {}).items():
            if old is None:
                rows.pop(role_id, None)
            else:
                rows[role_id] = old
        return rows

    masks_now: dict[int, tuple[int, int]] = {}
    masks_was: dict[int, tuple[int, int]] = {}

    def now_masks(class_id: int) -> tuple[int, int]:
        if class_id not in masks_now:
            masks_now[class_id] = rules.class_masks(rows_now(class_id), members_now)
        return masks_now[class_id]

    def was_masks(class_id: int) -> tuple[int, int]:
        if class_id not in masks_was:
            masks_was[class_id] = rules.class_masks(rows_was(class_id), members_was)
        return masks_was[class_id]

    def owner_bit(owner_id: int | None) -> int:
        pos = position.get(owner_id) if owner_id is not None else None
        return 0 if pos is None else 1 << pos

    def viewers(placement: Placement | None, masks: Any) -> int:
        if placement is None:
            return 0
        return rules.item_viewers(masks(placement[0]), owner_bit(placement[1]))

    # Most rows of one change carry the same users: their JSON is made once.
    texts: dict[tuple[int, int], str] = {}

    def text_of(old: int, new: int) -> str:
        added, removed = new & ~old, old & ~new
        text = texts.get((added, removed))
        if text is None:
            # Compact: a book's rows can change hundreds of users' view of a thousand pages.
            text = json.dumps(
                {
                    "added": [users[i] for i in rules.bits(added)],
                    "removed": [users[i] for i in rules.bits(removed)],
                },
                sort_keys=True,
                separators=(",", ":"),
            )
            texts[(added, removed)] = text
        return text

    out: list[tuple[str, str, int, str, str]] = []
    written = 0
    cache.rows(conn, {p[0] for p in (*before.values(), *after.values()) if p is not None})
    for key in sorted(before):
        old = viewers(before[key], was_masks)
        new = viewers(after[key], now_masks)
        if old != new:
            op = "delete" if after[key] is None else "upsert"
            out.append((now_iso, op, key[1], key[0], text_of(old, new)))

    # Classes where someone's view may have changed without the item moving class: rows
    # of a role changed, or a user's roles did (only where that user's view flips).
    candidates = set(old_overrides)
    if changes.pairs:
        candidates |= _membership_candidates(
            conn, changes, position, members_now, members_was, old_overrides
        )
    for class_id in sorted(candidates):
        (was_viewers, was_own), (now_viewers, now_own) = was_masks(class_id), now_masks(class_id)
        if (was_viewers, was_own) == (now_viewers, now_own):
            continue
        query = "SELECT content_type, content_id, owner_id FROM access_items WHERE class_id = ?"
        params: list[Any] = [class_id]
        if was_viewers == now_viewers:
            # Only an owner whose view-own answer changed sees something new: their items.
            owners = [users[i] for i in rules.bits((was_own ^ now_own) & ~now_viewers)]
            if not owners:
                continue
            query += " AND owner_id IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(owners))
        # Only an owner who sees an item through owning it, not through the class, makes its
        # change differ from the class's; every other item changes as the class does. Those
        # are the bulk of a role change (thousands of items, a row each): SQL writes them,
        # and the owners' items are looked at here.
        either_own = (was_own & ~was_viewers) | (now_own & ~now_viewers)
        owning = json.dumps([users[i] for i in rules.bits(either_own)])
        if was_viewers != now_viewers and not before:
            cur = conn.execute(
                "INSERT INTO changes (changed_at, op, entity, entity_id, content_type, data) "
                "SELECT ?, 'upsert', 'access', content_id, content_type, ? FROM access_items "
                "WHERE class_id = ? AND (owner_id IS NULL OR owner_id NOT IN "
                "(SELECT value FROM json_each(?))) ORDER BY content_type, content_id",
                (now_iso, text_of(was_viewers, now_viewers), class_id, owning),
            )
            written += cur.rowcount
            query += " AND owner_id IN (SELECT value FROM json_each(?))"
            params.append(owning)
        common = text_of(was_viewers, now_viewers) if was_viewers != now_viewers else None
        for content_type, content_id, owner_id in conn.execute(
            query + " ORDER BY content_type, content_id", params
        ):
            if before and (content_type, content_id) in before:
                continue
            pos = position.get(owner_id) if owner_id is not None else None
            if pos is not None and either_own >> pos & 1:
                bit = 1 << pos
                old = was_viewers | (bit & was_own)
                new = now_viewers | (bit & now_own)
                if old != new:
                    out.append((now_iso, "upsert", content_id, content_type, text_of(old, new)))
            elif common is not None:
                out.append((now_iso, "upsert", content_id, content_type, common))
    conn.executemany(
        "INSERT INTO changes (changed_at, op, entity, entity_id, content_type, data) "
        "VALUES (?, ?, 'access', ?, ?, ?)",
        out,
    )
    return written + len(out)


def _membership_candidates(
    conn: sqlite3.Connection,
    changes: AccessChanges,
    position: dict[int, int],
    members_now: dict[int, int],
    members_was: dict[int, int],
    old_overrides: dict[int, dict[int, RoleStatus | None]],
) -> set[int]:
    """Classes where the view of a user whose roles changed flips: the masks restricted to
    those users, from the rows of their roles only."""
    changed = {u for u, _ in changes.pairs}
    delta = 0
    for user_id in changed:
        delta |= 1 << position[user_id]
    roles = {r for r, m in members_now.items() if m & delta}
    roles |= {r for r, m in members_was.items() if m & delta}
    if not roles:
        return set()
    now_d = {r: members_now.get(r, 0) & delta for r in roles}
    was_d = {r: members_was.get(r, 0) & delta for r in roles}
    by_class: dict[int, dict[int, RoleStatus]] = {}
    ordered = sorted(roles)
    for chunk in _chunks(ordered):
        for class_id, role_id, status, own in conn.execute(
            "SELECT class_id, role_id, status, own FROM access_class_roles "
            f"WHERE role_id IN ({_marks(len(chunk))})",
            chunk,
        ):
            by_class.setdefault(class_id, {})[role_id] = (int(status), bool(own))
    out = set()
    for class_id, rows in by_class.items():
        was_rows = dict(rows)
        for role_id, old in old_overrides.get(class_id, {}).items():
            if role_id not in roles:
                continue
            if old is None:
                was_rows.pop(role_id, None)
            else:
                was_rows[role_id] = old
        if rules.class_masks(rows, now_d) != rules.class_masks(was_rows, was_d):
            out.add(class_id)
    return out


def _collect_garbage(
    conn: sqlite3.Connection, cache: AccessCache, left: set[int], changes: AccessChanges
) -> None:
    """Classes no item belongs to any more go, with their rows."""
    if changes.everything:
        left |= {
            c
            for (c,) in conn.execute(
                "SELECT id FROM access_classes WHERE id NOT IN "
                "(SELECT DISTINCT class_id FROM access_items)"
            )
        }
    empty = [
        (c,)
        for c in sorted(left)
        if conn.execute("SELECT 1 FROM access_items WHERE class_id = ? LIMIT 1", (c,)).fetchone()
        is None
    ]
    conn.executemany("DELETE FROM access_class_roles WHERE class_id = ?", empty)
    conn.executemany("DELETE FROM access_classes WHERE id = ?", empty)
    for (c,) in empty:
        cache.class_rows.pop(c, None)


# ---- answers --------------------------------------------------------------------------------


def chain_of(conn: sqlite3.Connection, content_type: str, content_id: int) -> Any:
    """(chain of levels, owner id) of one mirrored item, None when the mirror lacks it: the
    inputs of access, for saying why."""
    item = _load_items(conn, content_type, [content_id]).get(content_id)
    if item is None:
        return None
    places = [(content_type, content_id)]
    if item.chapter_id:
        places.append(("chapter", item.chapter_id))
    if item.book_id:
        places.append(("book", item.book_id))
    chain = [rules.Level(t, i, level_rows(conn, t, [i]).get(i, {})) for t, i in places]
    return chain, item.owner_id


def item_access(
    conn: sqlite3.Connection, cache: AccessCache, content_type: str, content_id: int
) -> dict[str, Any] | None:
    """One item's joint_permissions rows (per role) and the users who can view it."""
    row = conn.execute(
        "SELECT class_id, owner_id FROM access_items WHERE content_type = ? AND content_id = ?",
        (content_type, content_id),
    ).fetchone()
    if row is None:
        return None
    class_id, owner_id = row
    cache.sync(conn)
    cache.rows(conn, [class_id])
    statuses = cache.class_rows[class_id]
    roles = []
    for role_id in sorted(statuses):
        status, owner = rules.joint_row(statuses[role_id], owner_id)
        roles.append({"role_id": role_id, "status": status, "owner_id": owner})
    pos = cache.position.get(owner_id) if owner_id is not None else None
    viewers = rules.item_viewers(
        rules.class_masks(statuses, cache.members), 0 if pos is None else 1 << pos
    )
    return {
        "content_type": content_type,
        "content_id": content_id,
        "owner_id": owner_id,
        "roles": roles,
        "users": [cache.users[i] for i in rules.bits(viewers)],
    }


def visible_ids(
    conn: sqlite3.Connection,
    user_id: int,
    content_type: str,
    after: int = 0,
    limit: int | None = None,
) -> list[int]:
    """The ids of the items of one type this user can view, ascending, after `after`: the
    user's roles decide per class (a few hundred at most), then one indexed scan."""
    roles = [
        r for (r,) in conn.execute("SELECT role_id FROM user_roles WHERE user_id = ?", (user_id,))
    ]
    if not roles:
        return []
    per_class: dict[int, list[RoleStatus]] = {}
    for class_id, status, own in conn.execute(
        "SELECT r.class_id, r.status, r.own FROM access_class_roles r JOIN access_classes c "
        f"ON c.id = r.class_id WHERE c.content_type = ? AND r.role_id IN ({_marks(len(roles))})",
        (content_type, *roles),
    ):
        per_class.setdefault(class_id, []).append((int(status), bool(own)))
    seen = [c for c, rows in per_class.items() if rules.user_can_view(rows, False)]
    owned = [
        c for c, rows in per_class.items() if c not in seen and rules.user_can_view(rows, True)
    ]
    if not seen and not owned:
        return []
    return [
        r[0]
        for r in conn.execute(
            "SELECT content_id FROM access_items WHERE content_type = ? AND content_id > ? AND "
            "(class_id IN (SELECT value FROM json_each(?)) OR (owner_id = ? AND class_id IN "
            "(SELECT value FROM json_each(?)))) ORDER BY content_id LIMIT ?",
            (
                content_type,
                after,
                json.dumps(seen),
                user_id,
                json.dumps(owned),
                2**62 if limit is None else limit,  # no bound: SQLite takes -1, PostgreSQL not
            ),
        )
    ]


# What the sync token's user must hold for the mirror to have every user and role in it.
TOKEN_PERMISSIONS = frozenset({"access-api", "users-manage", "user-roles-manage"})


def token_candidates(conn: sqlite3.Connection, cache: AccessCache) -> list[rules.Candidate]:
    """The mirrored users who could own the sync token (the permissions a complete sync
    needs), each with whether they are an admin and the kinds of which they cannot view
    every mirrored item (then the token is not theirs: the token sees the whole mirror)."""
    cache.sync(conn)
    roles_of: dict[int, set[int]] = {}
    for user_id, role_id in conn.execute("SELECT user_id, role_id FROM user_roles"):
        roles_of.setdefault(user_id, set()).add(role_id)
    totals = dict(
        conn.execute("SELECT content_type, count(*) FROM access_items GROUP BY content_type")
    )
    out = []
    for user_id in sorted(roles_of):
        roles = [cache.roles[r] for r in sorted(roles_of[user_id]) if r in cache.roles]
        held = frozenset().union(*(r.permissions for r in roles)) if roles else frozenset()
        if not held >= TOKEN_PERMISSIONS:
            continue
        admin = any(r.admin for r in roles)
        hidden = (
            []
            if admin
            else [
                t
                for t in rules.CONTENT_TYPES
                if len(visible_ids(conn, user_id, t)) != int(totals.get(t, 0))
            ]
        )
        out.append(rules.Candidate(user_id, admin, tuple(hidden)))
    return out
