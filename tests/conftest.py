"""Fixtures shared by every test module: a real PostgreSQL server for the tests that need one."""

from __future__ import annotations

import contextlib
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


class PathsOnPostgres:
    """Every SQLite file path a test names is a PostgreSQL database instead, one per path: in
    this process (Store.open) and for the commands it starts (`database_value`, which the
    tests' environment builders call). The same test then runs on both backends."""

    def __init__(self, cluster: PostgresCluster) -> None:
        self.cluster = cluster
        self.urls: dict[str, str] = {}

    def url(self, database: Any, *, touch: bool = False) -> str:
        from eventsync.store.base import is_postgres_url

        text = str(database)
        if is_postgres_url(text) or text == ":memory:":
            return text
        key = os.path.abspath(text)
        if key not in self.urls:
            self.urls[key] = self.cluster.new_database()
        if touch:
            # In this process, commands look for the file they were given before opening it.
            Path(key).parent.mkdir(parents=True, exist_ok=True)
            Path(key).touch()
        return self.urls[key]

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import helpers

        from eventsync.store import mirror as sqlite_store

        original = sqlite_store.Store.open.__func__  # type: ignore[attr-defined]

        async def open_on_postgres(cls: Any, database: Any, **kwargs: Any) -> Any:
            return await original(cls, self.url(database, touch=True), **kwargs)

        sqlite_store.Store.open = classmethod(open_on_postgres)  # type: ignore[method-assign]
        helpers.DATABASES = self.url
        try:
            yield
        finally:
            sqlite_store.Store.open = classmethod(original)  # type: ignore[method-assign]
            helpers.DATABASES = None


@pytest.fixture(params=["sqlite", "postgres"])
def on_both_backends(request: pytest.FixtureRequest) -> Iterator[str]:
    """Use as `pytestmark = pytest.mark.usefixtures("on_both_backends")`: each test of the
    module runs on a SQLite file and again on PostgreSQL."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    only = request.node.get_closest_marker("sqlite_only")
    if only is not None:
        pytest.skip(f"SQLite only: {only.args[0] if only.args else 'reads the file'}")
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    with PathsOnPostgres(cluster).installed():
        yield "postgres"


@pytest.fixture(autouse=True, scope="session")
def _whole_suite_on_postgres(request: pytest.FixtureRequest) -> Iterator[None]:
    """EVENTSYNC_TEST_BACKEND=postgres runs the whole suite with PostgreSQL for SQLite."""
    if os.environ.get("EVENTSYNC_TEST_BACKEND") != "postgres":
        yield
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    with PathsOnPostgres(cluster).installed():
        yield
