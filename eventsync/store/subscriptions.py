"""Subscriptions in the mirror database: each one's cursor into the change feed, the
delivery under way, and its failures. Every write that follows a delivery attempt is
conditional on the delivery it was for, so a `replay`, `pause` or `remove` from another
process in the meantime is never undone by the attempt's outcome."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from eventsync.store.mirror import Store

# The columns a Subscription is read from, in its field order.
_COLUMNS = (
    "id",
    "url",
    "kinds",
    "secret",
    "cursor",
    "paused",
    "paused_at",
    "created_at",
    "batch_id",
    "batch_through",
    "attempts",
    "failing_since",
    "next_attempt_at",
    "last_attempt_at",
    "last_status",
    "last_error",
    "last_success_at",
    "delivered",
)
_SELECT = "SELECT " + ", ".join(f'"{c}"' for c in _COLUMNS) + " FROM subscriptions"

# Why a subscription is paused.
PAUSED_BY_OPERATOR = "operator"
PAUSED_FAILING = "failing"


@dataclass(frozen=True)
class Subscription:
    id: int
    url: str
    kinds: tuple[str, ...] | None  # None: every change
    secret: str
    cursor: int
    paused: str | None
    paused_at: float | None
    created_at: float
    batch_id: str | None
    batch_through: int | None
    attempts: int
    failing_since: float | None
    next_attempt_at: float | None
    last_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    last_success_at: float | None
    delivered: int

    @classmethod
    def from_row(cls, row: Any) -> Subscription:
        values = dict(zip(_COLUMNS, tuple(row), strict=True))
        kinds = values["kinds"]
        values["kinds"] = tuple(json.loads(kinds)) if kinds else None
        return cls(**values)

    def __repr__(self) -> str:
        # Never the secret, whatever prints or logs a subscription.
        return f"Subscription(id={self.id}, url={self.url!r}, cursor={self.cursor})"


def _kinds_filter(kinds: tuple[str, ...] | None) -> tuple[str, list[Any]]:
    if not kinds:
        return "", []
    return f" AND entity IN ({', '.join('?' for _ in kinds)})", list(kinds)


class Subscriptions:
    """The subscriptions table and the change rows deliveries are made of."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ---- the operator's commands ---------------------------------------------------------

    async def add(
        self, url: str, kinds: tuple[str, ...] | None, secret: str, cursor: int
    ) -> Subscription:
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "INSERT INTO subscriptions (url, kinds, secret, cursor, created_at) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (url, json.dumps(list(kinds)) if kinds else None, secret, cursor, time.time()),
            )
            new_id = (await cur.fetchone())[0]
        found = await self.get(int(new_id or 0))
        assert found is not None
        return found

    async def get(self, subscription_id: int) -> Subscription | None:
        row = await self.store.fetchone(f"{_SELECT} WHERE id = ?", (subscription_id,))
        return None if row is None else Subscription.from_row(row)

    async def all(self) -> list[Subscription]:
        return [
            Subscription.from_row(r) for r in await self.store.fetchall(f"{_SELECT} ORDER BY id")
        ]

    async def remove(self, subscription_id: int) -> bool:
        async with self.store.transaction() as tx:
            cur = await tx.execute("DELETE FROM subscriptions WHERE id = ?", (subscription_id,))
            return bool(cur.rowcount)

    async def pause(self, subscription_id: int, reason: str = PAUSED_BY_OPERATOR) -> bool:
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "UPDATE subscriptions SET paused = ?, paused_at = ? WHERE id = ?",
                (reason, time.time(), subscription_id),
            )
            return bool(cur.rowcount)

    async def resume(self, subscription_id: int) -> bool:
        """Active again, at once, from where it stopped: the delivery under way (if any) is
        sent again with its webhook-id, so a receiver that got it already drops it."""
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "UPDATE subscriptions SET paused = NULL, paused_at = NULL, attempts = 0, "
                "failing_since = NULL, next_attempt_at = NULL WHERE id = ?",
                (subscription_id,),
            )
            return bool(cur.rowcount)

    async def replay(self, subscription_id: int, cursor: int) -> bool:
        """Deliver again from after `cursor`, with new webhook-ids (a receiver that dedups by
        webhook-id must not drop what it is asked to take again)."""
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "UPDATE subscriptions SET cursor = ?, batch_id = NULL, batch_through = NULL, "
                "attempts = 0, failing_since = NULL, next_attempt_at = NULL WHERE id = ?",
                (cursor, subscription_id),
            )
            return bool(cur.rowcount)

    # ---- deliveries ------------------------------------------------------------------------

    async def rows(
        self,
        after: int,
        kinds: tuple[str, ...] | None,
        *,
        through: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Change rows after `after` (up to `through`), each as `GET /changes` gives it plus
        `state` (still JSON text: the caller decides whether to decode it)."""
        where, params = _kinds_filter(kinds)
        sql = (
            "SELECT seq, changed_at, op, entity, entity_id, content_type, data, state "
            f"FROM changes WHERE seq > ?{where}"
        )
        args: list[Any] = [after, *params]
        if through is not None:
            sql += " AND seq <= ?"
            args.append(through)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        out = []
        for r in await self.store.fetchall(sql, args):
            item = dict(r)
            item["data"] = json.loads(item["data"]) if item["data"] else None
            if item["content_type"] is None:
                del item["content_type"]
            out.append(item)
        return out

    async def begin(self, subscription_id: int, cursor: int, batch_id: str, through: int) -> bool:
        """Record the delivery about to be sent (before its first attempt, so that after a
        crash it is sent again as the same message); false if the subscription moved."""
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "UPDATE subscriptions SET batch_id = ?, batch_through = ? WHERE id = ? "
                "AND cursor = ? AND batch_id IS NULL",
                (batch_id, through, subscription_id, cursor),
            )
            return bool(cur.rowcount)

    async def skip(self, subscription_id: int, cursor: int, through: int) -> bool:
        """Nothing for this subscription up to `through` (other kinds only): move past it."""
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "UPDATE subscriptions SET cursor = ? WHERE id = ? AND cursor = ? "
                "AND batch_id IS NULL",
                (through, subscription_id, cursor),
            )
            return bool(cur.rowcount)

    async def acknowledged(
        self, subscription_id: int, batch_id: str, count: int, status: int
    ) -> bool:
        """The receiver answered 2xx: the cursor moves past the delivery."""
        now = time.time()
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "UPDATE subscriptions SET cursor = batch_through, batch_id = NULL, "
                "batch_through = NULL, attempts = 0, failing_since = NULL, "
                "next_attempt_at = NULL, last_attempt_at = ?, last_status = ?, "
                "last_error = NULL, last_success_at = ?, delivered = delivered + ? "
                "WHERE id = ? AND batch_id = ?",
                (now, status, now, count, subscription_id, batch_id),
            )
            return bool(cur.rowcount)

    async def failed(
        self,
        subscription_id: int,
        batch_id: str,
        *,
        status: int | None,
        error: str,
        retry_in: float,
        pause_after: float,
    ) -> Subscription | None:
        """One failed attempt. Pauses the subscription when it has been failing for
        `pause_after` seconds; returns it as it now stands (None if it moved meanwhile)."""
        now = time.time()
        async with self.store.transaction() as tx:
            cur = await tx.execute(
                "UPDATE subscriptions SET attempts = attempts + 1, "
                "failing_since = coalesce(failing_since, ?), next_attempt_at = ?, "
                "last_attempt_at = ?, last_status = ?, last_error = ? "
                "WHERE id = ? AND batch_id = ?",
                (now, now + retry_in, now, status, error, subscription_id, batch_id),
            )
            if not cur.rowcount:
                return None
            await tx.execute(
                "UPDATE subscriptions SET paused = ?, paused_at = ? WHERE id = ? "
                "AND paused IS NULL AND failing_since <= ?",
                (PAUSED_FAILING, now, subscription_id, now - pause_after),
            )
        return await self.get(subscription_id)
