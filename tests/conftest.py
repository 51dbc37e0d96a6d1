"""Fixtures shared by every test module: a real PostgreSQL server for the tests that need one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

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
