"""One PostgreSQL connection driven the way aiosqlite drives SQLite: a thread of its own.

psycopg 3's synchronous connection runs on one dedicated thread, and the event loop hands it
work: a single statement, or a whole function of many statements in one hop (the access engine
and the webhook intake are written as such functions). The store therefore runs the same code on
both databases, with the same transaction semantics: one connection per process, writes
serialised in the process by the store and across processes by an advisory lock (see
`begin_write`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg

from eventsync.store.postgres.dialect import translate

T = TypeVar("T")

# The key of the transaction-level advisory lock every mirror write takes (see begin_write).
WRITE_LOCK = 0x6576_656E_7473_0001  # "events" + 1, a value no other application uses
MIGRATION_LOCK = 0x6576_656E_7473_0002

DEFAULT_SCHEMA = "eventsync"


class Row(tuple[Any, ...]):
    """A row that reads like sqlite3.Row: by position, by column name, and as a mapping."""

    _names: dict[str, int]

    def __new__(cls, values: Sequence[Any], names: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    names = {d.name: i for i, d in enumerate(cursor.description or ())}
    return lambda values: Row(values, names)


def _params(params: Sequence[Any] | None) -> tuple[Any, ...]:
    if not params:
        return ()
    # SQLite stores a bool as 0/1 in an INTEGER column; PostgreSQL refuses a bool there.
    return tuple(int(p) if isinstance(p, bool) else p for p in params)


class Cursor:
    """The cursor the store's synchronous code sees on the database thread."""

    def __init__(self, cur: psycopg.Cursor[Row]) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    @property
    def description(self) -> Any:
        return self._cur.description

    def fetchone(self) -> Row | None:
        return self._cur.fetchone() if self._cur.description else None

    def fetchall(self) -> list[Row]:
        return self._cur.fetchall() if self._cur.description else []

    def fetchmany(self, size: int) -> list[Row]:
        return self._cur.fetchmany(size) if self._cur.description else []

    def close(self) -> None:
        self._cur.close()

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())


class SyncConnection:
    """What a function run on the database thread gets: sqlite3.Connection's calls we use."""

    dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection[Row], schema: str) -> None:
        self._conn = conn
        self.schema = schema
        # Topics announced in the open transaction: one NOTIFY each, sent with the COMMIT
        # (a group commit of 50 webhooks announces "jobs" once, not 50 times).
        self.announced: set[str] = set()

    def execute(self, sql: str, params: Sequence[Any] | None = ()) -> Cursor:
        if sql == "COMMIT" and self.announced:
            topics, self.announced = sorted(self.announced), set()
            for topic in topics:
                self._conn.execute("SELECT pg_notify(%s, '')", (channel(self.schema, topic),))
        elif sql == "ROLLBACK":
            self.announced.clear()
        cur = self._conn.cursor()
        cur.execute(translate(sql), _params(params))
        return Cursor(cur)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Cursor:
        cur = self._conn.cursor()
        rows = [_params(p) for p in seq]
        if rows:
            cur.executemany(translate(sql), rows)
        return Cursor(cur)


class _Result:
    """aiosqlite's cursor, as far as the store uses it: awaitable fetches over fetched rows."""

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    async def fetchone(self) -> Row | None:
        return self._rows[0] if self._rows else None

    async def fetchall(self) -> list[Row]:
        return self._rows

    async def __aenter__(self) -> _Result:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Pending:
    """`await conn.execute(...)` and `async with conn.execute(...) as cur`, as aiosqlite."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._result: _Result | None = None

    def __await__(self) -> Any:
        return self._make().__await__()

    async def __aenter__(self) -> _Result:
        self._result = await self._make()
        return self._result

    async def __aexit__(self, *exc: object) -> None:
        return None


def conninfo(url: str, schema: str) -> tuple[str, dict[str, Any]]:
    """psycopg's connection string and options for an EVENTSYNC_DATABASE URL."""
    parts = urlsplit(url)
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "application_name": "eventsync",
        # Every table is the schema's own; the search path keeps the SQL free of prefixes.
        "options": f"-c search_path={schema}",
    }
    query = dict(parse_qsl(parts.query))
    # A URL without a port or host is libpq's: psycopg reads the rest of it.
    kwargs.update({k: v for k, v in query.items() if k not in ("options",)})
    base = parts._replace(query="").geturl()
    return base, kwargs


class Connection:
    """An aiosqlite-like async connection to PostgreSQL."""

    dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection[Row], schema: str) -> None:
        self._conn = conn
        self.schema = schema
        self._sync = SyncConnection(conn, schema)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventsync-pg")
        self._closed = threading.Event()

    @classmethod
    async def connect(cls, url: str, schema: str = DEFAULT_SCHEMA) -> Connection:
        base, kwargs = conninfo(url, schema)
        loop = asyncio.get_running_loop()

        def connect() -> psycopg.Connection[Row]:
            # Server-side binding: psycopg prepares a statement once it has run a few times,
            # so the intake's and the diff's repeated statements are not planned anew.
            conn = psycopg.connect(base, **kwargs)
            conn.row_factory = _row_factory  # type: ignore[assignment]
            return conn  # type: ignore[return-value]

        conn = await loop.run_in_executor(None, connect)
        return cls(conn, schema)

    async def run(self, fn: Callable[[SyncConnection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._sync)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Pending:
        def work(conn: SyncConnection) -> _Result:
            cur = conn.execute(sql, params)
            return _Result(cur.fetchall(), cur.rowcount)

        return _Pending(lambda: self.run(work))

    async def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> _Result:
        rows = list(seq)

        def work(conn: SyncConnection) -> _Result:
            cur = conn.executemany(sql, rows)
            return _Result([], cur.rowcount)

        return await self.run(work)

    async def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=False)


def begin_write(conn: SyncConnection) -> None:
    """Start a write transaction, serialised with every other writer on the database.

    SQLite's BEGIN IMMEDIATE has one writer at a time; this lock gives PostgreSQL the same, for
    a reason beyond the rules that read before they write: the change feed. A transaction takes
    its feed sequence numbers while holding the lock and releases it only after its commit is
    visible, so a reader that sees sequence n has already been able to see every number below
    it: no transaction can commit a lower number later (the outbox hole cannot open).
    """
    conn.execute("BEGIN")
    conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))


def redacted(url: str) -> str:
    """The URL with its password masked, for logs and `status`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    if netloc == parts.netloc:  # the password was percent-encoded in the URL
        netloc = netloc.replace(":" + unquote(parts.password) + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


async def migrate(db: Connection, migrations: Sequence[tuple[int, str]]) -> None:
    """Create the schema and bring it to the newest version, one replica at a time.

    Replicas started at once on an empty database queue on a session advisory lock; the first
    migrates, the others then find nothing left to do.
    """

    def work(conn: SyncConnection) -> None:
        raw = conn._conn
        raw.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            # Only when missing: an operator may create the schema for a user that may not
            # create schemas (CREATE on the database), and IF NOT EXISTS still asks for that.
            found = raw.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (db.schema,))
            if found.fetchone() is None:
                raw.execute(f'CREATE SCHEMA "{db.schema}"')
            raw.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {r[0] for r in raw.execute("SELECT version FROM schema_migrations")}
            for version, script in migrations:
                if version in applied:
                    continue
                with raw.transaction():
                    raw.execute(script)  # type: ignore[arg-type]  # our own file, no params
                    raw.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (version,)
                    )
        finally:
            raw.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))

    await db.run(work)


def channel(schema: str, topic: str) -> str:
    """The NOTIFY channel of one topic ("changes", "jobs") of the mirror in `schema`."""
    return f"{schema}_{topic}"


def notify(conn: SyncConnection, topic: str) -> None:
    """Announce `topic` to every listener once this transaction commits (sent with the
    COMMIT; PostgreSQL delivers a transaction's notifications when it commits)."""
    if conn._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        # Outside a transaction there is no COMMIT to send it with.
        conn._conn.execute("SELECT pg_notify(%s, '')", (channel(conn.schema, topic),))
        return
    conn.announced.add(topic)


class Listener:
    """LISTENs on the mirror's channels on a connection of its own and calls the callbacks of
    a topic when another transaction (in any process) announces it. After a lost connection
    it reconnects and calls every callback once, since notifications sent meanwhile are lost."""

    def __init__(self, url: str, schema: str, callbacks: dict[str, list[Callable[[], None]]]):
        self._url = url
        self._schema = schema
        self._callbacks = callbacks
        self.connected = asyncio.Event()

    def _fire(self, topic: str | None = None) -> None:
        for name, callbacks in self._callbacks.items():
            if topic is None or name == topic:
                for callback in list(callbacks):
                    callback()

    async def run(self) -> None:
        from eventsync.logging import get_logger

        log = get_logger("eventsync.store")
        base, kwargs = conninfo(self._url, self._schema)
        topics = {channel(self._schema, t): t for t in self._callbacks}
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(base, **kwargs)
                async with conn:
                    for name in topics:
                        await conn.execute(f'LISTEN "{name}"')
                    self.connected.set()
                    if failures:
                        log.info("listening for notifications again")
                    self._fire()
                    failures = 0
                    async for note in conn.notifies():
                        self._fire(topics.get(note.channel))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                failures += 1
                if failures == 1:
                    log.warning("the notification connection failed; reconnecting", error=str(exc))
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))
