"""The mirror in SQLite: schema migrations, transactional writes with the change feed, export."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from eventsync.access import token_problem
from eventsync.store import access as access_sql
from eventsync.store.access import AccessCache, AccessChanges
from eventsync.store.base import (
    CONTENT_TYPES,
    KIND_OF_CONTENT_TYPE,
    LAST_FULL_SYNC,
    PLACEMENT,
    SYNC_FORBIDDEN,
    StoreError,
    is_postgres_url,
)
from eventsync.store.postgres import driver as pg_driver
from eventsync.store.postgres.driver import DEFAULT_SCHEMA
from eventsync.store.sqlite import driver as sqlite_driver
from eventsync.store.states import change_state

T = TypeVar("T")

# BookStack's page include tag: {{@123}} or {{@123#section}}.
INCLUDE = re.compile(r"\{\{@(\d+)(?:#[^}]*)?\}\}")
# BookStack's page permalink: /link/123 (CrossLinkParser).
PERMALINK = re.compile(r"/link/(\d+)(?!\d)")



@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]  # every column but id and fetched_at
    json_columns: tuple[str, ...] = ()


TABLES: dict[str, Table] = {
    "shelf": Table(
        "shelves",
        (
            "name",
            "slug",
            "description",
            "description_html",
            "created_at",
            "updated_at",
            "created_by",
            "updated_by",
            "owned_by",
            "tags",
        ),
        ("tags",),
    ),
    "book": Table(
        "books",
        (
            "name",
            "slug",
            "description",
            "description_html",
            "default_template_id",
            "sort_rule_id",
            "created_at",
            "updated_at",
            "created_by",
            "updated_by",
            "owned_by",
            "tags",
        ),
        ("tags",),
    ),
    "chapter": Table(
        "chapters",
        (
            "book_id",
            "name",
            "slug",
            "description",
            "description_html",
            "priority",
            "default_template_id",
            "created_at",
            "updated_at",
            "created_by",
            "updated_by",
            "owned_by",
            "tags",
        ),
        ("tags",),
    ),
    "page": Table(
        "pages",
        (
            "book_id",
            "chapter_id",
            "name",
            "slug",
            "priority",
            "draft",
            "template",
            "revision_count",
            "editor",
            "raw_html",
            "html",
            "markdown",
            "created_at",
            "updated_at",
            "created_by",
            "updated_by",
            "owned_by",
            "tags",
        ),
        ("tags",),
    ),
    "attachment": Table(
        "attachments",
        (
            "name",
            "extension",
            "uploaded_to",
            "external",
            "order",
            "created_at",
            "updated_at",
            "created_by",
            "updated_by",
            "link",
            "content",
        ),
    ),
    "user": Table(
        "users", ("name", "slug", "email", "external_auth_id", "created_at", "updated_at")
    ),
    "role": Table(
        "roles",
        (
            "display_name",
            "description",
            "system_name",
            "external_auth_id",
            "mfa_enforced",
            "permissions",
            "created_at",
            "updated_at",
        ),
        ("permissions",),
    ),
}

# A stored read time this far ahead of our clock is not trusted to be newer than anything:
# the clock was stepped back (NTP, a restored VM), and every correct write would be refused.
FUTURE_SLACK = 60.0


def newer(stored: float | None, read_at: float) -> bool:
    """Is a stored read time later than `read_at` (and not from before a clock step)?"""
    return stored is not None and read_at < stored <= time.time() + FUTURE_SLACK


# The export section (and table) of each kind: "page" → "pages".
SECTION_OF: dict[str, str] = {kind: table.name for kind, table in TABLES.items()}

SCHEMA_VERSION_KEY = "user_version"

# The export document (DESIGN.md): section → (table, fields in order). Fields that are not
# columns are relations filled in by Store.export; BOOL_FIELDS are stored as 0/1.
EXPORT_SECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "shelves": ("shelves", ("id", "name", "slug", "description", "books", "tags")),
    "books": ("books", ("id", "name", "slug", "description", "sort_rule_id", "tags")),
    "chapters": ("chapters", ("id", "book_id", "name", "slug", "description", "priority", "tags")),
    "pages": (
        "pages",
        (
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
        ),
    ),
    "attachments": (
        "attachments",
        ("id", "name", "extension", "uploaded_to", "external", "order", "updated_at"),
    ),
    "users": ("users", ("id", "name", "slug", "email", "roles")),
    "roles": ("roles", ("id", "display_name", "description", "permissions", "users")),
}
BOOL_FIELDS = frozenset({"draft", "template", "external"})


def _export_value(field: str, row: aiosqlite.Row, relations: dict[str, Any]) -> Any:
    if field in relations:
        return relations[field](row)
    if field in BOOL_FIELDS:
        return bool(row[field])
    return row[field]


# Rows that name something the mirror does not hold (DESIGN 13), by relation. A page or
# chapter without its book is not among them: a token may see a page but not its book, and
# the mirror shows what BookStack shows.
DANGLING: dict[str, tuple[str, str]] = {
    "attachments of pages not mirrored": (
        "attachments",
        "uploaded_to NOT IN (SELECT id FROM pages)",
    ),
    "shelf books not mirrored": (
        "shelf_books",
        "shelf_id NOT IN (SELECT id FROM shelves) OR book_id NOT IN (SELECT id FROM books)",
    ),
    "memberships of users or roles not mirrored": (
        "user_roles",
        "user_id NOT IN (SELECT id FROM users) OR role_id NOT IN (SELECT id FROM roles)",
    ),
    "permissions of items not mirrored": (
        "content_permissions",
        "(content_type = 'page' AND content_id NOT IN (SELECT id FROM pages)) OR "
        "(content_type = 'chapter' AND content_id NOT IN (SELECT id FROM chapters)) OR "
        "(content_type = 'book' AND content_id NOT IN (SELECT id FROM books)) OR "
        "(content_type = 'bookshelf' AND content_id NOT IN (SELECT id FROM shelves))",
    ),
    "permission rows of roles or items not mirrored": (
        "content_role_permissions",
        "role_id NOT IN (SELECT id FROM roles) OR NOT EXISTS (SELECT 1 FROM "
        "content_permissions cp WHERE cp.content_type = content_role_permissions.content_type "
        "AND cp.content_id = content_role_permissions.content_id)",
    ),
}


# A content_permissions row (as `cp`) that is not the default.
_RESTRICTED = (
    "(cp.inheriting = 0 OR EXISTS (SELECT 1 FROM content_role_permissions r "
    "WHERE r.content_type = cp.content_type AND r.content_id = cp.content_id))"
)


def _q(column: str) -> str:
    return f'"{column}"'


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _migrations(backend: str) -> list[tuple[int, str]]:
    folder = resources.files(f"eventsync.store.{backend}") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)


class Store:
    """One SQLite database: the mirror, the sync state, the change feed (and later the queue)."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        *,
        location: str | None = None,
        dialect: str = "sqlite",
    ) -> None:
        self._db = db
        self.path = path
        # Where the mirror is, fit to print: the file, or the URL without its password.
        self.location = location or str(path)
        self.dialect = dialect
        self._closed = False
        self._lock = asyncio.Lock()
        # Called after each commit that wrote to the change feed: feed.FeedWatch wakes the
        # stream and the deliveries with it, instead of their polling the table.
        self.on_feed_commit: list[Callable[[], None]] = []
        # Roles, classes and memberships for the access tables, on the database thread.
        self._access_cache = AccessCache()
        # Called when another process commits jobs (PostgreSQL's NOTIFY): the workers wake.
        self.on_jobs: list[Callable[[], None]] = []
        self._url: str | None = None
        self._schema = DEFAULT_SCHEMA
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()  # set while the listener's connection is up

    @classmethod
    async def open(cls, database: Path | str, *, schema: str | None = None) -> Store:
        """The mirror at `database`: a SQLite file path, or a postgresql:// URL."""
        if is_postgres_url(str(database)):
            return await cls._open_postgres(str(database), schema or DEFAULT_SCHEMA)
        path = Path(database)
        try:
            db = await sqlite_driver.connect(path)
        except IsADirectoryError:
            raise StoreError(f"database path {path} is a directory") from None
        except OSError:
            raise  # said in one line naming the file by app.open_store
        except Exception as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        store = cls(db, path)
        try:
            await sqlite_driver.migrate(db, _migrations("sqlite"))
            await store._setup_access()
        except aiosqlite.DatabaseError as exc:
            await db.close()
            raise StoreError(f"cannot use database {path}: {exc}") from None
        return store

    @classmethod
    async def _open_postgres(cls, url: str, schema: str) -> Store:
        try:
            db: Any = await pg_driver.Connection.connect(url, schema)
        except Exception as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL at {pg_driver.redacted(url)}: {_first_line(exc)}"
            ) from None
        store = cls(db, Path(), location=pg_driver.redacted(url), dialect="postgresql")
        store._url, store._schema = url, schema
        try:
            await pg_driver.migrate(db, _migrations("postgres"))
            await store._setup_access()
        except Exception as exc:
            await db.close()
            raise StoreError(
                f"cannot use PostgreSQL at {pg_driver.redacted(url)}: {_first_line(exc)}"
            ) from None
        return store

    async def _setup_access(self) -> None:
        async with self._write() as tx:
            if await tx.get_state(access_sql.BUILT) is None:
                # The first computation of access for a mirror that predates it (or a new
                # one): its change feed has no rows for it, readers start from the tables.
                tx.access.everything = True
                tx.access.emit = False

    async def ping(self) -> None:
        """Raise if the database does not answer (readiness)."""
        await self.fetchone("SELECT 1")

    @property
    def announces(self) -> bool:
        """Whether other processes' commits reach `on_feed_commit` and `on_jobs` (LISTEN/
        NOTIFY) once `listen()` ran; without it readers poll for them."""
        return self._url is not None

    async def listen(self) -> None:
        """Start receiving other processes' announcements (PostgreSQL); returns once listening.
        Idempotent; a no-op on SQLite."""
        if self._url is None:
            return
        if self._listener is None:
            listener = pg_driver.Listener(
                self._url,
                self._schema,
                {"changes": self.on_feed_commit, "jobs": self.on_jobs},
            )
            self._listener = asyncio.create_task(listener.run(), name="eventsync-listen")
            self._listening = listener.connected
        with contextlib.suppress(asyncio.TimeoutError):
            # A reader that starts before the connection is up re-reads once it is (the
            # listener calls every callback on connecting), so waiting briefly is enough.
            await asyncio.wait_for(self._listening.wait(), timeout=10)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._listener is not None:
                self._listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._listener
            await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- transactions -------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Tx]:
        await _on_db_thread(self._db, _begin_write)
        tx = Tx(self._db, self._access_cache)
        try:
            yield tx
            # Access follows its inputs in the same transaction (DESIGN: Effective access).
            await tx.flush_access()
            if tx.changed:
                await _on_db_thread(self._db, lambda conn: announce(conn, "changes"))
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        else:
            await self._db.execute("COMMIT")
            if tx.changed:
                for listener in self.on_feed_commit:
                    listener()

    async def run_tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one write transaction on the database thread: a single hop between
        threads however many statements it makes (the hot path of webhook intake)."""
        return await self._run_in_tx(fn, _begin_write)

    async def run_local_tx(self, fn: Callable[[Any], T]) -> T:
        """Run `fn` in a transaction that writes nothing the feed or the rules order (leases):
        serialised in this process, but not with other processes' writers on PostgreSQL,
        where row locks order it. On SQLite it is an ordinary write transaction."""
        if self.dialect == "sqlite":
            return await self.run_tx(fn)
        return await self._run_in_tx(fn, lambda conn: conn.execute("BEGIN"))

    async def _run_in_tx(self, fn: Callable[[Any], T], begin: Callable[[Any], object]) -> T:
        def in_tx(conn: Any) -> T:
            begin(conn)
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        async with self._lock:
            return await _on_db_thread(self._db, in_tx)

    def transaction(self) -> Any:
        """`async with store.transaction() as tx:` one BEGIN IMMEDIATE write transaction."""
        return _Serialised(self)

    # ---- reads ----------------------------------------------------------------------------

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        return await _on_db_thread(self._db, lambda conn: _read_all(conn, sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        rows = await _on_db_thread(self._db, lambda conn: _read_all(conn, sql, params, 1))
        return rows[0] if rows else None

    async def get_state(self, key: str) -> str | None:
        row = await self.fetchone("SELECT value FROM sync_state WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    async def states(self) -> dict[str, str]:
        return {r[0]: r[1] for r in await self.fetchall("SELECT key, value FROM sync_state")}

    async def get(self, kind: str, entity_id: int) -> dict[str, Any] | None:
        table = TABLES[kind]
        row = await self.fetchone(f"SELECT * FROM {table.name} WHERE id = ?", (entity_id,))
        return None if row is None else dict(row)

    async def ids(self, kind: str) -> set[int]:
        return {r[0] for r in await self.fetchall(f"SELECT id FROM {TABLES[kind].name}")}

    async def present(self, kind: str, ids: Iterable[Any]) -> set[int]:
        """Those of `ids` the mirror holds (anything that is no id is left out)."""
        wanted = sorted({i for i in ids if isinstance(i, int) and not isinstance(i, bool)})
        found: set[int] = set()
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ", ".join("?" for _ in part)
            rows = await self.fetchall(
                f"SELECT id FROM {TABLES[kind].name} WHERE id IN ({marks})", part
            )
            found.update(r[0] for r in rows)
        return found

    async def index(
        self, kind: str, columns: Sequence[str], *, ids: Sequence[int] | None = None
    ) -> dict[int, dict[str, Any]]:
        """What a diff sync compares against a listing: id → the given columns + fetched_at,
        of every row or of those `ids` (at most a listing page's worth)."""
        table = TABLES[kind]
        computed = {
            "users_count": "(SELECT count(*) FROM user_roles ur WHERE ur.role_id = roles.id)",
            "permissions_count": "json_array_length(permissions)",
        }
        select = ", ".join(
            f"{computed[c]} AS {c}" if c in computed else _q(c) for c in ("id", *columns)
        )
        sql = f"SELECT {select}, fetched_at FROM {table.name}"
        if ids is None:
            return {r["id"]: dict(r) for r in await self.fetchall(sql)}
        found: dict[int, dict[str, Any]] = {}
        wanted = list(ids)
        for start in range(0, len(wanted), 500):  # bound the statement's parameters
            part = wanted[start : start + 500]
            marks = ", ".join("?" for _ in part)
            for r in await self.fetchall(f"{sql} WHERE id IN ({marks})", part):
                found[r["id"]] = dict(r)
        return found

    async def includers(self, page_ids: Iterable[int]) -> set[int]:
        """Pages whose rendered html embeds one of `page_ids` through a `{{@id}}` include
        (FACTS 2.5: they change with it, and BookStack says nothing about them)."""
        wanted = set(page_ids)
        if not wanted:
            return set()
        rows = await self.fetchall("SELECT id, raw_html FROM pages WHERE raw_html LIKE '%{{@%'")
        return {
            r[0]
            for r in rows
            if r[0] not in wanted and wanted & {int(i) for i in INCLUDE.findall(r[1] or "")}
        }

    async def path_of(self, kind: str, entity_id: int) -> str | None:
        """The item's URL path as BookStack builds it, from the mirror (None if unknown)."""
        if kind in ("shelf", "book"):
            row = await self.fetchone(
                f"SELECT slug FROM {TABLES[kind].name} WHERE id = ?", (entity_id,)
            )
            if row is None:
                return None
            return f"/shelves/{row[0]}" if kind == "shelf" else f"/books/{row[0]}"
        if kind not in ("chapter", "page"):
            return None
        row = await self.fetchone(
            f"SELECT t.slug, b.slug FROM {TABLES[kind].name} t "
            "LEFT JOIN books b ON b.id = t.book_id WHERE t.id = ?",
            (entity_id,),
        )
        if row is None or row[1] is None:
            return None
        return f"/books/{row[1]}/{kind}/{row[0]}"

    async def pages_linking(self, path: str, page_ids: Iterable[int] = ()) -> set[int]:
        """Pages whose content links to `path` (or, for a book, below it), or to one of
        `page_ids` by permalink (`/link/{id}`): BookStack rewrites those pages silently when
        the item's URL changes, and saves them (revision_count + 1) even when a permalink
        needed no rewriting (FACTS 2.5, ReferenceUpdater)."""
        wanted = {str(i) for i in page_ids}
        pattern = re.compile(re.escape(path) + r"(?![\w-])")
        like = f"%{path}%"
        rows = await self.fetchall(
            "SELECT id, raw_html, markdown FROM pages WHERE raw_html LIKE ? OR markdown LIKE ? "
            "OR (? = 1 AND (raw_html LIKE '%/link/%' OR markdown LIKE '%/link/%'))",
            (like, like, bool(wanted)),
        )
        found = set()
        for page_id, html, markdown in rows:
            text = f"{html or ''}\n{markdown or ''}"
            if pattern.search(text) or wanted & set(PERMALINK.findall(text)):
                found.add(page_id)
        return found

    async def books_sorted_by(self, rule_id: int) -> list[int]:
        rows = await self.fetchall(
            "SELECT id FROM books WHERE sort_rule_id = ? ORDER BY id", (rule_id,)
        )
        return [r[0] for r in rows]

    async def pages_of_book(self, book_id: int) -> set[int]:
        rows = await self.fetchall("SELECT id FROM pages WHERE book_id = ?", (book_id,))
        return {r[0] for r in rows}

    async def pages_with_includes(self) -> list[int]:
        rows = await self.fetchall("SELECT id FROM pages WHERE raw_html LIKE '%{{@%' ORDER BY id")
        return [r[0] for r in rows]

    async def shelves_of_returned_books(self) -> set[int]:
        """Shelves that held a book which went away and is back in the mirror (restored
        from the recycle bin): BookStack shows it on them again, silently."""
        rows = await self.fetchall(
            "SELECT DISTINCT t.shelf_id FROM shelf_book_tombstones t "
            "JOIN books b ON b.id = t.book_id JOIN shelves s ON s.id = t.shelf_id"
        )
        return {r[0] for r in rows}

    async def owned_by(self, user_id: int) -> list[tuple[str, int]]:
        """Items whose content permissions name `user_id` as their owner."""
        rows = await self.fetchall(
            "SELECT content_type, content_id FROM content_permissions WHERE owner_id = ? "
            "ORDER BY content_type, content_id",
            (user_id,),
        )
        return [(r[0], r[1]) for r in rows]

    async def role_members(self, role_id: int) -> set[int]:
        rows = await self.fetchall("SELECT user_id FROM user_roles WHERE role_id = ?", (role_id,))
        return {r[0] for r in rows}

    async def permission_keys(self) -> set[tuple[str, int]]:
        rows = await self.fetchall("SELECT content_type, content_id FROM content_permissions")
        return {(r[0], r[1]) for r in rows}

    async def dangling(self) -> dict[str, int]:
        """How many rows of each relation name something the mirror does not hold."""
        out = {}
        for what, (table, where) in DANGLING.items():
            row = await self.fetchone(f"SELECT count(*) FROM {table} WHERE {where}")
            if row and row[0]:
                out[what] = int(row[0])
        return out

    async def restricted_keys(self) -> set[tuple[str, int]]:
        """Items whose content permissions are not the default (not inheriting, or with a
        role row): BookStack's `{is_restricted}`, as the mirror knows it."""
        rows = await self.fetchall(
            f"SELECT content_type, content_id FROM content_permissions cp WHERE {_RESTRICTED}"
        )
        return {(r[0], r[1]) for r in rows}

    async def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind, table in TABLES.items():
            row = await self.fetchone(f"SELECT count(*) FROM {table.name}")
            out[kind] = int(row[0]) if row else 0
        row = await self.fetchone(
            f"SELECT count(*) FROM content_permissions cp WHERE {_RESTRICTED}"
        )
        out["permissions"] = int(row[0]) if row else 0
        return out

    async def changes(self, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = await self.fetchall(
            "SELECT seq, changed_at, op, entity, entity_id, content_type, data FROM changes "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        out = []
        for r in rows:
            item = dict(r)
            item["data"] = json.loads(item["data"]) if item["data"] else None
            if item["content_type"] is None:
                del item["content_type"]
            out.append(item)
        return out

    async def last_seq(self) -> int:
        row = await self.fetchone("SELECT max(seq) FROM changes")
        return int(row[0] or 0) if row else 0

    async def export(self) -> dict[str, Any]:
        """The canonical export document of DESIGN.md, every list sorted by id."""
        shelf_books: dict[int, list[int]] = {}
        for r in await self.fetchall(
            "SELECT shelf_id, book_id FROM shelf_books ORDER BY shelf_id, position"
        ):
            shelf_books.setdefault(r[0], []).append(r[1])
        user_roles: dict[int, list[int]] = {}
        role_users: dict[int, list[int]] = {}
        for r in await self.fetchall("SELECT user_id, role_id FROM user_roles ORDER BY 1, 2"):
            user_roles.setdefault(r[0], []).append(r[1])
            role_users.setdefault(r[1], []).append(r[0])
        for members in role_users.values():
            members.sort()

        def tags(raw: str | None) -> list[dict[str, Any]]:
            return [
                {"name": t.get("name"), "value": t.get("value")} for t in json.loads(raw or "[]")
            ]

        relations: dict[str, Any] = {
            "books": lambda r: shelf_books.get(r["id"], []),
            "roles": lambda r: user_roles.get(r["id"], []),
            "users": lambda r: role_users.get(r["id"], []),
            "tags": lambda r: tags(r["tags"]),
            "permissions": lambda r: json.loads(r["permissions"]),
        }
        doc: dict[str, Any] = {}
        for section, (table, fields) in EXPORT_SECTIONS.items():
            rows = await self.fetchall(f"SELECT * FROM {table} ORDER BY id")
            doc[section] = [{f: _export_value(f, r, relations) for f in fields} for r in rows]
        role_rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in await self.fetchall(
            "SELECT * FROM content_role_permissions ORDER BY content_type, content_id, role_id"
        ):
            role_rows.setdefault((r["content_type"], r["content_id"]), []).append(
                {
                    "role_id": r["role_id"],
                    "view": bool(r["view"]),
                    "create": bool(r["create"]),
                    "update": bool(r["update"]),
                    "delete": bool(r["delete"]),
                }
            )

        def flag(value: int | None) -> bool | None:
            return None if value is None else bool(value)

        perms = []
        for r in await self.fetchall("SELECT * FROM content_permissions"):
            key = (r["content_type"], r["content_id"])
            if r["inheriting"] and not role_rows.get(key):
                continue
            perms.append(
                {
                    "content_type": r["content_type"],
                    "content_id": r["content_id"],
                    "owner_id": r["owner_id"],
                    "inheriting": bool(r["inheriting"]),
                    "fallback": {
                        "view": flag(r["fallback_view"]),
                        "create": flag(r["fallback_create"]),
                        "update": flag(r["fallback_update"]),
                        "delete": flag(r["fallback_delete"]),
                    },
                    "role_permissions": role_rows.get(key, []),
                }
            )
        # DESIGN: every list sorted by id; a permission's id is (content_type, content_id).
        perms.sort(key=lambda p: (p["content_type"], p["content_id"]))
        doc["permissions"] = perms
        return doc

    # ---- effective access ---------------------------------------------------------------------

    async def _on_access(self, fn: Callable[[sqlite3.Connection, AccessCache], T]) -> T:
        cache = self._access_cache
        return await _on_db_thread(self._db, lambda conn: fn(conn, cache))

    async def access_of(self, content_type: str, content_id: int) -> dict[str, Any] | None:
        """The item's joint_permissions rows per role and the users who can view it (None:
        the mirror does not hold it)."""
        return await self._on_access(
            lambda conn, cache: access_sql.item_access(conn, cache, content_type, content_id)
        )

    async def visible_ids(
        self, user_id: int, content_type: str, after: int = 0, limit: int | None = None
    ) -> list[int]:
        """Ids of the items of one type the user can view, ascending, after `after`."""
        return await self._on_access(
            lambda conn, _cache: access_sql.visible_ids(conn, user_id, content_type, after, limit)
        )

    async def access_chain(self, content_type: str, content_id: int) -> Any:
        """(chain of levels with their rows, owner id) of one item, or None: what decides its
        access, for saying why."""
        return await self._on_access(
            lambda conn, _cache: access_sql.chain_of(conn, content_type, content_id)
        )

    async def access_roles(self) -> dict[int, Any]:
        """The roles as access sees them (eventsync.access.Role), by id."""

        def read(conn: sqlite3.Connection, cache: AccessCache) -> dict[int, Any]:
            cache.sync(conn)
            return dict(cache.roles)

        return await self._on_access(read)

    async def access_problem(self) -> str | None:
        """Why effective access cannot be answered from this mirror (None: it can): see
        eventsync.access.token_problem."""
        synced = await self.get_state(LAST_FULL_SYNC) is not None
        refused = await self.get_state(SYNC_FORBIDDEN)
        candidates = await self._on_access(access_sql.token_candidates)
        return token_problem(synced, candidates, refused.partition(" ")[2] if refused else None)

    async def user_role_ids(self, user_id: int) -> list[int]:
        rows = await self.fetchall(
            "SELECT role_id FROM user_roles WHERE user_id = ? ORDER BY role_id", (user_id,)
        )
        return [r[0] for r in rows]

    async def export_as_user(self, user_id: int) -> dict[str, Any]:
        """The content sections of the export as one user sees them through BookStack's API
        (DESIGN: Effective access): what they can view, shelves' book lists of the books
        they can view, attachments of the pages they can view, pages rendered for them."""
        doc = await self.export()
        visible = {
            section: set(await self.visible_ids(user_id, content_type))
            for section, content_type in (
                ("shelves", "bookshelf"),
                ("books", "book"),
                ("chapters", "chapter"),
                ("pages", "page"),
            )
        }
        out: dict[str, Any] = {
            section: [row for row in doc[section] if row["id"] in ids]
            for section, ids in visible.items()
        }
        for shelf in out["shelves"]:
            shelf["books"] = [b for b in shelf["books"] if b in visible["books"]]
        out["attachments"] = [a for a in doc["attachments"] if a["uploaded_to"] in visible["pages"]]
        raw = {p["id"]: p["raw_html"] for p in doc["pages"]}
        for page in out["pages"]:
            page["html"] = _rendered_for(page, raw, visible["pages"])
        return out


class _Serialised:
    """Serialises writers inside one process; BEGIN IMMEDIATE serialises across processes."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cm: Any = None

    async def __aenter__(self) -> Tx:
        lock = self._store._lock
        await lock.acquire()
        try:
            self._cm = self._store._write()
            return await self._cm.__aenter__()
        except BaseException:
            lock.release()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._cm.__aexit__(*exc)
        finally:
            self._store._lock.release()


class Tx:
    """Writes inside one transaction. Every mirror change appends to the change feed here."""

    def __init__(self, db: aiosqlite.Connection, access_cache: AccessCache | None = None) -> None:
        self._db = db
        self._now = _now_iso()
        self.changed = 0
        # What this transaction changed among the inputs of access; worked out at commit.
        self.access = AccessChanges()
        self._access_cache = access_cache or AccessCache()
        self.access_stats = access_sql.FlushStats()

    async def flush_access(self) -> access_sql.FlushStats:
        """Bring the access tables (and the feed's `access` rows) up to date with this
        transaction's changes; the store does it before every commit."""
        changes, self.access = self.access, AccessChanges()
        if not changes:
            return access_sql.FlushStats()
        cache, now = self._access_cache, self._now
        stats = await self.run(lambda conn: access_sql.flush(conn, cache, changes, now))
        self.changed += stats.changes
        self.access_stats = stats
        return stats

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Cursor:
        return await self._db.execute(sql, params)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the database thread inside this transaction, in one hop."""
        return await _on_db_thread(self._db, fn)

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        return await _on_db_thread(self._db, lambda conn: _read_all(conn, sql, params))

    fetchall = _rows

    async def change(
        self,
        op: str,
        entity: str,
        entity_id: int,
        *,
        content_type: str | None = None,
        data: Any = None,
    ) -> None:
        self.changed += 1
        payload = None if data is None else json.dumps(data, sort_keys=True)

        def record(conn: sqlite3.Connection) -> None:
            # The row as this change left it, read in its transaction: a delivery made later
            # says what this change did, not what a later one did (store/states.py). One hop
            # to the database thread, as the INSERT alone took.
            state = change_state(conn, op, entity, entity_id, content_type, data)
            conn.execute(
                "INSERT INTO changes (changed_at, op, entity, entity_id, content_type, data, "
                "state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self._now, op, entity, entity_id, content_type, payload, state),
            )

        await self.run(record)

    async def record_covered(self, events: Sequence[Any], now: float) -> None:
        """Mark audit rows as covered by the diff sync that read their entities after them."""
        from eventsync.store.queue import record_covered_sync

        await self.run(lambda conn: record_covered_sync(conn, events, now))

    async def set_state(self, key: str, value: str | int | float) -> None:
        await self._db.execute(
            "INSERT INTO sync_state (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    async def delete_state(self, key: str) -> None:
        await self._db.execute("DELETE FROM sync_state WHERE key = ?", (key,))

    async def get_state(self, key: str) -> str | None:
        rows = await self._rows("SELECT value FROM sync_state WHERE key = ?", (key,))
        return None if not rows else str(rows[0][0])

    # ---- entities ---------------------------------------------------------------------------

    async def exists(self, kind: str, entity_id: Any) -> bool:
        if not isinstance(entity_id, int):
            return False
        rows = await self._rows(f"SELECT 1 FROM {TABLES[kind].name} WHERE id = ?", (entity_id,))
        return bool(rows)

    async def _mirrored(self, kind: str, ids: Iterable[int]) -> set[int]:
        """Those of `ids` the mirror holds."""
        wanted = sorted(set(ids))
        if not wanted:
            return set()
        marks = ", ".join("?" for _ in wanted)
        rows = await self._rows(f"SELECT id FROM {TABLES[kind].name} WHERE id IN ({marks})", wanted)
        return {r[0] for r in rows}

    async def _fetched_at(self, kind: str, entity_id: int) -> float | None:
        rows = await self._rows(
            f"SELECT fetched_at FROM {TABLES[kind].name} WHERE id = ?", (entity_id,)
        )
        return None if not rows else float(rows[0][0])

    async def upsert(self, kind: str, row: dict[str, Any], read_at: float | None = None) -> str:
        """Write one entity read at `read_at` (when its request was sent; default now).
        Returns 'created', 'updated', 'unchanged', or 'stale' when the mirror already holds
        a newer read of it (a slow or queued older read must not undo a newer one)."""
        table = TABLES[kind]
        read_at = time.time() if read_at is None else read_at
        if kind == "attachment" and not await self.exists("page", row.get("uploaded_to")):
            # BookStack lists the attachments of binned pages (FACTS, first section); the
            # mirror holds none of a page it does not hold (DESIGN 13). The page's return
            # re-lists them.
            return "orphan"
        values = {c: row.get(c) for c in table.columns}
        for c in table.json_columns:
            if not isinstance(values[c], str):
                values[c] = json.dumps(values[c] if values[c] is not None else [])
        for c, v in values.items():
            if isinstance(v, bool):
                values[c] = int(v)
        placement = PLACEMENT.get(kind, ())
        extra = ", placed_at" if placement else ""
        existing = await self._rows(
            f"SELECT {', '.join(_q(c) for c in table.columns)}, fetched_at{extra} "
            f"FROM {table.name} WHERE id = ?",
            (row["id"],),
        )
        outcome = "created"
        if existing:
            current = dict(existing[0])
            if newer(current.pop("fetched_at"), read_at):
                return "stale"
            if "owned_by" in values and values["owned_by"] is None:
                # A read shows the owner as a user object, null once that user is deleted;
                # BookStack's owned_by column keeps the id (it is never null), and its
                # joint_permissions rows with it, as the listings show it.
                values["owned_by"] = current["owned_by"]
            if kind in CONTENT_TYPES:
                # A read of its content permissions after this one named the owner later.
                later = await self._rows(
                    "SELECT owner_id FROM content_permissions WHERE content_type = ? AND "
                    "content_id = ? AND owner_id IS NOT NULL AND fetched_at > ?",
                    (CONTENT_TYPES[kind], row["id"], read_at),
                )
                if later:
                    values["owned_by"] = later[0][0]
            if newer(current.pop("placed_at", None), read_at):
                # Moved since this read was sent: the move's placement stands.
                values.update({c: current[c] for c in placement})
            outcome = "unchanged" if current == values else "updated"
        if outcome == "unchanged":
            await self._db.execute(
                f"UPDATE {table.name} SET fetched_at = ? WHERE id = ?", (read_at, row["id"])
            )
        else:
            cols = ("id", *table.columns, "fetched_at")
            await self._db.execute(
                f"INSERT INTO {table.name} ({', '.join(_q(c) for c in cols)}) "
                f"VALUES ({', '.join('?' for _ in cols)}) ON CONFLICT (id) DO UPDATE SET "
                + ", ".join(f"{_q(c)} = excluded.{_q(c)}" for c in cols[1:]),
                (row["id"], *values.values(), read_at),
            )
            await self.change("upsert", kind, row["id"])
        if placement:
            await self._db.execute(
                f"UPDATE {table.name} SET read_updated_at = ? WHERE id = ?",
                (row.get("updated_at"), row["id"]),
            )
        if kind in CONTENT_TYPES and outcome != "unchanged":
            await self._newest_owner(CONTENT_TYPES[kind], row["id"], values["owned_by"], read_at)
            self.access.items.add((CONTENT_TYPES[kind], row["id"]))
        elif kind == "role" and outcome != "unchanged":
            self.access.roles.add(row["id"])
        return outcome

    async def _newest_owner(
        self, content_type: str, content_id: int, owner_id: int | None, read_at: float
    ) -> None:
        """The item's owner, from a read at `read_at`, wherever an older read holds another:
        its content permissions' owner_id (an item read shows a migration first) or the
        item's owned_by (a permissions read shows an owner changed through them first)."""
        if owner_id is None:
            return  # the read could not name the owner (a deleted user): nothing learnt
        cur = await self._db.execute(
            "UPDATE content_permissions SET owner_id = ? WHERE content_type = ? AND "
            "content_id = ? AND owner_id IS NOT ? AND fetched_at <= ?",
            (owner_id, content_type, content_id, owner_id, read_at),
        )
        if cur.rowcount:
            await self.change("upsert", "permissions", content_id, content_type=content_type)
        kind = KIND_OF_CONTENT_TYPE[content_type]
        cur = await self._db.execute(
            f"UPDATE {TABLES[kind].name} SET owned_by = ? WHERE id = ? AND owned_by IS NOT ? "
            "AND fetched_at <= ?",
            (owner_id, content_id, owner_id, read_at),
        )
        if cur.rowcount:
            await self.change("upsert", kind, content_id)

    async def patch(
        self, kind: str, entity_id: int, fields: dict[str, Any], read_at: float | None = None
    ) -> bool:
        """Change some columns of an existing row (placement after a move or sort) from a
        parent's read at `read_at`; skipped when the row itself was read after that. The
        row's fetched_at stays: its content was not read."""
        table = TABLES[kind]
        unknown = set(fields) - set(table.columns)
        if unknown:
            raise ValueError(f"not columns of {table.name}: {sorted(unknown)}")
        read_at = time.time() if read_at is None else read_at
        rows = await self._rows(
            f"SELECT fetched_at, placed_at FROM {table.name} WHERE id = ?", (entity_id,)
        )
        if not rows or newer(rows[0][0], read_at) or newer(rows[0][1], read_at):
            return False
        # placed_at: an older read of the item itself must not put the old placement back.
        cur = await self._db.execute(
            f"UPDATE {table.name} SET "
            + ", ".join(f"{_q(c)} = ?" for c in fields)
            + ", placed_at = ? WHERE id = ?",
            (*fields.values(), read_at, entity_id),
        )
        if cur.rowcount:
            await self.change("upsert", kind, entity_id)
            if kind in CONTENT_TYPES and {"book_id", "chapter_id"} & set(fields):
                self.access.items.add((CONTENT_TYPES[kind], entity_id))
        return bool(cur.rowcount)

    async def remove_dangling(self) -> dict[str, int]:
        """Remove what names something the mirror does not hold, each removal in the change
        feed like any other; returns what was removed, by relation."""
        removed: dict[str, int] = {}
        for what, (table, where) in DANGLING.items():
            if table == "attachments":
                ids = [r[0] for r in await self._rows(f"SELECT id FROM {table} WHERE {where}")]
                for attachment_id in ids:
                    await self.delete("attachment", attachment_id)
            elif table == "shelf_books":
                rows = await self._rows(f"SELECT DISTINCT shelf_id FROM {table} WHERE {where}")
                ids = [r[0] for r in rows]
                for shelf_id in ids:
                    books = await self._shelf_book_ids(shelf_id)
                    held = await self._mirrored("book", books)
                    if await self.exists("shelf", shelf_id):
                        await self.set_shelf_books(shelf_id, [b for b in books if b in held])
                    else:
                        await self._db.execute(
                            "DELETE FROM shelf_books WHERE shelf_id = ?", (shelf_id,)
                        )
            elif table == "user_roles":
                rows = await self._rows(f"SELECT user_id, role_id FROM {table} WHERE {where}")
                ids = rows
                for user_id, role_id in rows:
                    await self._db.execute(
                        "DELETE FROM user_roles WHERE user_id = ? AND role_id = ?",
                        (user_id, role_id),
                    )
                    await self.change("delete", "user_role", user_id, data={"role_id": role_id})
                    self.access.membership(user_id, role_id, True)
            elif table == "content_permissions":
                rows = await self._rows(
                    f"SELECT content_type, content_id FROM {table} WHERE {where}"
                )
                ids = rows
                for content_type, content_id in rows:
                    await self.delete_permissions(content_type, content_id)
            else:
                rows = await self._rows(
                    f"SELECT DISTINCT content_type, content_id FROM {table} WHERE {where}"
                )
                ids = rows
                await self._db.execute(f"DELETE FROM {table} WHERE {where}")
                for content_type, content_id in rows:
                    await self.change(
                        "upsert", "permissions", content_id, content_type=content_type
                    )
                    self.access.items.add((content_type, content_id))
                    self.access.subtrees.add((content_type, content_id))
            if ids:
                removed[what] = len(ids)
        return removed

    async def set_owner(
        self,
        kind: str,
        entity_id: int,
        owner_id: int,
        updated_at: str | None,
        read_at: float,
    ) -> bool:
        """An item's new owner (and the updated_at its migration set) from a listing row read
        at `read_at`, which confirms the row (fetched_at); the item's own newer read stands.
        A page's or chapter's read_updated_at stays: its content was not read."""
        table = TABLES[kind]
        rows = await self._rows(
            f"SELECT fetched_at, owned_by, updated_at FROM {table.name} WHERE id = ?",
            (entity_id,),
        )
        if not rows or newer(rows[0][0], read_at):
            return False
        if (rows[0][1], rows[0][2]) == (owner_id, updated_at):
            return False
        await self._db.execute(
            f"UPDATE {table.name} SET owned_by = ?, updated_at = ?, fetched_at = ? WHERE id = ?",
            (owner_id, updated_at, read_at, entity_id),
        )
        await self.change("upsert", kind, entity_id)
        self.access.items.add((CONTENT_TYPES[kind], entity_id))
        cur = await self._db.execute(
            "UPDATE content_permissions SET owner_id = ? WHERE content_type = ? "
            "AND content_id = ? AND owner_id IS NOT ?",
            (owner_id, CONTENT_TYPES[kind], entity_id, owner_id),
        )
        if cur.rowcount:
            await self.change("upsert", "permissions", entity_id, content_type=CONTENT_TYPES[kind])
        return True

    async def forget_tombstones(self, shelf_ids: Iterable[int]) -> None:
        """These shelves are being re-read: what they show now is the truth."""
        await self._db.executemany(
            "DELETE FROM shelf_book_tombstones WHERE shelf_id = ? AND book_id IN "
            "(SELECT id FROM books)",
            [(s,) for s in shelf_ids],
        )

    async def touch(self, kind: str, entity_id: int) -> None:
        await self._db.execute(
            f"UPDATE {TABLES[kind].name} SET fetched_at = ? WHERE id = ?",
            (time.time(), entity_id),
        )

    async def delete(self, kind: str, entity_id: int, read_at: float | None = None) -> int:
        """Remove an entity found gone by a read sent at `read_at` (default now), and what
        BookStack hides with it; returns entities removed. An entity (or child) read after
        that moment is left alone: the newer read is the truth."""
        table = TABLES[kind]
        if read_at is not None and newer(await self._fetched_at(kind, entity_id), read_at):
            return 0
        removed = 0
        if kind == "book":
            for (chapter_id,) in await self._rows(
                "SELECT id FROM chapters WHERE book_id = ?", (entity_id,)
            ):
                removed += await self.delete("chapter", chapter_id, read_at)
            for (page_id,) in await self._rows(
                "SELECT id FROM pages WHERE book_id = ?", (entity_id,)
            ):
                removed += await self.delete("page", page_id, read_at)
            for (shelf_id,) in await self._rows(
                "SELECT shelf_id FROM shelf_books WHERE book_id = ?", (entity_id,)
            ):
                books = [b for b in await self._shelf_book_ids(shelf_id) if b != entity_id]
                await self.set_shelf_books(shelf_id, books)
                await self._db.execute(
                    "INSERT INTO shelf_book_tombstones (book_id, shelf_id) VALUES (?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (entity_id, shelf_id),
                )
        elif kind == "chapter":
            for (page_id,) in await self._rows(
                "SELECT id FROM pages WHERE chapter_id = ?", (entity_id,)
            ):
                removed += await self.delete("page", page_id, read_at)
        elif kind == "page":
            for (attachment_id,) in await self._rows(
                "SELECT id FROM attachments WHERE uploaded_to = ?", (entity_id,)
            ):
                removed += await self.delete("attachment", attachment_id, read_at)
        elif kind == "shelf":
            await self._db.execute("DELETE FROM shelf_books WHERE shelf_id = ?", (entity_id,))
            await self._db.execute(
                "DELETE FROM shelf_book_tombstones WHERE shelf_id = ?", (entity_id,)
            )
        elif kind == "user":
            await self.set_user_roles(entity_id, [])
        elif kind == "role":
            await self.set_role_users(entity_id, [])
            for r in await self._rows(
                "SELECT content_type, content_id FROM content_role_permissions WHERE role_id = ?",
                (entity_id,),
            ):
                await self._db.execute(
                    "DELETE FROM content_role_permissions WHERE content_type = ? AND "
                    "content_id = ? AND role_id = ?",
                    (r[0], r[1], entity_id),
                )
                await self.change("upsert", "permissions", r[1], content_type=r[0])
        if kind in CONTENT_TYPES:
            await self.delete_permissions(CONTENT_TYPES[kind], entity_id)
        cur = await self._db.execute(f"DELETE FROM {table.name} WHERE id = ?", (entity_id,))
        if cur.rowcount:
            removed += 1
            await self.change("delete", kind, entity_id)
            if kind in CONTENT_TYPES:
                self.access.items.add((CONTENT_TYPES[kind], entity_id))
            elif kind == "role":
                # Its rows go; its content rows went above and decided only its own status.
                self.access.roles.add(entity_id)
        return removed

    # ---- relations --------------------------------------------------------------------------

    async def _shelf_book_ids(self, shelf_id: int) -> list[int]:
        rows = await self._rows(
            "SELECT book_id FROM shelf_books WHERE shelf_id = ? ORDER BY position", (shelf_id,)
        )
        return [r[0] for r in rows]

    async def set_shelf_books(self, shelf_id: int, book_ids: Sequence[int]) -> bool:
        """A shelf's books in order, as far as the mirror holds them (DESIGN 13). A book it
        lacks (created after its listing, say) is remembered: when it arrives, the shelf is
        read again (shelves_of_returned_books)."""
        book_ids = list(dict.fromkeys(book_ids))
        held = await self._mirrored("book", book_ids)
        missing = [b for b in book_ids if b not in held]
        if missing:
            await self._db.executemany(
                "INSERT INTO shelf_book_tombstones (book_id, shelf_id) VALUES (?, ?) "
                "ON CONFLICT DO NOTHING",
                [(b, shelf_id) for b in missing],
            )
            book_ids = [b for b in book_ids if b in held]
        if await self._shelf_book_ids(shelf_id) == book_ids:
            return False
        await self._db.execute("DELETE FROM shelf_books WHERE shelf_id = ?", (shelf_id,))
        await self._db.executemany(
            "INSERT INTO shelf_books (shelf_id, book_id, position) VALUES (?, ?, ?)",
            [(shelf_id, b, i) for i, b in enumerate(book_ids)],
        )
        await self.change("upsert", "shelf_books", shelf_id, data={"books": book_ids})
        return True

    async def _membership(self, column: str, key: int) -> set[int]:
        other = "role_id" if column == "user_id" else "user_id"
        rows = await self._rows(f"SELECT {other} FROM user_roles WHERE {column} = ?", (key,))
        return {r[0] for r in rows}

    async def _newer_than(self, column: str, others: Iterable[int], read_at: float) -> set[int]:
        """The other side's ids whose own membership list was read after `read_at`: a user's
        roles (from a user read) or a role's users (from a role read)."""
        ids = sorted(set(others))
        if not ids:
            return set()
        marks = ", ".join("?" for _ in ids)
        if column == "user_id":  # the others are roles
            sql = (
                f"SELECT id FROM roles WHERE id IN ({marks}) AND fetched_at > ? AND fetched_at <= ?"
            )
        else:
            sql = (
                f"SELECT id FROM users WHERE id IN ({marks}) AND roles_read_at > ? "
                "AND roles_read_at <= ?"
            )
        params = (*ids, read_at, time.time() + FUTURE_SLACK)
        return {r[0] for r in await self._rows(sql, params)}

    async def _set_membership(
        self, column: str, key: int, wanted: Iterable[int], read_at: float | None
    ) -> bool:
        # Only pairs whose both sides the mirror holds (DESIGN 13): the missing side's own
        # read brings the pair when it arrives (a user read names its roles, a role read
        # its users).
        wanted_set = await self._mirrored("role" if column == "user_id" else "user", wanted)
        if not await self.exists("user" if column == "user_id" else "role", key):
            wanted_set = set()
        current = await self._membership(column, key)
        # A pair whose other side was read more recently is left as that read said.
        newer = (
            set()
            if read_at is None
            else await self._newer_than(column, current ^ wanted_set, read_at)
        )
        changed = False
        for other in sorted(current - wanted_set - newer):
            user, role = (key, other) if column == "user_id" else (other, key)
            await self._db.execute(
                "DELETE FROM user_roles WHERE user_id = ? AND role_id = ?", (user, role)
            )
            await self.change("delete", "user_role", user, data={"role_id": role})
            self.access.membership(user, role, True)
            changed = True
        for other in sorted(wanted_set - current - newer):
            user, role = (key, other) if column == "user_id" else (other, key)
            await self._db.execute(
                "INSERT INTO user_roles (user_id, role_id) VALUES (?, ?)", (user, role)
            )
            await self.change("upsert", "user_role", user, data={"role_id": role})
            self.access.membership(user, role, False)
            changed = True
        return changed

    async def set_user_roles(
        self, user_id: int, role_ids: Iterable[int], read_at: float | None = None
    ) -> bool:
        """A user's roles as a read at `read_at` gave them. Applied even when the user's row
        was written from a newer listing (which carries no roles); skipped only when the
        user's roles were read after this."""
        known = await self._rows("SELECT roles_read_at FROM users WHERE id = ?", (user_id,))
        if read_at is not None and known and newer(known[0][0], read_at):
            return False
        changed = await self._set_membership("user_id", user_id, role_ids, read_at)
        await self._db.execute(
            "UPDATE users SET roles_read_at = ? WHERE id = ?",
            (time.time() if read_at is None else read_at, user_id),
        )
        return changed

    async def set_role_users(
        self, role_id: int, user_ids: Iterable[int], read_at: float | None = None
    ) -> bool:
        return await self._set_membership("role_id", role_id, user_ids, read_at)

    # ---- content permissions ----------------------------------------------------------------

    async def set_permissions(
        self,
        content_type: str,
        content_id: int,
        perms: dict[str, Any],
        read_at: float | None = None,
        fallback_owner: int | None = None,
        only_new: bool = False,
    ) -> bool:
        """perms: owner_id, inheriting, fallback {view,create,update,delete}, role_permissions,
        as read at `read_at` (default now); an older read than the stored one is ignored.

        BookStack answers `owner: null` when the owning user was deleted without handing
        their content on: the item's `owned_by` still names that user (the listings show
        it), so the owner we knew, or `fallback_owner` from a listing, is kept."""
        if not await self.exists(KIND_OF_CONTENT_TYPE[content_type], content_id):
            # Gone (or not yet arrived) since the read was planned: nothing to hang it on.
            return False
        fb = perms.get("fallback") or {}

        def flag(v: Any) -> int | None:
            return None if v is None else int(bool(v))

        owner_id = perms.get("owner_id")
        if owner_id is None:
            known = await self._rows(
                "SELECT owner_id FROM content_permissions WHERE content_type = ? "
                "AND content_id = ?",
                (content_type, content_id),
            )
            owner_id = known[0][0] if known and known[0][0] is not None else fallback_owner
        head = (
            owner_id,
            int(bool(perms.get("inheriting"))),
            flag(fb.get("view")),
            flag(fb.get("create")),
            flag(fb.get("update")),
            flag(fb.get("delete")),
        )
        # Rows of roles the mirror does not hold would name nothing (DESIGN 13); a deleted
        # role's rows vanish in BookStack too (FACTS §6).
        roles_held = await self._mirrored(
            "role", (int(r["role_id"]) for r in perms.get("role_permissions") or [])
        )
        roles = sorted(
            (
                int(r["role_id"]),
                int(bool(r["view"])),
                int(bool(r["create"])),
                int(bool(r["update"])),
                int(bool(r["delete"])),
            )
            for r in perms.get("role_permissions") or []
            if int(r["role_id"]) in roles_held
        )
        old_head = await self._rows(
            "SELECT owner_id, inheriting, fallback_view, fallback_create, fallback_update, "
            "fallback_delete, fetched_at FROM content_permissions WHERE content_type = ? "
            "AND content_id = ?",
            (content_type, content_id),
        )
        now = time.time() if read_at is None else read_at
        if old_head and (only_new or newer(old_head[0][6], now)):
            return False
        old_head = [tuple(old_head[0])[:6]] if old_head else []
        old_roles = [
            tuple(r)
            for r in await self._rows(
                'SELECT role_id, "view", "create", "update", "delete" FROM '
                "content_role_permissions WHERE content_type = ? AND content_id = ? "
                "ORDER BY role_id",
                (content_type, content_id),
            )
        ]
        if old_head and tuple(old_head[0]) == head and old_roles == roles:
            await self._db.execute(
                "UPDATE content_permissions SET fetched_at = ? WHERE content_type = ? "
                "AND content_id = ?",
                (now, content_type, content_id),
            )
            return False
        await self._db.execute(
            "INSERT INTO content_permissions (content_type, content_id, owner_id, inheriting, "
            "fallback_view, fallback_create, fallback_update, fallback_delete, fetched_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (content_type, content_id) DO UPDATE "
            "SET owner_id = excluded.owner_id, inheriting = excluded.inheriting, "
            "fallback_view = excluded.fallback_view, fallback_create = excluded.fallback_create, "
            "fallback_update = excluded.fallback_update, fallback_delete = "
            "excluded.fallback_delete, fetched_at = excluded.fetched_at",
            (content_type, content_id, *head, now),
        )
        await self._db.execute(
            "DELETE FROM content_role_permissions WHERE content_type = ? AND content_id = ?",
            (content_type, content_id),
        )
        await self._db.executemany(
            'INSERT INTO content_role_permissions (content_type, content_id, role_id, "view", '
            '"create", "update", "delete") VALUES (?, ?, ?, ?, ?, ?, ?)',
            [(content_type, content_id, *r) for r in roles],
        )
        await self.change("upsert", "permissions", content_id, content_type=content_type)
        await self._newest_owner(content_type, content_id, head[0], now)
        key = (content_type, content_id)
        self.access.items.add(key)
        if _view_rows(old_head[0][1:3] if old_head else (1, None), old_roles) != _view_rows(
            head[1:3], roles
        ):
            # The rows of a book or chapter are part of the chain of everything below it.
            self.access.subtrees.add(key)
        return True

    async def set_default_permissions(
        self, content_type: str, items: Sequence[tuple[int, int | None]], read_at: float
    ) -> int:
        """BookStack's default content permissions (inheriting, no rows of its own) for many
        items of one type, as a listing read at `read_at` named their owners, in one trip to
        the database thread; returns how many changed. The rules are set_permissions' own:
        only mirrored items, a newer stored read stands, an owner the listing does not name
        keeps the one known."""
        kind_table = TABLES[KIND_OF_CONTENT_TYPE[content_type]].name
        now = self._now

        def write(conn: sqlite3.Connection) -> list[tuple[int, bool]]:
            changed: list[tuple[int, bool]] = []  # (id, whether it had rows of its own)
            for content_id, owner in items:
                if (
                    conn.execute(
                        f"SELECT 1 FROM {kind_table} WHERE id = ?", (content_id,)
                    ).fetchone()
                    is None
                ):
                    continue
                row = conn.execute(
                    "SELECT owner_id, inheriting, fetched_at, EXISTS (SELECT 1 FROM "
                    "content_role_permissions r WHERE r.content_type = ? AND r.content_id = ?) "
                    "FROM content_permissions WHERE content_type = ? AND content_id = ?",
                    (content_type, content_id, content_type, content_id),
                ).fetchone()
                if row is not None and newer(row[2], read_at):
                    continue
                new_owner = owner if owner is not None else (row[0] if row else None)
                if row is not None and row[1] == 1 and not row[3] and row[0] == new_owner:
                    conn.execute(
                        "UPDATE content_permissions SET fetched_at = ? WHERE content_type = ? "
                        "AND content_id = ?",
                        (read_at, content_type, content_id),
                    )
                    continue
                conn.execute(
                    "DELETE FROM content_role_permissions WHERE content_type = ? "
                    "AND content_id = ?",
                    (content_type, content_id),
                )
                conn.execute(
                    "INSERT INTO content_permissions (content_type, content_id, owner_id, "
                    "inheriting, fallback_view, fallback_create, fallback_update, "
                    "fallback_delete, fetched_at) VALUES (?, ?, ?, 1, NULL, NULL, NULL, NULL, ?) "
                    "ON CONFLICT (content_type, content_id) DO UPDATE SET owner_id = "
                    "excluded.owner_id, inheriting = 1, fallback_view = NULL, fallback_create = "
                    "NULL, fallback_update = NULL, fallback_delete = NULL, fetched_at = "
                    "excluded.fetched_at",
                    (content_type, content_id, new_owner, read_at),
                )
                conn.execute(
                    "INSERT INTO changes (changed_at, op, entity, entity_id, content_type, data, "
                    "state) VALUES (?, 'upsert', 'permissions', ?, ?, NULL, ?)",
                    (
                        now,
                        content_id,
                        content_type,
                        change_state(conn, "upsert", "permissions", content_id, content_type, None),
                    ),
                )
                changed.append((content_id, row is not None and (row[1] != 1 or bool(row[3]))))
            return changed

        changed = await self.run(write)
        self.changed += len(changed)
        for content_id, had_rows in changed:
            key = (content_type, content_id)
            self.access.items.add(key)
            if had_rows:
                # The rows of a book or chapter are part of the chain of everything below it.
                self.access.subtrees.add(key)
        return len(changed)

    async def delete_permissions(self, content_type: str, content_id: int) -> None:
        await self._db.execute(
            "DELETE FROM content_role_permissions WHERE content_type = ? AND content_id = ?",
            (content_type, content_id),
        )
        cur = await self._db.execute(
            "DELETE FROM content_permissions WHERE content_type = ? AND content_id = ?",
            (content_type, content_id),
        )
        if cur.rowcount:
            await self.change("delete", "permissions", content_id, content_type=content_type)
            self.access.items.add((content_type, content_id))
            self.access.subtrees.add((content_type, content_id))


# PageIncludeParser's tag; what follows `#` names a section of the included page.
_INCLUDE_TAG = re.compile(r"\{\{@\s?([0-9].*?)\}\}")
# PageContent::render resolves includes three levels deep.
_INCLUDE_DEPTH = 3


def _included(html: str | None) -> set[int]:
    out = set()
    for ref in _INCLUDE_TAG.findall(html or ""):
        head = ref.split("#", 1)[0].strip()
        if head.isdigit():
            out.add(int(head))
    return out


def _rendered_for(page: dict[str, Any], raw: dict[int, str | None], visible: set[int]) -> Any:
    """A page's `html` as a user sees it. BookStack renders each include tag with the
    included page's content only when the viewer may see that page, and blank otherwise.
    Where every page the includes reach is visible, the sync user's rendering (the mirror's
    `html`) is the user's too. Where one is hidden, it is rendered again from `raw_html`
    with those includes blank; that follows BookStack's rule, not its HTML parser (a
    section include, `{{@12#id}}`, stands for the whole page there)."""
    reached: set[int] = set()
    frontier = _included(page["raw_html"])
    for _ in range(_INCLUDE_DEPTH):
        frontier -= reached
        if not frontier:
            break
        reached |= frontier
        frontier = set().union(*(_included(raw.get(i)) for i in frontier))
    if not {i for i in reached if i in raw} - visible:
        return page["html"]  # what the user cannot see is blank for the sync user too

    def render(html: str, depth: int) -> str:
        def include(match: re.Match[str]) -> str:
            head = match.group(1).split("#", 1)[0].strip()
            target = int(head) if head.isdigit() else None
            if target is None or target not in visible or depth >= _INCLUDE_DEPTH:
                return ""
            return render(raw.get(target) or "", depth + 1)

        return _INCLUDE_TAG.sub(include, html)

    return render(page["raw_html"] or "", 0)


def _view_rows(head: Sequence[Any], roles: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    """What of an item's content permissions decides viewing: the "everyone else" view when
    not inheriting, and each role row's view."""
    inheriting, fallback_view = head[0], head[1]
    return (None if inheriting else bool(fallback_view), tuple((r[0], r[1]) for r in roles))


async def _on_db_thread(db: Any, fn: Callable[[Any], T]) -> T:
    """Run `fn` on the connection's own thread, in one hop however many statements it makes."""
    if isinstance(db, aiosqlite.Connection):
        return await sqlite_driver.run(db, fn)
    return await db.run(fn)  # type: ignore[no-any-return]  # postgres.driver.Connection


def _read_all(conn: Any, sql: str, params: Sequence[Any], limit: int | None = None) -> list[Any]:
    """A whole read in one hop on the database thread. Split over hops (execute, then fetch,
    then close), a half-read SELECT would keep its WAL snapshot open while another task's
    BEGIN IMMEDIATE ran between them; once another process had committed, SQLite refuses that
    upgrade at once ("database is locked", SQLITE_BUSY_SNAPSHOT: no busy wait can help)."""
    cur = conn.execute(sql, params)
    try:
        return list(cur.fetchall() if limit is None else cur.fetchmany(limit))
    finally:
        cur.close()


def _begin_write(conn: Any) -> None:
    if isinstance(conn, sqlite3.Connection):
        sqlite_driver.begin_write(conn)
    else:
        pg_driver.begin_write(conn)


def announce(conn: Any, topic: str) -> None:
    """Tell listeners in other processes that `topic` ("changes", "jobs") has news, at commit.
    SQLite has no such channel: its readers in other processes poll."""
    if not isinstance(conn, sqlite3.Connection):
        pg_driver.notify(conn, topic)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
