"""The durable inbox and per-entity job queue (SQL lives here, beside the mirror's)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from eventsync.errors import UnstorableEvent
from eventsync.events import DEFAULT_PERMISSIONS, FETCH, Event, parse_time
from eventsync.store.base import (
    LEASE_TTL,
    NO_AUDIT_LOG,
    PLACEMENT,
    Job,
)
from eventsync.store.mirror import TABLES, Store, Tx, announce

# A webhook and the audit row of the same change carry the same type and item and times one
# second apart at most (triggered_at is taken right after the row is saved); 2 s leaves room.
PAIR_WINDOW = 2.0
# An event is already reflected in the mirror when the mirrored row's updated_at is at least
# this much later than the event: both times come from BookStack's clock (so no skew between
# its clock and ours matters), and both are whole seconds, so a change in the event's own
# second may or may not be in our read.
COVER_MARGIN = 1.0




# One per process: it tells this process from an earlier one that had the same pid (a
# restarted container is pid 1 every time).
_PROCESS_NONCE = uuid.uuid4().hex[:8]


def _worker_id() -> str:
    """host:pid:nonce, the same for every queue of this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_NONCE}"


class JobQueue:
    """Records events, coalesces them into one job per entity, leases jobs to workers."""

    def __init__(self, store: Store, *, max_attempts: int = 8, worker_id: str | None = None):
        self.store = store
        self.max_attempts = max_attempts
        self.worker_id = worker_id or _worker_id()

    # ---- intake -----------------------------------------------------------------------------

    async def record(self, tx: Tx, event: Event, now: float | None = None) -> str:
        """Store one event and merge it into its entity's job; returns the outcome."""
        return (await self.record_many(tx, [event], now))[0]

    async def record_many(
        self, tx: Tx, events: Sequence[Event], now: float | None = None
    ) -> list[str]:
        """Record events inside `tx`, all in one trip to the database thread."""
        at = time.time() if now is None else now
        return await tx.run(lambda conn: record_sync(conn, events, at))

    async def submit(self, events: Sequence[Event]) -> list[str]:
        """Record events in a transaction of their own (one round trip for the batch)."""
        at = time.time()
        return await self.store.run_tx(lambda conn: record_sync(conn, events, at))

    async def submit_isolated(self, events: Sequence[Event]) -> list[str | UnstorableEvent]:
        """Like submit, but an event the database refuses fails alone: its place in the
        result holds the error, and every other event is committed (the group commit of many
        senders must not fail them all for one sender's value)."""
        at = time.time()
        return await self.store.run_tx(lambda conn: record_isolated_sync(conn, events, at))

    async def enqueue(
        self,
        key: str,
        hints: Iterable[str],
        *,
        payload: dict[str, Any] | None = None,
        tx: Tx | None = None,
        delay: float = 0.0,
        reason: str = "follow-up",
    ) -> None:
        """Add work that no BookStack event announces (cascades, resolutions, the sweep):
        `reason` names it in the job's log line."""
        due = time.time() + delay
        hint_list = list(hints)
        origin = (reason, "eventsync")

        def merge(conn: sqlite3.Connection) -> bool:
            return merge_job_sync(conn, key, hint_list, due, None, payload, origin)

        if tx is not None:
            await tx.run(merge)
            return
        await self.store.run_tx(merge)

    # ---- workers ----------------------------------------------------------------------------

    async def recover(self, now: float | None = None) -> int:
        """Release leases of workers that are no longer running: on this host, by their
        process; anywhere, by a lease not renewed for LEASE_TTL (e.g. after kill -9)."""
        now = time.time() if now is None else now
        rows = await self.store.fetchall(
            "SELECT leased_by, max(coalesce(leased_at, 0)) FROM jobs "
            "WHERE leased_by IS NOT NULL GROUP BY leased_by"
        )
        dead = [
            owner
            for owner, renewed in rows
            if owner != self.worker_id and (renewed < now - LEASE_TTL or not _alive(owner))
        ]
        if not dead:
            return 0
        async with self.store.transaction() as tx:
            n = 0
            for owner in dead:
                cur = await tx.execute(
                    "UPDATE jobs SET leased_by = NULL, leased_at = NULL, pending_hints = NULL "
                    "WHERE leased_by = ?",
                    (owner,),
                )
                n += cur.rowcount
        return n

    async def renew(self, jobs: Iterable[Job]) -> None:
        """Confirm this worker still runs these jobs (see LEASE_TTL)."""
        keys = [(time.time(), job.key, self.worker_id) for job in jobs]
        if not keys:
            return
        async with self.store.transaction() as tx:
            for params in keys:
                await tx.execute(
                    "UPDATE jobs SET leased_at = ? WHERE key = ? AND leased_by = ?", params
                )

    async def lease(self, limit: int, now: float | None = None) -> list[Job]:
        now = time.time() if now is None else now
        worker = self.worker_id
        if self.store.dialect == "postgresql":
            from eventsync.store.postgres.dialect import LEASE

            def skip_locked(conn: Any) -> list[Any]:
                return list(conn.execute(LEASE, (worker, now, now, limit)).fetchall())

            rows = sorted(await self.store.run_local_tx(skip_locked), key=lambda r: (r[10], r[4]))
        else:
            async with self.store.transaction() as tx:
                rows = await tx.fetchall(
                    "SELECT key, hints, version, attempts, first_seen, newest_event, payload, "
                    "last_error, last_event, sources FROM jobs "
                    "WHERE leased_by IS NULL AND not_before <= ? "
                    "ORDER BY not_before LIMIT ?",
                    (now, limit),
                )
                for r in rows:
                    await tx.execute(
                        "UPDATE jobs SET leased_by = ?, leased_at = ? WHERE key = ?",
                        (worker, now, r[0]),
                    )
        return [
            Job(
                r[0],
                frozenset(json.loads(r[1])),
                r[2],
                r[3],
                r[4],
                r[5],
                json.loads(r[6]) if r[6] else {},
                r[7],
                r[8],
                r[9],
            )
            for r in rows
        ]

    async def done(self, job: Job, tx: Tx | None = None) -> bool:
        """Finish a job; if events merged into it meanwhile, it runs again. True if removed."""
        if tx is None:
            async with self.store.transaction() as own:
                return await self.done(job, own)
        # A key that syncs again has nothing left to say in the dead letters.
        await tx.execute("DELETE FROM dead_letters WHERE key = ?", (job.key,))
        cur = await tx.execute(
            "DELETE FROM jobs WHERE key = ? AND version = ?", (job.key, job.version)
        )
        if cur.rowcount:
            return True
        # Events merged while it ran: it runs again for what they added, not for what this
        # run did.
        await tx.execute(
            "UPDATE jobs SET leased_by = NULL, leased_at = NULL, attempts = 0, last_error = NULL, "
            "hints = coalesce(pending_hints, hints), pending_hints = NULL WHERE key = ?",
            (job.key,),
        )
        return False

    async def retry(
        self, job: Job, error: str, delay: float, *, count: bool = True, final: bool = False
    ) -> bool:
        """Put a failed job back after `delay`; dead-letter it after max_attempts, or at once
        when `final` (an error no retry can fix). True if kept."""
        attempts = job.attempts + (1 if count else 0)
        async with self.store.transaction() as tx:
            merged = await tx.fetchall(
                "SELECT 1 FROM jobs WHERE key = ? AND version != ?", (job.key, job.version)
            )
            bury = final or attempts >= self.max_attempts
            if bury and merged:
                # Events merged while the last attempt ran: the state may have moved on, so
                # they earn the job one more try rather than going down with it.
                bury = False
                attempts = min(attempts, self.max_attempts - 1)
            if bury:
                await tx.execute(
                    "INSERT INTO dead_letters (key, hints, attempts, error, failed_at, payload) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        job.key,
                        json.dumps(sorted(job.hints)),
                        attempts,
                        error[:2000],
                        datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                        json.dumps(job.payload) if job.payload else None,
                    ),
                )
                await tx.execute("DELETE FROM jobs WHERE key = ?", (job.key,))
                return False
            await tx.execute(
                "UPDATE jobs SET leased_by = NULL, leased_at = NULL, attempts = ?, "
                "last_error = ?, not_before = ?, pending_hints = NULL WHERE key = ?",
                (attempts, error[:2000], time.time() + delay, job.key),
            )
        return True

    async def cancel(self, key: str, queued_before: float) -> bool:
        """Drop a job nobody is running whose work was done another way since
        `queued_before`; one queued later (new reasons) stays. True if dropped."""
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "DELETE FROM jobs WHERE key = ? AND leased_by IS NULL AND first_seen < ?",
                (key, queued_before),
            )
            return bool(cur.rowcount)

    async def release(self, jobs: Iterable[Job]) -> None:
        async with self.store.transaction() as tx:
            for job in jobs:
                await tx.execute(
                    "UPDATE jobs SET leased_by = NULL, leased_at = NULL, pending_hints = NULL "
                    "WHERE key = ? AND leased_by = ?",
                    (job.key, self.worker_id),
                )

    # ---- inspection -------------------------------------------------------------------------

    async def depth(self) -> int:
        row = await self.store.fetchone("SELECT count(*) FROM jobs")
        return int(row[0]) if row else 0

    async def pending_keys(self, kind: str) -> set[str]:
        """Keys of `kind`'s jobs, queued or running."""
        rows = await self.store.fetchall("SELECT key FROM jobs WHERE key LIKE ?", (f"{kind}:%",))
        return {r[0] for r in rows}

    async def next_due(self) -> float | None:
        row = await self.store.fetchone("SELECT min(not_before) FROM jobs WHERE leased_by IS NULL")
        return None if row is None or row[0] is None else float(row[0])

    async def dead_letters(self) -> list[dict[str, Any]]:
        rows = await self.store.fetchall(
            "SELECT id, key, hints, attempts, error, failed_at FROM dead_letters ORDER BY id"
        )
        return [
            {
                "id": r[0],
                "key": r[1],
                "hints": json.loads(r[2]),
                "attempts": r[3],
                "error": r[4],
                "failed_at": r[5],
            }
            for r in rows
        ]

    async def retry_dead(self, letter_id: int | None = None) -> int:
        """Move dead letters (one, or all when None) back into the queue as fresh jobs."""
        where, params = ("WHERE id = ?", (letter_id,)) if letter_id is not None else ("", ())
        async with self.store.transaction() as tx:
            rows = await tx.fetchall(
                f"SELECT id, key, hints, payload FROM dead_letters {where}", params
            )
            now = time.time()
            for r in rows:
                key, hints = r[1], json.loads(r[2])
                payload = json.loads(r[3]) if r[3] else None
                await tx.run(
                    lambda conn, k=key, h=hints, p=payload: merge_job_sync(
                        conn, k, h, now, None, p, ("dead-letter retry", "eventsync")
                    )
                )
                await tx.execute("DELETE FROM dead_letters WHERE id = ?", (r[0],))
        return len(rows)

    async def event_counts(self) -> dict[str, int]:
        rows = await self.store.fetchall("SELECT outcome, count(*) FROM events GROUP BY 1")
        return {r[0]: r[1] for r in rows}

    async def unconfirmed_webhooks(self, older_than: float) -> int:
        """Webhooks whose audit-log row never showed up: each is a sign of a gap."""
        row = await self.store.fetchone(
            "SELECT count(*) FROM events WHERE source = 'webhook' AND paired = 0 "
            "AND entity_key IS NOT NULL AND received_at < ?",
            (older_than,),
        )
        return int(row[0]) if row else 0

    async def confirm_webhooks(self, older_than: float) -> None:
        async with self.store.transaction() as tx:
            await tx.execute(
                "UPDATE events SET paired = 1 WHERE source = 'webhook' AND paired = 0 "
                "AND received_at < ?",
                (older_than,),
            )

    async def forget_activity_ids(self, tx: Tx) -> None:
        """The audit log was cleared and its ids restart: old ids must not mark new rows as
        duplicates."""
        await tx.execute("UPDATE events SET activity_id = NULL WHERE activity_id IS NOT NULL")

    async def prune_events(self, older_than: float, keep_activities_from: int = 0) -> int:
        """Events are kept only for pairing and inspection; jobs carry what matters. Audit
        rows the poller still re-reads (the overlap behind its cursor) stay however old, or
        the re-read would take them for new activity."""
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "DELETE FROM events WHERE received_at < ? "
                "AND (activity_id IS NULL OR activity_id < ?)",
                (older_than, keep_activities_from),
            )
            return cur.rowcount


def _job_payload(event: Event) -> dict[str, Any] | None:
    # A webhook's payload is its body as sent: an "entity" there is the sender's, not one
    # from_audit parsed, and would become a job key of the sender's choosing.
    if event.source == "webhook" or not event.payload:
        return None
    entity = event.payload.get("entity")
    return {"entity": entity} if entity else None


def _alive(worker: str) -> bool:
    """Could `worker` still be running? Only a worker on this host can be ruled out (its
    process is gone); elsewhere the lease's age decides."""
    parts = worker.split(":")
    if len(parts) == 1 and worker.isdigit():  # a lease taken before worker ids had hosts
        host, pid = socket.gethostname(), worker
    elif len(parts) == 3:
        host, pid, _nonce = parts
    else:
        return False
    if host != socket.gethostname():
        return True
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # an earlier process with our pid; we would know our own leases
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- intake on the database thread ------------------------------------------------------------
# These run synchronously on the connection's own thread (Tx.run / Store.run_tx): a batch of
# events costs one hop between threads instead of one per statement, which is what bounds the
# webhook intake rate.


# What the database raises about itself (locked, full, I/O, corrupt) rather than about a value
# it was given: no event is to blame, and retrying the others without one would not help.
_DATABASE_FAILURES = (
    sqlite3.OperationalError,
    sqlite3.InternalError,
    sqlite3.NotSupportedError,
    MemoryError,
)


def _is_database_failure(exc: BaseException) -> bool:
    return isinstance(exc, _DATABASE_FAILURES) or type(exc) is sqlite3.DatabaseError


def record_sync(conn: sqlite3.Connection, events: Sequence[Event], now: float) -> list[str]:
    """Record events; an event whose values cannot be stored raises UnstorableEvent naming
    its index (the statements of the events before it have run: roll back or isolate)."""
    outcomes = []
    audit_log = _audit_log_readable(conn)
    for index, event in enumerate(events):
        try:
            outcomes.append(_record_one_sync(conn, event, now, audit_log))
        except Exception as exc:
            if _is_database_failure(exc):
                raise
            raise UnstorableEvent(
                f"the event cannot be stored: {type(exc).__name__}: {exc}", index=index
            ) from exc
    return outcomes


def record_isolated_sync(
    conn: sqlite3.Connection, events: Sequence[Event], now: float
) -> list[str | UnstorableEvent]:
    """record_sync inside the caller's transaction, with each unstorable event left out and
    its error in its place. The common case (nothing fails) costs one savepoint; after a
    failure the group is recorded again one savepoint per event, so however many of its
    events fail, it takes two passes, not one retry per failure."""
    conn.execute("SAVEPOINT record_group")
    try:
        outcomes: list[str | UnstorableEvent] = list(record_sync(conn, events, now))
    except UnstorableEvent as first:
        conn.execute("ROLLBACK TO record_group")
        outcomes = []
        for index, event in enumerate(events):
            if index == first.index:
                outcomes.append(first)
                continue
            conn.execute("SAVEPOINT record_one")
            try:
                outcomes.extend(record_sync(conn, [event], now))
            except UnstorableEvent as exc:
                conn.execute("ROLLBACK TO record_one")
                exc.index = index
                outcomes.append(exc)
            conn.execute("RELEASE record_one")
    conn.execute("RELEASE record_group")
    return outcomes


def _record_one_sync(conn: sqlite3.Connection, event: Event, now: float, audit_log: bool) -> str:
    outcome = _outcome_sync(conn, event, audit_log)
    if outcome == "duplicate" and event.source == "audit":
        return outcome  # the row is in the table already (by activity id)
    # A webhook copy is stored (it was accepted) but counts as paired: it is no sign of
    # a gap when no second audit row turns up for it.
    paired = outcome in ("paired", "duplicate")
    if outcome == "paired":
        outcome = "covered"
    elif outcome == "job":
        existed = merge_job_sync(
            conn,
            event.key or "",
            event.hints,
            now,
            event.at,
            _job_payload(event),
            (event.type, event.source),
        )
        outcome = "merged" if existed else "queued"
    conn.execute(
        "INSERT INTO events (source, activity_id, type, entity_key, event_time, received_at, "
        "outcome, paired, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.source,
            event.activity_id,
            event.type,
            event.key,
            event.at,
            now,
            outcome,
            int(paired),
            event.raw or (json.dumps(event.payload) if event.payload else None),
        ),
    )
    return outcome


def record_covered_sync(conn: sqlite3.Connection, events: Sequence[Event], now: float) -> None:
    """Record audit rows a diff sync has already reflected: a re-read of them is a duplicate.
    They stay unpaired, so a late webhook of the same change pairs with one and costs nothing."""
    conn.executemany(
        "INSERT INTO events (source, activity_id, type, entity_key, event_time, received_at, "
        "outcome, paired, payload) SELECT ?, ?, ?, ?, ?, ?, 'covered', 0, ? "
        "WHERE NOT EXISTS (SELECT 1 FROM events WHERE activity_id = ?)",
        [
            (
                e.source,
                e.activity_id,
                e.type,
                e.key,
                e.at,
                now,
                json.dumps(e.payload) if e.payload else None,
                e.activity_id,
            )
            for e in events
        ],
    )


def _audit_log_readable(conn: sqlite3.Connection) -> bool:
    """Is there an audit log to read (`audit_access`, see SCHEMA.md)? Unknown counts as yes."""
    row = conn.execute("SELECT value FROM sync_state WHERE key = 'audit_access'").fetchone()
    return row is None or str(row[0]) not in NO_AUDIT_LOG


def _outcome_sync(conn: sqlite3.Connection, event: Event, audit_log: bool = True) -> str:
    if (
        event.activity_id is not None
        and conn.execute(
            "SELECT 1 FROM events WHERE activity_id = ?", (event.activity_id,)
        ).fetchone()
    ):
        return "duplicate"
    if event.key is None:
        return "ignored"
    if (
        # Two changes within one second can send byte-identical webhooks (a permission
        # change moves no timestamp): the audit log tells them apart by activity id, so
        # without one the second is another change, not a second delivery of the first.
        audit_log
        and event.source == "webhook"
        and event.at is not None
        and event.raw is not None
        and conn.execute(
            "SELECT 1 FROM events WHERE source = 'webhook' AND entity_key = ? AND type = ? "
            "AND event_time = ? AND payload = ? LIMIT 1",
            (event.key, event.type, event.at, event.raw),
        ).fetchone()
    ):
        return "duplicate"
    if event.at is not None and event.source in ("webhook", "audit"):
        other = "audit" if event.source == "webhook" else "webhook"
        pair = conn.execute(
            "SELECT seq FROM events WHERE entity_key = ? AND type = ? AND source = ? "
            "AND paired = 0 AND event_time BETWEEN ? AND ? ORDER BY seq LIMIT 1",
            (event.key, event.type, other, event.at - PAIR_WINDOW, event.at + PAIR_WINDOW),
        ).fetchone()
        if pair:
            # The same change already reached us from the other source, and its job reads the
            # state after it: this copy costs nothing.
            conn.execute("UPDATE events SET paired = 1 WHERE seq = ?", (pair[0],))
            return "paired"
        if event.hints <= {FETCH, DEFAULT_PERMISSIONS} and _read_since_sync(
            conn, event.key, event.at
        ):
            return "covered"
    return "job"  # queued or merged: merge_job_sync says which


def _read_since_sync(conn: sqlite3.Connection, key: str, at: float) -> bool:
    """Does the mirror hold a read of `key` taken after a change later than `at`? Then the
    change at `at` is in it too. A change that moves no updated_at (a shelf's books, a user's
    roles) never counts as covered: its read is always made."""
    kind, _, raw_id = key.partition(":")
    table = TABLES.get(kind)
    if table is None or "updated_at" not in table.columns or not raw_id.isdigit():
        return False
    # A move or sort patches updated_at without reading the item: only its own read counts.
    column = "coalesce(read_updated_at, updated_at)" if kind in PLACEMENT else "updated_at"
    row = conn.execute(f"SELECT {column} FROM {table.name} WHERE id = ?", (int(raw_id),))
    found = row.fetchone()
    updated = parse_time(found[0]) if found is not None else None
    return updated is not None and updated >= at + COVER_MARGIN


def merge_job_sync(
    conn: sqlite3.Connection,
    key: str,
    hints: Iterable[str],
    now: float,
    event_time: float | None,
    payload: dict[str, Any] | None = None,
    origin: tuple[str, str] | None = None,
) -> bool:
    """Merge into `key`'s job, or create it; True if it existed. `origin` is the (event type,
    source) behind it, kept for the job's log line."""
    event_type, source = origin or (None, None)
    announce(conn, "jobs")
    row = conn.execute(
        "SELECT hints, payload, sources, leased_by, pending_hints FROM jobs WHERE key = ?", (key,)
    ).fetchone()
    if row:
        merged = sorted(set(json.loads(row[0])) | set(hints))
        # While a worker runs the job, what it has not seen is kept apart: a rerun after it
        # succeeds needs only that (done()); after a failure it redoes everything anyway.
        pending = (
            None
            if row[3] is None
            else json.dumps(sorted(set(json.loads(row[4] or "[]")) | set(hints)))
        )
        data = {**json.loads(row[1] or "{}"), **(payload or {})}
        sources = ",".join(
            sorted({*filter(None, (row[2] or "").split(",")), *filter(None, [source])})
        )
        # A new event makes a job in retry back-off due now: the state may have settled.
        conn.execute(
            "UPDATE jobs SET hints = ?, events = events + 1, version = version + 1, "
            "newest_event = CASE WHEN coalesce(newest_event, 0) >= coalesce(?, 0) "
            "THEN coalesce(newest_event, 0) ELSE coalesce(?, 0) END, "
            "not_before = CASE WHEN not_before <= ? THEN not_before ELSE ? END, payload = ?, "
            "last_event = coalesce(?, last_event), sources = ?, "
            "pending_hints = coalesce(?, pending_hints) WHERE key = ?",
            (
                json.dumps(merged),
                event_time,
                event_time,
                now,
                now,
                json.dumps(data) if data else None,
                event_type,
                sources or None,
                pending,
                key,
            ),
        )
        return True
    conn.execute(
        "INSERT INTO jobs (key, hints, first_seen, newest_event, not_before, payload, "
        "last_event, sources) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key,
            json.dumps(sorted(set(hints))),
            now,
            event_time,
            now,
            json.dumps(payload) if payload else None,
            event_type,
            source,
        ),
    )
    return False
