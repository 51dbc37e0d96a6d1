"""SQLite's side of the store: opening the file, its settings, its migrations and its writers'
lock. The statements themselves are the store's (mirror.py, queue.py, ...), in SQLite's
spelling; PostgreSQL's differences are in ../postgres/dialect.py."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import aiosqlite

T = TypeVar("T")


def create_private_file(path: Path) -> None:
    """Create the database file readable by its owner only, before SQLite opens it."""
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)


async def connect(path: Path) -> aiosqlite.Connection:
    if str(path) != ":memory:":
        create_private_file(path)
    db = await aiosqlite.connect(str(path), isolation_level=None)
    db.row_factory = aiosqlite.Row
    try:
        await db.execute("PRAGMA busy_timeout = 30000")
        await db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode is durable against process crashes (kill -9); only an OS crash
        # can lose the last commits, and the audit log replays those.
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        await db.close()
        raise
    return db


async def run(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    # aiosqlite runs every call on its connection's own thread; _execute/_conn are how it does
    # so itself. Using them for a whole batch avoids one thread hop per statement.
    return await db._execute(fn, db._conn)  # type: ignore[no-any-return]


def begin_write(conn: sqlite3.Connection) -> None:
    # One writer at a time, across processes: the rules that read before they write and the
    # change feed's order both rest on it.
    conn.execute("BEGIN IMMEDIATE")


def split_sql(script: str) -> list[str]:
    """Split a migration into statements (our migrations keep ';' and '--' out of literals)."""
    lines = [ln.split("--", 1)[0] for ln in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


async def migrate(db: aiosqlite.Connection, migrations: Sequence[tuple[int, str]]) -> None:
    """Bring the file to the newest version, atomically: PRAGMA user_version is the version."""

    def work(conn: sqlite3.Connection) -> None:
        begin_write(conn)
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for version, script in migrations:
                if version > current:
                    # executescript() would COMMIT first; statement by statement stays atomic.
                    for statement in split_sql(script):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {int(version)}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    await run(db, work)
