"""What only the PostgreSQL backend has to get right: a change feed with no holes under
concurrent writers, migrations raced by replicas, leases that skip each other's rows, the
announcements (LISTEN/NOTIFY) and a schema of its own."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest

from eventsync.events import Event
from eventsync.store.mirror import Store
from eventsync.store.queue import JobQueue
from eventsync.testing.postgres import PostgresCluster

Opener = Callable[..., Awaitable[Store]]


@pytest.fixture
async def open_store(postgres_url: str) -> AsyncIterator[Opener]:
    """Open stores on one fresh PostgreSQL database, each on a connection of its own (as
    replicas are); all closed at the end."""
    opened: list[Store] = []

    async def make(**kwargs: object) -> Store:
        store = await Store.open(postgres_url, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_a_reader_following_the_feed_never_skips_a_row(open_store: Opener) -> None:
    """Writers on four connections hold their transactions open for random times after taking
    feed numbers; a reader that always asks for rows after the highest it saw must still get
    every row. Without the writers' lock a number taken early and committed late is skipped."""
    writers = [await open_store() for _ in range(4)]
    reader = await open_store()
    stop = asyncio.Event()
    rng = random.Random(7)

    async def write(store: Store, base: int) -> None:
        for n in range(25):
            async with store.transaction() as tx:
                await tx.change("upsert", "user", base + n)
                await asyncio.sleep(rng.random() * 0.01)

    seen: list[int] = []

    async def follow() -> None:
        after = 0
        while True:
            rows = await reader.changes(after, 1000)
            seen.extend(r["seq"] for r in rows)
            if rows:
                after = rows[-1]["seq"]
            elif stop.is_set():
                return
            await asyncio.sleep(0.001)

    follower = asyncio.create_task(follow())
    await asyncio.gather(*(write(w, 1000 * i) for i, w in enumerate(writers)))
    stop.set()
    await follower
    committed = [r["seq"] for r in await reader.changes(0, 10_000)]
    assert len(committed) == 100
    assert seen == committed, f"the reader skipped {sorted(set(committed) - set(seen))}"


async def test_replicas_starting_at_once_on_an_empty_database_migrate_once(
    open_store: Opener,
) -> None:
    stores = await asyncio.gather(*(open_store() for _ in range(5)))
    rows = await stores[0].fetchall("SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == sorted({r[0] for r in rows})
    for store in stores:
        assert await store.counts() == await stores[0].counts()


async def test_two_replicas_never_lease_the_same_job(open_store: Opener) -> None:
    one, other = await open_store(), await open_store()
    queue = JobQueue(one, worker_id="one:1")
    for n in range(60):
        await queue.enqueue(f"page:{n}", ["update"])
    queues = [JobQueue(one, worker_id="one:1"), JobQueue(other, worker_id="other:2")]
    taken: list[list[str]] = [[], []]

    async def drain(index: int) -> None:
        while True:
            jobs = await queues[index].lease(3)
            if not jobs:
                return
            taken[index].extend(j.key for j in jobs)
            await asyncio.sleep(0)

    await asyncio.gather(drain(0), drain(1))
    everything = taken[0] + taken[1]
    assert sorted(everything) == sorted(f"page:{n}" for n in range(60))
    assert len(set(everything)) == 60, "a job was leased twice"


async def test_commits_in_one_process_wake_listeners_in_another(open_store: Opener) -> None:
    writer, listener = await open_store(), await open_store()
    fed, jobbed = asyncio.Event(), asyncio.Event()
    listener.on_feed_commit.append(fed.set)
    listener.on_jobs.append(jobbed.set)
    await listener.listen()
    fed.clear()
    jobbed.clear()
    async with writer.transaction() as tx:
        await tx.upsert("user", {"id": 3, "name": "U", "slug": "u"})
    await asyncio.wait_for(fed.wait(), 5)
    assert not jobbed.is_set()
    await JobQueue(writer).submit([Event(source="webhook", type="page_update", key="page:1")])
    await asyncio.wait_for(jobbed.wait(), 5)


async def test_everything_lives_in_the_schema_of_its_own(
    open_store: Opener, postgres_url: str, postgres_cluster: PostgresCluster
) -> None:
    first = await open_store()
    second = await open_store(schema="second_mirror")
    async with first.transaction() as tx:
        await tx.upsert("user", {"id": 1, "name": "In the first", "slug": "first"})
    assert await second.get("user", 1) is None
    name = postgres_url.rsplit("/", 1)[1]
    tables = postgres_cluster.psql(
        "SELECT table_schema, count(*) FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
        "GROUP BY 1 ORDER BY 1",
        name,
    ).split()
    schemas = dict(line.split("|") for line in tables)
    assert set(schemas) == {"eventsync", "second_mirror"}, "a table outside the schema"
    assert schemas["eventsync"] == schemas["second_mirror"]


async def test_a_held_write_blocks_only_writers(open_store: Opener) -> None:
    """Writers queue on the lock; reads and the queue's leases do not."""
    one, other = await open_store(), await open_store()
    await JobQueue(one).enqueue("page:1", ["update"])
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with one.transaction() as tx:
            await tx.change("upsert", "user", 1)
            entered.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await entered.wait()
    started = time.monotonic()
    assert await other.counts()
    assert [j.key for j in await JobQueue(other, worker_id="o:1").lease(5)] == ["page:1"]
    assert time.monotonic() - started < 2

    async def second_writer() -> None:
        async with other.transaction() as tx:
            await tx.change("upsert", "user", 2)

    blocked = asyncio.create_task(second_writer())
    await asyncio.sleep(0.3)
    assert not blocked.done(), "a second writer ran beside the first"
    release.set()
    await holder
    await asyncio.wait_for(blocked, 5)
    assert [r["entity_id"] for r in await other.changes(0)] == [1, 2]


async def test_the_documented_privileges_are_enough(
    postgres_cluster: PostgresCluster, postgres_url: str
) -> None:
    """README: a user with CONNECT alone runs in a schema made for it; a reader with USAGE and
    SELECT reads the mirror."""
    database = postgres_url.rsplit("/", 1)[1]
    suffix = secrets.token_hex(3)
    writer, reader = f"writer_{suffix}", f"reader_{suffix}"
    postgres_cluster.psql(
        f"CREATE ROLE {writer} LOGIN PASSWORD 'w-{suffix}'; "
        f"CREATE ROLE {reader} LOGIN PASSWORD 'r-{suffix}'"
    )
    postgres_cluster.psql(
        f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC; '
        f'GRANT CONNECT ON DATABASE "{database}" TO {writer}, {reader}; '
        f"CREATE SCHEMA mirror AUTHORIZATION {writer}",
        database,
    )
    netloc = postgres_url.split("@", 1)[1]
    writer_url = f"postgresql://{writer}:w-{suffix}@{netloc}"
    async with await Store.open(writer_url, schema="mirror") as s, s.transaction() as tx:
        await tx.upsert("user", {"id": 5, "name": "Written", "slug": "written"})
    postgres_cluster.psql(
        f"GRANT USAGE ON SCHEMA mirror TO {reader}; "
        f"GRANT SELECT ON ALL TABLES IN SCHEMA mirror TO {reader}",
        database,
    )
    async with await psycopg.AsyncConnection.connect(
        f"postgresql://{reader}:r-{suffix}@{netloc}"
    ) as conn:
        rows = await (await conn.execute("SELECT name FROM mirror.users")).fetchall()
        assert rows == [("Written",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("DELETE FROM mirror.users")
