"""Replicas on one PostgreSQL database: one leader at a time, and one request budget for all.

Both keep connections of their own, apart from the store's: the lead is a session advisory
lock, which lives and dies with its connection (a leader killed with kill -9 frees it at once),
and a replica waiting for a token must never queue behind the store's transactions. Tables:
migrations/0002_coordination.sql, in the deployment's schema.

The lead saves work; it does not guard correctness: what the leader does (poll the audit log,
diff, sweep) is idempotent. The timings below still keep two replicas from leading at once.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import psycopg
from psycopg import sql

from eventsync.errors import EventsyncError
from eventsync.logging import get_logger

log = get_logger("eventsync.store.postgres.coordination")

DEFAULT_SCHEMA = "eventsync"
MIGRATION = Path(__file__).with_name("migrations") / "0002_coordination.sql"

# The advisory lock is (LOCK_CLASS, the schema's oid): advisory locks are per database, and
# each deployment sharing one (a schema each) has a leader of its own.
LOCK_CLASS = 0x65767379  # "evsy"
RETRY_INTERVAL = 1.0  # a follower asks for the lead this often: a dead leader's successor
HEARTBEAT_INTERVAL = 1.0  # the leader proves its connection and records itself this often
# A leader that has not proved its connection for this long (a network that drops packets
# silently, this process stalled) stops leading by itself ...
LEASE = 5.0
# ... well before the server ends a session that has been silent this long and so frees the
# lock for the next leader: the two never lead at once. (PostgreSQL 14 and later; older
# servers free it only when TCP gives up on the connection.)
IDLE_SESSION_TIMEOUT = 15.0
BACKOFF_CAP = 5.0  # between attempts to reach a database that is down
CONNECT_TIMEOUT = 10  # seconds, libpq's connect_timeout
# libpq's TCP keepalives: a connection to a host that vanished fails in about 10 s.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
# The budget's statements: a take waits for the row at most this long, then the request
# waits a while and asks again; it never goes without a token.
BUDGET_SETTINGS = {"lock_timeout": "5s", "statement_timeout": "10s"}
# A budget operation gives up after this long: its statements time out sooner
# (BUDGET_SETTINGS), this is for a connection that hangs.
BUDGET_TIMEOUT = 15.0
UNAVAILABLE_WAIT = 1.0  # seconds a take answers when the database cannot be reached

# ---- queries ------------------------------------------------------------------------------------

_CHECK = """
SELECT to_regnamespace(%(schema)s)::oid::int AS schema_oid,
       to_regclass('leadership') IS NOT NULL AND to_regclass('request_budget') IS NOT NULL
"""
# Try for the lead, and read who has it: a follower shows the leader without a query of its own.
_TRY_LEAD = """
SELECT pg_try_advisory_lock(%(class)s, %(key)s),
       l.replica, l.since, extract(epoch FROM clock_timestamp() - l.heartbeat_at)::float8
FROM (SELECT) AS one LEFT JOIN leadership l ON true
"""
_CLAIM = """
INSERT INTO leadership (replica, since, heartbeat_at)
VALUES (%(replica)s, clock_timestamp(), clock_timestamp())
ON CONFLICT (singleton) DO UPDATE
SET replica = EXCLUDED.replica, since = EXCLUDED.since, heartbeat_at = EXCLUDED.heartbeat_at
RETURNING since
"""
_HEARTBEAT = "UPDATE leadership SET heartbeat_at = clock_timestamp() WHERE replica = %(replica)s"
_LEADER = """
SELECT replica, since, extract(epoch FROM clock_timestamp() - heartbeat_at)::float8
FROM leadership
"""

_BUDGET_ROW = """
INSERT INTO request_budget (source, per_minute, burst, tokens, updated_at)
VALUES (%(source)s, %(per_minute)s, %(burst)s, %(burst)s, clock_timestamp())
ON CONFLICT (source) DO NOTHING
"""
# Every change of the bucket locks its row first (one replica at a time), then reads it in a
# statement of its own: READ COMMITTED gives that statement a snapshot taken after the lock,
# so it sees the last replica's update, and its clock_timestamp() is later than that one's.
# (Read in the same statement as the lock, `now` could be from before the wait.)
_LOCK_BUDGET = "SELECT 1 FROM request_budget WHERE source = %(source)s FOR UPDATE"
# The bucket as of now: refilled since updated_at at its rate, never above its burst.
_REFILLED = """
WITH b AS (
    SELECT r.source, r.per_minute, r.burst, r.paused_until, n.now,
           least(r.burst::float8,
                 r.tokens + greatest(0, extract(epoch FROM n.now - r.updated_at))::float8
                            * r.per_minute / 60) AS tokens
    FROM request_budget r, (SELECT clock_timestamp() AS now) n
    WHERE r.source = %(source)s
), t AS (
    SELECT b.*, (b.now >= b.paused_until AND b.tokens >= 1 - 1e-9) AS granted FROM b
)
"""
_TAKE = (
    _REFILLED
    + """
UPDATE request_budget r
SET tokens = CASE WHEN t.granted THEN greatest(0, t.tokens - 1) ELSE t.tokens END,
    updated_at = t.now
FROM t
WHERE r.source = t.source
RETURNING CASE
    WHEN t.granted THEN 0::float8
    WHEN t.now < t.paused_until THEN extract(epoch FROM t.paused_until - t.now)::float8
    ELSE (1 - t.tokens) * 60 / t.per_minute
END
"""
)
# `per_minute`, `burst`: the configured values (at start) or lower ones learned from BookStack
# (`lower`, which passes least(...) so as never to raise them).
_SET_RATE = (
    _REFILLED
    + """
UPDATE request_budget r
SET per_minute = %(per_minute)s, burst = %(burst)s,
    tokens = least(%(burst)s::float8, t.tokens), updated_at = t.now
FROM t
WHERE r.source = t.source
"""
)
_LOWER_VALUES = """
SELECT least(per_minute, %(per_minute)s::float8), least(burst, %(burst)s::int)
FROM request_budget WHERE source = %(source)s
"""
_PAUSE = """
UPDATE request_budget
SET paused_until = greatest(paused_until, clock_timestamp() + make_interval(secs => %(seconds)s))
WHERE source = %(source)s
"""


class CoordinationError(EventsyncError):
    """The database cannot coordinate replicas (its schema or tables are missing)."""


def replica_id() -> str:
    """This process, as replicas name each other: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _iso(stamp: datetime) -> str:
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


def _info(replica: str, since: datetime, age: float) -> dict[str, Any]:
    return {"replica": replica, "since": _iso(since), "alive": age <= LEASE, "heartbeat_age": age}


async def connect(
    conninfo: str, schema: str, purpose: str, settings: dict[str, str] | None = None
) -> psycopg.AsyncConnection[Any]:
    """A connection of its own (autocommit), with `schema` as its search_path."""
    conn = await psycopg.AsyncConnection.connect(
        conninfo,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT,
        application_name=f"eventsync {purpose}"[:63],
        **KEEPALIVES,
    )
    try:
        for name, value in {
            "search_path": sql.Identifier(schema).as_string(conn),
            **(settings or {}),
        }.items():
            await conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    except BaseException:
        await conn.close()
        raise
    return conn


async def connect_checked(
    conninfo: str, schema: str, purpose: str, settings: dict[str, str] | None = None
) -> psycopg.AsyncConnection[Any]:
    """`connect` for a replica that starts: a database it cannot reach, or a schema without
    the tables, is one clear error."""
    try:
        conn = await connect(conninfo, schema, purpose, settings)
    except psycopg.OperationalError as exc:
        raise CoordinationError(
            f"cannot reach the database (EVENTSYNC_DATABASE): {str(exc).strip()}"
        ) from None
    try:
        await check_schema(conn, schema)
    except BaseException:
        await _close_quietly(conn)
        raise
    return conn


async def check_schema(conn: psycopg.AsyncConnection[Any], schema: str) -> int:
    """The schema's oid; CoordinationError when it, or this module's tables, are missing."""
    row = await (await conn.execute(_CHECK, {"schema": schema})).fetchone()
    assert row is not None
    if row[0] is None or not row[1]:
        raise CoordinationError(
            f"schema {schema} has no coordination tables (EVENTSYNC_DATABASE_SCHEMA): "
            "the database's migrations have not run"
        )
    return int(row[0])


async def read_leader(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
    """Who leads (or led last), from any process and host: for `status`. Uses `conn`'s
    search_path for the schema."""
    row = await (await conn.execute(_LEADER)).fetchone()
    return None if row is None else _info(row[0], row[1], float(row[2]))


async def _close_quietly(conn: psycopg.AsyncConnection[Any] | None) -> None:
    if conn is not None:
        try:
            await conn.close()
        except Exception:  # a broken connection: nothing left to close
            log.debug("closing a coordination connection failed", exc_info=True)


async def _end_silent_sessions(conn: psycopg.AsyncConnection[Any]) -> None:
    # Before PostgreSQL 14 there is no such setting: the lock then goes when TCP gives up on
    # the connection.
    with contextlib.suppress(psycopg.errors.UndefinedObject):
        await conn.execute(
            "SELECT set_config('idle_session_timeout', %s, false)",
            (f"{int(IDLE_SESSION_TIMEOUT * 1000)}",),
        )


class _LeadLost(EventsyncError):
    """This replica can no longer show that it holds the lead."""


class _StartStop(abc.ABC):
    """`async with` for what has start() and close() (each opens a connection of its own)."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class PostgresLeadership(_StartStop):
    """This replica's bid for the lead: `async with`, or `start()` and `close()`.

    A follower tries the advisory lock every `retry_interval` on a connection of its own. The
    leader keeps that connection and waits on its socket: the moment the server ends it
    (terminated, restarted, a network error) it stops leading, as it does when a heartbeat
    has not come through for `lease` seconds. Either way `wait_until_lost` returns at once,
    and it starts bidding again.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        replica: str | None = None,
        retry_interval: float = RETRY_INTERVAL,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        lease: float = LEASE,
    ) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.replica = replica or replica_id()
        self.retry_interval = retry_interval
        self.heartbeat_interval = heartbeat_interval
        self.lease = lease
        self._key: int | None = None
        self._leading = asyncio.Event()
        self._following = asyncio.Event()
        self._following.set()
        self._since: datetime | None = None
        self._proved_at = 0.0  # monotonic time of the last heartbeat that came through
        # Who leads as the last bid saw it, and when (monotonic) it saw it.
        self._seen: tuple[dict[str, Any] | None, float] = (None, 0.0)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.backend_pid: int | None = None  # of the bidding connection (tests end it)

    # ---- the Leadership interface (eventsync/leadership.py) ---------------------------------

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    async def wait_until_leader(self) -> None:
        await self._leading.wait()

    async def wait_until_lost(self) -> None:
        await self._following.wait()

    async def leader(self) -> dict[str, Any] | None:
        if self.is_leader and self._since is not None:
            return _info(self.replica, self._since, time.monotonic() - self._proved_at)
        seen, at = self._seen
        if seen is None:
            return None
        age = seen["heartbeat_age"] + (time.monotonic() - at)
        return {**seen, "heartbeat_age": age, "alive": age <= self.lease}

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the database and the schema (CoordinationError: unreachable, or not
        migrated), then bid in the background, where a database that goes away only
        delays the bid."""
        conn = await connect_checked(self.conninfo, self.schema, f"check {self.replica}")
        try:
            self._key = await check_schema(conn, self.schema)
        finally:
            await _close_quietly(conn)
        self._task = asyncio.create_task(self._bid(), name="leadership bid")

    async def close(self) -> None:
        """Stop leading (closing the connection frees the lock for the next at once)."""
        task, self._task = self._task, None
        self._closing = True
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._step_down("closed")

    # ---- the bid ----------------------------------------------------------------------------

    async def _bid(self) -> None:
        failures = 0
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await connect(self.conninfo, self.schema, f"leadership {self.replica}")
                await _end_silent_sessions(conn)
                self.backend_pid = conn.info.backend_pid
                if failures:
                    log.info("database reachable again: bidding for the lead")
                failures = 0
                await self._follow(conn)
                await self._lead(conn)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, TimeoutError, _LeadLost) as exc:
                failures += 1
                if self.is_leader:
                    log.error("lost the lead", replica=self.replica, reason=str(exc).strip())
                elif failures == 1:
                    log.warning("cannot bid for the lead; retrying", error=str(exc).strip())
            except Exception:  # a bug: say so, and keep bidding rather than never lead
                failures += 1
                log.exception("bidding for the lead failed; retrying")
            finally:
                self._step_down("closed" if self._closing else "connection lost")
                await _close_quietly(conn)
            await asyncio.sleep(min(BACKOFF_CAP, self.retry_interval * failures))

    async def _follow(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Until the lock is ours."""
        params = {"class": LOCK_CLASS, "key": self._key}
        last_named: str | None = None
        while True:
            row = await (await conn.execute(_TRY_LEAD, params)).fetchone()
            assert row is not None
            got, replica, since, age = row
            seen = None if replica is None else _info(replica, since, float(age))
            self._seen = (seen, time.monotonic())
            if got:
                return
            if seen is not None and seen["alive"] and replica != last_named:
                log.info("another replica leads", leader=replica)
                last_named = replica
            await asyncio.sleep(self.retry_interval)

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Hold the lead until the connection shows it is gone (raises then)."""
        row = await (await conn.execute(_CLAIM, {"replica": self.replica})).fetchone()
        assert row is not None
        self._since = row[0]
        self._proved_at = time.monotonic()
        self._following.clear()
        self._leading.set()
        log.info("leading", replica=self.replica)
        while True:
            # Waiting on the socket, not sleeping: a connection the server ends raises here
            # at once. (No LISTEN is issued: nothing else ever arrives on it.)
            async for _ in conn.notifies(timeout=self.heartbeat_interval):
                pass
            if time.monotonic() - self._proved_at > self.lease:
                raise _LeadLost(
                    f"no heartbeat came through for {time.monotonic() - self._proved_at:.1f} s"
                )
            async with asyncio.timeout(self.lease):
                cursor = await conn.execute(_HEARTBEAT, {"replica": self.replica})
                if cursor.rowcount == 0:
                    # The lock is ours, so the row must name us (someone edited it): again.
                    await conn.execute(_CLAIM, {"replica": self.replica})
            self._proved_at = time.monotonic()

    def _step_down(self, why: str) -> None:
        if self._leading.is_set():
            self._leading.clear()
            self._following.set()
            if self._since is not None:
                # Until the next bid reads the table: this replica led last, as far as it knows.
                last = _info(self.replica, self._since, time.monotonic() - self._proved_at)
                self._seen = ({**last, "alive": False}, time.monotonic())
            log.info("no longer leading", replica=self.replica, reason=why)
        self._since = None


_T = TypeVar("_T")


class PostgresBudget(_StartStop):
    """The deployment's request budget (a `SharedBudget`, bookstack/ratelimit.py): one token
    bucket row that every replica takes from, under the row's lock, by the database's clock.

    `per_minute` and `burst` are the configured ones; each replica sets them again as it
    starts, and BookStack's lower limit (`lower`) holds until then. When the database cannot
    be reached a take answers UNAVAILABLE_WAIT: requests wait, they never go without a token.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        per_minute: float,
        burst: int,
        source: str = "bookstack",
        replica: str | None = None,
    ) -> None:
        if not per_minute > 0 or burst < 1:
            raise ValueError(
                f"a budget needs per_minute > 0 and burst >= 1, not {per_minute}, {burst}"
            )
        self.conninfo = conninfo
        self.schema = schema
        self.per_minute = float(per_minute)
        self.burst = int(burst)
        self.source = source
        self.replica = replica or replica_id()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._ops: set[asyncio.Task[Any]] = set()
        self._down_since: float | None = None

    async def start(self) -> None:
        """Connect, check the schema, and (re)set the bucket's rate to the configured one."""
        self._conn = await connect_checked(
            self.conninfo, self.schema, f"budget {self.replica}", BUDGET_SETTINGS
        )
        async with self._lock:
            await self._configure(self._conn)

    async def close(self) -> None:
        if self._ops:
            # Operations under way finish (a take half done would hold the row's lock).
            await asyncio.wait(set(self._ops), timeout=BUDGET_TIMEOUT)
        conn, self._conn = self._conn, None
        await _close_quietly(conn)

    # ---- SharedBudget -----------------------------------------------------------------------

    async def take(self) -> float:
        return await self._run(self._take, UNAVAILABLE_WAIT)

    async def pause(self, seconds: float) -> None:
        async def pause(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(_PAUSE, {"source": self.source, "seconds": float(seconds)})

        await self._run(pause, None)

    async def lower(self, per_minute: float, burst: int) -> None:
        async def lower(conn: psycopg.AsyncConnection[Any]) -> None:
            params = {"source": self.source, "per_minute": float(per_minute), "burst": burst}
            async with conn.transaction():
                await conn.execute(_LOCK_BUDGET, params)
                row = await (await conn.execute(_LOWER_VALUES, params)).fetchone()
                if row is not None:
                    lowered = {**params, "per_minute": row[0], "burst": row[1]}
                    await conn.execute(_SET_RATE, lowered)

        await self._run(lower, None)

    # ---- internals --------------------------------------------------------------------------

    async def _take(self, conn: psycopg.AsyncConnection[Any]) -> float:
        params = {"source": self.source}
        async with conn.transaction():
            locked = await (await conn.execute(_LOCK_BUDGET, params)).fetchone()
            if locked is None:
                # The row is gone (the table emptied by hand): put it back at the configured
                # rate, and take from it.
                await self._configure(conn)
                await conn.execute(_LOCK_BUDGET, params)
            row = await (await conn.execute(_TAKE, params)).fetchone()
        assert row is not None
        return max(0.0, float(row[0]))

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        params = {"source": self.source, "per_minute": self.per_minute, "burst": self.burst}
        async with conn.transaction():
            await conn.execute(_BUDGET_ROW, params)
            await conn.execute(_LOCK_BUDGET, params)
            await conn.execute(_SET_RATE, params)

    async def _run(
        self, op: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]], unavailable: _T
    ) -> _T:
        # Shielded: a request cancelled while it waits for its token (a stopping service, a
        # lost lead) must not cut a transaction off half-way; the operation finishes alone.
        task = asyncio.ensure_future(self._locked(op, unavailable))
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)
        return await asyncio.shield(task)

    async def _locked(
        self, op: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]], unavailable: _T
    ) -> _T:
        async with self._lock:
            try:
                async with asyncio.timeout(BUDGET_TIMEOUT):
                    result = await op(await self._connection())
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "the shared request budget cannot be reached: requests wait",
                        error=str(exc).strip() or type(exc).__name__,
                    )
                conn, self._conn = self._conn, None
                await _close_quietly(conn)
                return unavailable
            if self._down_since is not None:
                log.info(
                    "the shared request budget is reachable again",
                    after=round(time.monotonic() - self._down_since, 1),
                )
                self._down_since = None
            return result

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(
                self.conninfo, self.schema, f"budget {self.replica}", BUDGET_SETTINGS
            )
        return self._conn


class Coordinator:
    """A replica's part in coordinating with the others: its leadership bid and the shared
    request budget, each on a connection of its own. `async with Coordinator(...) as c:`
    then `c.leadership` (a Leadership) for the service and `c.budget` (a SharedBudget) for
    the rate limiter."""

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        requests_per_minute: float,
        burst: int,
        replica: str | None = None,
    ) -> None:
        self.leadership = PostgresLeadership(conninfo, schema=schema, replica=replica)
        self.budget = PostgresBudget(
            conninfo,
            schema=schema,
            per_minute=requests_per_minute,
            burst=burst,
            replica=replica,
        )

    async def __aenter__(self) -> Coordinator:
        await self.budget.start()
        try:
            await self.leadership.start()
        except BaseException:
            await self.budget.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.leadership.close()
        await self.budget.close()
