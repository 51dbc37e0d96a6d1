"""Fixtures shared by every test module: a real PostgreSQL server for the tests that need one."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eventsync.testing.postgres import PostgresCluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway cluster for the session (or the server EVENTSYNC_TEST_POSTGRES names)."""
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """The URL of a fresh, empty database."""
    return postgres_cluster.new_database()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """EVENTSYNC_DATABASE for a fresh mirror on each backend."""
    if backend == "sqlite":
        return str(tmp_path / "mirror.db")
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.new_database()


@pytest.fixture
def new_database(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[], str]:
    """Make further fresh databases on the same backend (replica tests, copies)."""
    counter = iter(range(1, 1_000_000))

    def make() -> str:
        if backend == "sqlite":
            return str(tmp_path / f"mirror-{next(counter)}.db")
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        return cluster.new_database()

    return make


@pytest.fixture(autouse=True, scope="session")
def _sqlite_paths_on_postgres(request: pytest.FixtureRequest) -> Iterator[None]:
    """EVENTSYNC_TEST_BACKEND=postgres: every SQLite file a test opens in this process is a
    PostgreSQL database instead (one per path), to run the whole suite on that backend."""
    if os.environ.get("EVENTSYNC_TEST_BACKEND") != "postgres":
        yield
        return
    from eventsync.store import sqlite as sqlite_store

    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    original = sqlite_store.Store.open.__func__  # type: ignore[attr-defined]
    urls: dict[str, str] = {}

    async def open_on_postgres(cls: Any, database: Any, **kwargs: Any) -> Any:
        text = str(database)
        if not sqlite_store.is_postgres_url(text) and text != ":memory:":
            key = os.path.abspath(text)  # noqa: ASYNC240 (no I/O)
            if key not in urls:
                urls[key] = cluster.new_database()
                # Commands that look for the file before opening it find one.
                open(key, "a").close()  # noqa: ASYNC230
            database = urls[key]
        return await original(cls, database, **kwargs)

    sqlite_store.Store.open = classmethod(open_on_postgres)  # type: ignore[method-assign]
    try:
        yield
    finally:
        sqlite_store.Store.open = classmethod(original)  # type: ignore[method-assign]
