"""Replicas on one PostgreSQL database (store/postgres/coordination.py), against a real server:
one leader at a time, taken over within seconds when it dies or its connection ends; one
request budget that replicas in several processes never exceed together; and serve's
leader-only loops following the lead.

Each test installs the coordination tables (migrations/0002_coordination.sql) in a schema of a
fresh database itself: the migration runner is not part of this module."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import client_for, eventually, service_settings

from eventsync.app import open_app
from eventsync.bookstack.ratelimit import RateLimiter
from eventsync.leadership import LeaderTasks
from eventsync.service import Service
from eventsync.store.mirror import Store
from eventsync.store.postgres import coordination
from eventsync.store.postgres.coordination import (
    UNAVAILABLE_WAIT,
    CoordinationError,
    Coordinator,
    PostgresBudget,
    PostgresLeadership,
    read_leader,
)
from eventsync.testing import FakeBookStack

pytestmark = pytest.mark.timeout(90)

SCHEMA = "eventsync"
HOST = socket.gethostname()


async def install(url: str, schema: str = SCHEMA) -> str:
    """Create the mirror in `schema` of the database at `url` (its migrations make the
    coordination tables); `url`."""
    async with await Store.open(url, schema=schema):
        pass
    return url


@pytest.fixture
async def url(postgres_url: str) -> str:
    return await install(postgres_url)


@asynccontextmanager
async def connection(url: str, schema: str = SCHEMA) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await coordination.connect(url, schema, "test")
    try:
        yield conn
    finally:
        await conn.close()


async def terminate(url: str, backend_pid: int | None) -> None:
    """End a server session from outside, as a restart or a network cut would."""
    assert backend_pid is not None
    async with connection(url) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))


async def within(seconds: float, condition: Any, what: str) -> float:
    """Wait until `condition()` is true; fail after `seconds`; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


# ---- child processes -----------------------------------------------------------------------------

# Bids for the lead; says "leading" and "lost" on stdout as it happens.
LEAD = """
import asyncio, sys
from eventsync.store.postgres import coordination

async def main():
    url, schema, idle = sys.argv[1], sys.argv[2], float(sys.argv[3])
    coordination.IDLE_SESSION_TIMEOUT = idle
    async with coordination.PostgresLeadership(url, schema=schema) as lead:
        while True:
            await lead.wait_until_leader()
            print("@leading", flush=True)
            await lead.wait_until_lost()
            print("@lost", flush=True)

asyncio.run(main())
"""

# Requests through a RateLimiter on the shared budget: `tasks` at a time, from `start_at` (a
# wall-clock time, the same for every child) for `seconds`; prints when each got its token.
TAKE = """
import asyncio, json, sys, time
from eventsync.bookstack.ratelimit import RateLimiter
from eventsync.store.postgres.coordination import PostgresBudget

async def main():
    url, schema = sys.argv[1], sys.argv[2]
    per_minute, burst, seconds, tasks, start_at = map(float, sys.argv[3:8])
    async with PostgresBudget(url, schema=schema, per_minute=per_minute, burst=int(burst)) as b:
        limiter = RateLimiter(per_minute, burst=int(burst), budget=b)
        stamps = []
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = start_at + seconds

        async def request():
            while True:
                await limiter.acquire()
                now = time.time()
                if now >= end:
                    return
                stamps.append(now)

        await asyncio.gather(*(request() for _ in range(int(tasks))))
    print("@" + json.dumps(stamps), flush=True)

asyncio.run(main())
"""


async def child(script: str, *args: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def said(proc: asyncio.subprocess.Process, line: str, timeout: float) -> None:
    """Wait for the child's next "@" line (its log lines go to stdout too) to be `line`."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        got = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
        if not got or got.startswith(b"@"):
            break
    if got.decode().strip() != "@" + line:
        assert proc.stderr is not None
        proc.kill()
        err = await proc.stderr.read()
        raise AssertionError(f"child said {got!r}, not {line!r}: {err.decode()[-2000:]}")


def said_last(out: bytes) -> str:
    """The child's last "@" line, without the "@"."""
    return [line for line in out.decode().splitlines() if line.startswith("@")][-1][1:]


async def killed(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


# ---- leadership ----------------------------------------------------------------------------------


async def test_of_two_replicas_one_leads_and_every_process_can_name_it(url: str) -> None:
    async with (
        PostgresLeadership(url, replica="a:1") as a,
        PostgresLeadership(url, replica="b:2") as b,
    ):
        await within(5, lambda: a.is_leader or b.is_leader, "someone leads")
        leader, follower = (a, b) if a.is_leader else (b, a)
        # For a while (several of the follower's bids): still exactly one.
        for _ in range(25):
            assert leader.is_leader and not follower.is_leader
            await asyncio.sleep(0.1)
        for replica in (leader, follower):
            named = await replica.leader()
            assert named is not None and named["replica"] == leader.replica and named["alive"]
        # From another process on any host: the table.
        async with connection(url) as conn:
            named = await read_leader(conn)
        assert named is not None and named["replica"] == leader.replica
        assert named["alive"] and named["heartbeat_age"] < 2.5
    # Stopped: the row stays, naming the last leader, not alive once its heartbeat is old.
    async with connection(url) as conn:
        named = await read_leader(conn)
        assert named is not None and named["replica"] == leader.replica
        await conn.execute("UPDATE leadership SET heartbeat_at = now() - interval '1 minute'")
        named = await read_leader(conn)
    assert named is not None and not named["alive"]


async def test_a_leader_whose_connection_ends_stops_at_once_and_the_other_takes_over(
    url: str,
) -> None:
    # Heartbeats far apart: what notices the end is the wait on the socket.
    async with PostgresLeadership(url, replica="a:1", heartbeat_interval=5, lease=20) as a:
        await within(5, lambda: a.is_leader, "a leads")
        async with PostgresLeadership(url, replica="b:2") as b:
            stop = asyncio.Event()
            running: list[str] = []

            async def poller() -> None:
                running.append("started")
                try:
                    await asyncio.sleep(3600)
                finally:
                    running.append("cancelled")

            tasks = LeaderTasks(a, stop, {"audit poller": poller})
            runner = asyncio.create_task(tasks.run())
            await within(2, lambda: running == ["started"], "a's leader task runs")
            await asyncio.sleep(1.5)
            assert not b.is_leader

            await terminate(url, a.backend_pid)
            # At once: the socket shows the end, not the next heartbeat.
            assert await within(0.5, lambda: not a.is_leader, "a stops leading") < 0.5
            await within(0.5, lambda: running == ["started", "cancelled"], "a's task cancelled")
            took = await within(4, lambda: b.is_leader, "b takes over")
            assert took < 4
            # a bids again, and follows.
            await asyncio.sleep(2.5)
            assert b.is_leader and not a.is_leader
            named = await a.leader()
            assert named is not None and named["replica"] == "b:2"
            stop.set()
            await runner


async def test_a_leader_whose_heartbeats_do_not_come_through_steps_down(url: str) -> None:
    async with PostgresLeadership(url, replica="a:1", heartbeat_interval=0.3, lease=1.5) as a:
        await within(5, lambda: a.is_leader, "a leads")
        # The connection stays up, but nothing gets through: here, its heartbeat's update
        # waits behind a row lock (as it would behind a network that drops packets).
        async with connection(url) as blocker, blocker.transaction():
            await blocker.execute("SELECT * FROM leadership FOR UPDATE")
            took = await within(4, lambda: not a.is_leader, "a steps down")
            assert took <= 2.5
        # It bids again, and (alone) leads again.
        await within(5, lambda: a.is_leader, "a leads again")


async def test_a_leader_killed_with_kill_9_is_replaced_within_seconds(url: str) -> None:
    proc = await child(LEAD, url, SCHEMA, 15)
    try:
        await said(proc, "leading", timeout=20)
        async with PostgresLeadership(url, replica="b:2") as b:
            await asyncio.sleep(2.5)
            assert not b.is_leader
            named = await b.leader()
            assert named is not None and named["replica"] == f"{HOST}:{proc.pid}"
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            took = await within(5, lambda: b.is_leader, "b takes over from the killed leader")
            assert took < 3
            async with connection(url) as conn:
                named = await read_leader(conn)
            assert named is not None and named["replica"] == "b:2" and named["alive"]
    finally:
        await killed(proc)


async def test_a_stalled_leader_loses_the_lead_and_knows_it_when_it_wakes(url: str) -> None:
    # The server ends a leader's session that has been silent this long (3 s here instead of
    # 15, so the test is short), which frees the lock; the leader, woken, has already lost it.
    proc = await child(LEAD, url, SCHEMA, 3)
    try:
        await said(proc, "leading", timeout=20)
        async with PostgresLeadership(url, replica="b:2") as b:
            proc.send_signal(signal.SIGSTOP)
            took = await within(10, lambda: b.is_leader, "b takes over from the stalled one")
            assert took > 2  # not before the server gave up on it
            proc.send_signal(signal.SIGCONT)
            await said(proc, "lost", timeout=3)
            await asyncio.sleep(2)
            assert b.is_leader  # the woken one follows now
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        await killed(proc)


async def test_each_schema_of_a_shared_database_has_a_leader_of_its_own(postgres_url: str) -> None:
    await install(postgres_url, "one")
    await install(postgres_url, "two")
    async with (
        PostgresLeadership(postgres_url, schema="one", replica="a:1") as a,
        PostgresLeadership(postgres_url, schema="two", replica="b:2") as b,
    ):
        await within(5, lambda: a.is_leader and b.is_leader, "both lead, one schema each")


async def test_a_schema_without_the_tables_is_one_clear_error(postgres_url: str) -> None:
    with pytest.raises(CoordinationError, match="schema nowhere has no coordination tables"):
        async with PostgresLeadership(postgres_url, schema="nowhere"):
            pass
    with pytest.raises(CoordinationError, match="schema nowhere"):
        async with PostgresBudget(postgres_url, schema="nowhere", per_minute=60, burst=1):
            pass


# ---- the shared request budget -------------------------------------------------------------------


async def test_replicas_in_three_processes_never_exceed_the_budget_together(url: str) -> None:
    per_minute, burst, seconds = 120.0, 3, 10.0
    start_at = time.time() + 4  # every child connected and waiting by then
    procs = [
        await child(TAKE, url, SCHEMA, per_minute, burst, seconds, 4, start_at) for _ in range(3)
    ]
    try:
        results = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    finally:
        for p in procs:
            await killed(p)
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err.decode()[-2000:]
    per_process = [json.loads(said_last(out)) for out, _ in results]
    stamps = sorted(s for stamps in per_process for s in stamps)
    rate = per_minute / 60
    # The whole deployment: a burst, then the rate. Not three times that.
    assert len(stamps) <= burst + rate * seconds + 1, len(stamps)
    # And it is used, not starved: most of what the budget allows went out.
    assert len(stamps) >= 0.85 * rate * seconds, len(stamps)
    assert all(per_process), [len(s) for s in per_process]
    # In every window, however placed (the server counts fixed windows from any first hit):
    # at most a burst and the window's share of the rate (one for timing slack).
    for width in (1.0, 2.0, 5.0):
        worst = max(sum(1 for s in stamps if start <= s < start + width) for start in stamps)
        assert worst <= burst + rate * width + 1, (width, worst)


async def test_a_pause_one_replica_sees_pauses_every_replica(url: str) -> None:
    async with (
        PostgresBudget(url, per_minute=6000, burst=5, replica="a:1") as a,
        PostgresBudget(url, per_minute=6000, burst=5, replica="b:2") as b,
    ):
        limiter_a = RateLimiter(6000, burst=5, budget=a)
        limiter_b = RateLimiter(6000, burst=5, budget=b)
        assert await limiter_b.acquire() == 0.0
        # a gets a 429 with Retry-After: 2; its next request tells the budget.
        limiter_a.pause_until(limiter_a.clock() + 2)
        started = time.monotonic()
        waited_a = asyncio.create_task(limiter_a.acquire())
        await asyncio.sleep(0.2)
        waited_b = await limiter_b.acquire()
        assert 1.5 <= waited_b <= 2.5
        assert 1.8 <= await waited_a <= 2.5
        assert time.monotonic() - started >= 1.8


async def test_a_lower_limit_one_replica_learns_holds_for_every_replica(url: str) -> None:
    async with (
        PostgresBudget(url, per_minute=6000, burst=5, replica="a:1") as a,
        PostgresBudget(url, per_minute=6000, burst=5, replica="b:2") as b,
    ):
        await a.lower(30, 1)
        await a.lower(600, 10)  # never raised again
        assert await b.take() == 0.0
        assert await b.take() == pytest.approx(2.0, abs=0.1)  # 30 a minute: one per 2 s
        async with connection(url) as conn:
            row = await (
                await conn.execute("SELECT per_minute, burst FROM request_budget")
            ).fetchone()
        assert row == (30.0, 1)
    # A replica that starts sets the configured rate again (BookStack's headers lower it
    # again if they still say so).
    async with PostgresBudget(url, per_minute=6000, burst=5) as c:
        await asyncio.sleep(0.1)
        assert [await c.take() for _ in range(5)] == [0.0] * 5


async def test_without_its_database_the_budget_makes_requests_wait(url: str) -> None:
    async with PostgresBudget(url, per_minute=6000, burst=5) as budget:
        assert await budget.take() == 0.0
        # The database goes away: no token, a wait, and no error for the request.
        good = budget.conninfo
        budget.conninfo = good.replace(url.rsplit("@", 1)[1].split("/")[0], "127.0.0.1:9")
        async with connection(url) as conn:
            pids = await (
                await conn.execute(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE application_name LIKE 'eventsync budget%'"
                )
            ).fetchall()
            for (pid,) in pids:
                await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert [await budget.take() for _ in range(3)] == [UNAVAILABLE_WAIT] * 3
        # Back: tokens again, on a new connection.
        budget.conninfo = good
        assert await budget.take() == 0.0


async def test_a_request_cancelled_while_it_takes_leaves_the_budget_usable(url: str) -> None:
    async with PostgresBudget(url, per_minute=60, burst=1) as budget, connection(url) as blocker:
        # Its take waits for the row (another replica holds it) when it is cancelled.
        async with blocker.transaction():
            await blocker.execute("SELECT * FROM request_budget FOR UPDATE")
            taking = asyncio.create_task(budget.take())
            await asyncio.sleep(0.3)
            taking.cancel()
            with pytest.raises(asyncio.CancelledError):
                await taking
        # No transaction of the cancelled take holds the row: another replica takes at once,
        # and this one goes on taking.
        async with PostgresBudget(url, per_minute=60, burst=1) as other:
            assert 0 < await asyncio.wait_for(other.take(), 2) <= 1.0
        assert 0 < await asyncio.wait_for(budget.take(), 2) <= 1.0


# ---- serve: the leader's loops follow the lead -------------------------------------------------

SECRET = "coordination-test-secret-0123456789"


def audit_reads(svc: Service) -> int:
    return sum(
        n for (route, _), n in svc.client.stats.by_route.items() if route == "/api/audit-log"
    )


@asynccontextmanager
async def replica(fake: FakeBookStack, db: Path, url: str, name: str) -> AsyncIterator[Service]:
    # Each replica on the PostgreSQL mirror at `url` (`db` is unused: kept for the callers).
    settings = service_settings(fake, url, SECRET)
    async with (
        Coordinator(url, requests_per_minute=100_000, burst=10, replica=name) as coordinated,
        open_app(
            settings,
            client=client_for(fake, limiter=RateLimiter(100_000, budget=coordinated.budget)),
        ) as app,
    ):
        svc = Service(app, leadership=coordinated.leadership)
        await svc.start()
        try:
            yield svc
        finally:
            await svc.stop()


async def test_only_the_leader_polls_and_another_replica_takes_over_within_seconds(
    url: str, tmp_path: Path
) -> None:
    # Two replicas on one PostgreSQL mirror and one lead; started together on an empty
    # mirror.
    db = tmp_path / "mirror.db"
    async with FakeBookStack(requests_per_minute=100_000) as fake:
        fake.seed(pages=10, books=2, seed=3)
        fake.faults.latency = 0.005  # an initial sync that takes a while
        async with (
            replica(fake, db, url, "a:1") as a,
            replica(fake, db, url, "b:2") as b,
        ):
            await within(5, lambda: a.leadership.is_leader or b.leadership.is_leader, "a lead")
            first, second = (a, b) if a.leadership.is_leader else (b, a)
            # One initial sync, the leader's; the follower is synced by its sync point.
            await asyncio.wait_for(first.synced.wait(), 30)
            await asyncio.wait_for(second.synced.wait(), 5)
            await within(10, lambda: audit_reads(first) >= 3, "the leader polls")
            await asyncio.sleep(1.5)
            assert second.client.stats.requests == 0  # no sync, no poll, no probe, no sweep
            assert not second.leader_tasks.tasks and second.leader_tasks.terms == 0
            status = await second.status()
            assert status["replica"] == second.leadership.replica
            assert status["leader"]["replica"] == first.leadership.replica

            assert isinstance(first.leadership, PostgresLeadership)
            await terminate(url, first.leadership.backend_pid)
            await within(1, lambda: not first.leader_tasks.tasks, "its leader loops stop")
            await asyncio.sleep(0.5)
            polled = audit_reads(first)
            await within(8, lambda: audit_reads(second) >= 3, "the other polls, taking over")
            assert audit_reads(first) == polled  # the first no longer does
            for _ in range(30):  # the first one's next bid reads who leads now
                if (await first.status())["leader"]["replica"] == second.leadership.replica:
                    break
                await asyncio.sleep(0.1)
            named = (await first.status())["leader"]
            assert named["replica"] == second.leadership.replica and named["alive"], named

            # The new leader's poll finds what changed (no webhooks here), the queue is
            # worked, and the mirror converges. No sync from scratch: its term begins with
            # the start-up listing diff, which reads no unchanged page.
            fake.faults.latency = 0.0
            await fake.update_page(fake.truth()["pages"][0]["id"], html="<p>after</p>")

            async def converged() -> bool:
                return await second.store.export() == fake.truth()

            await eventually(converged, timeout=15, what="the mirror converges")
            page_reads = sum(
                n
                for (route, _), n in second.client.stats.by_route.items()
                if route == "/api/pages/{id}"
            )
            assert page_reads <= 2, page_reads
            assert await a.healthy() and await b.healthy()
