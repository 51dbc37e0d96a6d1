"""Which replica leads, and the loops only the leader runs, the same for both backends.

With PostgreSQL any number of `serve` replicas share a database; one at a time leads (an
advisory lock, store/postgres/coordination.py) and runs the audit-log poller, the periodic
diff, the sweep and gap handling, while every replica accepts webhooks and works the queue.
With SQLite there is one serve per file (store/serve_lock.py), and it always leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from eventsync.logging import get_logger

log = get_logger("eventsync.leadership")

# Who leads, as `status` shows it: {"replica": "host:pid", "since": ISO 8601, "alive": bool,
# "heartbeat_age": seconds since the leader last proved itself, or None where the OS holds
# the lock for it}. "alive" false: nobody leads right now; the rest names the last leader.
LeaderInfo = dict[str, Any]


def replica_id() -> str:
    """This process, as replicas name each other: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Leadership(Protocol):
    """Whether this replica leads; shared by the service and its leader-only loops."""

    replica: str

    @property
    def is_leader(self) -> bool: ...

    async def wait_until_leader(self) -> None:
        """Return once this replica leads (at once if it does)."""
        ...

    async def wait_until_lost(self) -> None:
        """Return once this replica no longer leads (at once if it does not)."""
        ...

    async def leader(self) -> LeaderInfo | None:
        """Who leads (or led last), None if nobody ever has."""
        ...


class AlwaysLeader:
    """The one serve on a SQLite file leads from start to end."""

    def __init__(self, replica: str | None = None, since: str | None = None) -> None:
        self.replica = replica or replica_id()
        self.since = since or datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    @property
    def is_leader(self) -> bool:
        return True

    async def wait_until_leader(self) -> None:
        return None

    async def wait_until_lost(self) -> None:
        await asyncio.get_running_loop().create_future()  # never: only cancelled

    async def leader(self) -> LeaderInfo | None:
        return {"replica": self.replica, "since": self.since, "alive": True, "heartbeat_age": None}


Loop = Callable[[], Awaitable[None]]


class LeaderTasks:
    """Runs `loops` while this replica leads: all started each time it gains the lead, all
    cancelled the moment it loses it (another replica may be running them already).

    `run` returns once `stop` is set, after giving the `graceful` loops `grace` seconds to
    finish by themselves (they watch `stop` too; the poller commits what it has read) and
    cancelling the rest. A loop may end early (one that has nothing to do); one that fails
    ends `run` with its exception, as a failed service task stops the service.
    """

    def __init__(
        self,
        leadership: Leadership,
        stop: asyncio.Event,
        loops: Mapping[str, Loop],
        *,
        graceful: Collection[str] = (),
        grace: float = 10.0,
    ) -> None:
        self.leadership = leadership
        self.stop = stop
        self.loops = dict(loops)
        self.graceful = frozenset(graceful)
        self.grace = grace
        # The current term's tasks by name (empty while following), for the health check.
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.terms = 0  # how often this replica has gained the lead

    async def run(self) -> None:
        while not self.stop.is_set():
            if not await self._until(self.leadership.wait_until_leader()):
                return
            await self._term()

    async def _until(self, waiting: Awaitable[None]) -> bool:
        """Wait for `waiting` or `stop`, whichever comes first; True if `waiting` did."""
        waiter = asyncio.ensure_future(waiting)
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            return waiter.done() and not self.stop.is_set()
        finally:
            for task in (waiter, stopped):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _term(self) -> None:
        self.terms += 1
        log.info("leading: starting the leader's tasks", replica=self.leadership.replica)
        self.tasks = {
            name: asyncio.create_task(_run_loop(loop), name=name)
            for name, loop in self.loops.items()
        }
        lost = asyncio.ensure_future(self.leadership.wait_until_lost())
        stopped = asyncio.ensure_future(self.stop.wait())
        running = set(self.tasks.values())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {*running, lost, stopped}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done & running:
                    running.discard(task)
                    if not task.cancelled() and (exc := task.exception()) is not None:
                        raise exc
                if stopped in done:
                    waiting = [t for t in running if t.get_name() in self.graceful]
                    if waiting:
                        await asyncio.wait(waiting, timeout=self.grace)
                    return
                if lost in done:
                    # Checked after `stopped`: stopping is not losing.
                    log.warning(
                        "lost the lead: cancelling the leader's tasks",
                        replica=self.leadership.replica,
                        tasks=sorted(t.get_name() for t in running),
                    )
                    return
        finally:
            tasks = [*self.tasks.values(), lost, stopped]
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for task, result in zip(tasks, results, strict=True):
                if isinstance(result, Exception) and task in running:
                    log.error(
                        "leader task failed while cancelled",
                        task=task.get_name(),
                        error=repr(result),
                    )
            self.tasks = {}


async def _run_loop(loop: Loop) -> None:
    await loop()
