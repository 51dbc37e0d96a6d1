"""The database a benchmark runs on (`--backend sqlite|postgres`, `--database URL`).

sqlite: a file in the benchmark's work folder, as `eventsync` makes it (WAL, synchronous=NORMAL).
postgres: a throwaway cluster of its own on 127.0.0.1 with fsync on (every commit a real
flush, as in production), or the server `--database` names, in a schema of the run's own that
is dropped afterwards. The benchmarks read what they check (the events table, the change feed)
through a connection of their own, as a downstream reader would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from eventsync.store.base import is_postgres_url
from eventsync.store.postgres.driver import DEFAULT_SCHEMA, redacted

BACKENDS = ("sqlite", "postgres")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="sqlite",
        help="the mirror's database: a SQLite file, or PostgreSQL (default: sqlite)",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="with --backend postgres: a postgresql:// URL to run on (in a schema of the run's "
        "own, dropped afterwards) instead of a throwaway cluster",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.database is None:
        return
    if args.backend != "postgres":
        parser.error("--database needs --backend postgres")
    if not is_postgres_url(args.database):
        parser.error("--database takes a postgresql://user:password@host:port/dbname URL")


class Database:
    """Where the mirror lives: what EVENTSYNC_DATABASE and EVENTSYNC_DATABASE_SCHEMA get."""

    def __init__(self, backend: str, url: str, schema: str, description: str) -> None:
        self.backend = backend
        self.url = url
        self.schema = schema
        self.description = description

    @property
    def is_postgres(self) -> bool:
        return self.backend == "postgres"

    def env(self) -> dict[str, str]:
        env = {"EVENTSYNC_DATABASE": self.url}
        if self.is_postgres:
            env["EVENTSYNC_DATABASE_SCHEMA"] = self.schema
        return env

    def settings(self) -> dict[str, Any]:
        """Keyword arguments of `Settings` for this database."""
        return {"database": self.url, "database_schema": self.schema}

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One read through a connection of its own (`?` placeholders on both backends)."""
        if not self.is_postgres:
            with contextlib.closing(sqlite3.connect(self.url)) as conn:
                return list(conn.execute(sql, params).fetchall())
        import psycopg

        with psycopg.connect(self.url, **_options(self.schema)) as conn:
            return list(conn.execute(sql.replace("?", "%s"), params).fetchall())  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[Reader]:
        """An async connection of its own for polling reads, as a downstream reader has."""
        if not self.is_postgres:
            import aiosqlite

            async with aiosqlite.connect(self.url) as conn:
                yield Reader(conn, "?")
            return
        import psycopg

        conn = await psycopg.AsyncConnection.connect(self.url, **_options(self.schema))
        async with conn:
            yield Reader(conn, "%s")


class Reader:
    def __init__(self, conn: Any, placeholder: str) -> None:
        self._conn = conn
        self._placeholder = placeholder

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cur = await self._conn.execute(sql.replace("?", self._placeholder), params)
        try:
            return await cur.fetchone()
        finally:
            await cur.close()


def _options(schema: str) -> dict[str, Any]:
    return {"autocommit": True, "options": f"-c search_path={schema}"}


@contextlib.asynccontextmanager
async def database(args: argparse.Namespace, workdir: Path, name: str) -> AsyncIterator[Database]:
    """The database of one run, for as long as the run lasts."""
    if args.backend == "sqlite":
        path = workdir / f"{name}.db"
        yield Database("sqlite", str(path), DEFAULT_SCHEMA, f"sqlite ({path})")
        return
    if args.database:
        # A server of the caller's: a schema of this run's own, so nothing of theirs is seen
        # or touched, and an empty mirror however often the benchmark runs.
        schema = f"bench_{name}_{secrets.token_hex(4)}"
        db = Database("postgres", args.database, schema, "")
        server = await asyncio.to_thread(_server, db)
        db.description = f"postgres {server} at {redacted(args.database)}, schema {schema}"
        try:
            yield db
        finally:
            await asyncio.to_thread(_drop_schema, db)
        return
    from eventsync.testing.postgres import PostgresCluster

    # durable=True: fsync and full-page writes on, so a commit costs a real flush.
    cluster = PostgresCluster(durable=True)
    await asyncio.to_thread(cluster.start)
    try:
        url = await asyncio.to_thread(cluster.new_database, name)
        db = Database("postgres", url, DEFAULT_SCHEMA, "")
        server = await asyncio.to_thread(_server, db)
        db.description = f"postgres {server}, a throwaway cluster on 127.0.0.1"
        yield db
    finally:
        await asyncio.to_thread(cluster.stop)


def _server(db: Database) -> str:
    import psycopg

    with psycopg.connect(db.url, autocommit=True) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("server_version", "fsync", "synchronous_commit")
        }
    return (
        f"{settings['server_version'].split()[0]} (fsync {settings['fsync']}, "
        f"synchronous_commit {settings['synchronous_commit']})"
    )


def _drop_schema(db: Database) -> None:
    import psycopg

    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{db.schema}" CASCADE')
