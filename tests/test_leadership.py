"""The leader's loops (eventsync/leadership.py): started on gaining the lead, cancelled on
losing it, given their grace on stopping. Against a leadership switched by hand; the real
PostgreSQL one is in test_coordination.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from helpers import eventually

from eventsync.leadership import AlwaysLeader, LeaderTasks

pytestmark = pytest.mark.timeout(30)


class SwitchedLeadership:
    """A Leadership that leads when the test says so."""

    replica = "test:1"

    def __init__(self) -> None:
        self._leading = asyncio.Event()
        self._following = asyncio.Event()
        self._following.set()

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    def gain(self) -> None:
        self._following.clear()
        self._leading.set()

    def lose(self) -> None:
        self._leading.clear()
        self._following.set()

    async def wait_until_leader(self) -> None:
        await self._leading.wait()

    async def wait_until_lost(self) -> None:
        await self._following.wait()

    async def leader(self) -> dict[str, Any] | None:
        return None


class Recorder:
    """Loops that say when they start and how they end."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def loop(self, name: str, *, ends_after: float | None = None, fails: bool = False) -> Any:
        async def run() -> None:
            self.log.append((name, "started"))
            try:
                if fails:
                    raise RuntimeError(f"{name} broke")
                await asyncio.sleep(3600 if ends_after is None else ends_after)
                self.log.append((name, "ended"))
            except asyncio.CancelledError:
                self.log.append((name, "cancelled"))
                raise

        return run

    def of(self, name: str) -> list[str]:
        return [what for who, what in self.log if who == name]


async def test_loops_run_only_while_leading_and_are_cancelled_the_moment_it_is_lost() -> None:
    leadership, rec, stop = SwitchedLeadership(), Recorder(), asyncio.Event()
    tasks = LeaderTasks(
        leadership, stop, {"poller": rec.loop("poller"), "once": rec.loop("once", ends_after=0)}
    )
    runner = asyncio.create_task(tasks.run())
    await asyncio.sleep(0.2)
    assert rec.log == []  # following: nothing runs
    leadership.gain()
    await soon(lambda: rec.of("poller") == ["started"], timeout=2)
    await soon(lambda: rec.of("once") == ["started", "ended"], timeout=2)
    assert set(tasks.tasks) == {"poller", "once"} and tasks.terms == 1
    leadership.lose()
    await soon(lambda: rec.of("poller") == ["started", "cancelled"], timeout=1)
    assert tasks.tasks == {}
    # Leading again: a new term starts every loop again, the one that had ended too.
    leadership.gain()
    await soon(lambda: rec.of("poller") == ["started", "cancelled", "started"])
    assert rec.of("once") == ["started", "ended", "started", "ended"]
    assert tasks.terms == 2
    stop.set()
    await asyncio.wait_for(runner, 2)
    assert rec.of("poller")[-1] == "cancelled"


async def test_stopping_gives_the_graceful_loops_their_grace_and_cancels_the_rest() -> None:
    leadership, rec, stop = SwitchedLeadership(), Recorder(), asyncio.Event()
    leadership.gain()
    finished = asyncio.Event()

    async def poller() -> None:
        rec.log.append(("poller", "started"))
        await stop.wait()
        await asyncio.sleep(0.3)  # commits what it has read
        rec.log.append(("poller", "ended"))
        finished.set()

    tasks = LeaderTasks(
        leadership, stop, {"poller": poller, "sweep": rec.loop("sweep")}, graceful={"poller"}
    )
    runner = asyncio.create_task(tasks.run())
    await soon(lambda: len(rec.log) == 2, timeout=2)
    stop.set()
    await asyncio.wait_for(runner, 2)
    assert finished.is_set()
    assert rec.of("poller") == ["started", "ended"]
    assert rec.of("sweep") == ["started", "cancelled"]


async def test_a_failing_loop_ends_the_run_with_its_error_and_cancels_the_others() -> None:
    leadership, rec, stop = SwitchedLeadership(), Recorder(), asyncio.Event()
    leadership.gain()
    tasks = LeaderTasks(
        leadership, stop, {"poller": rec.loop("poller"), "sweep": rec.loop("sweep", fails=True)}
    )
    with pytest.raises(RuntimeError, match="sweep broke"):
        await asyncio.wait_for(tasks.run(), 2)
    assert rec.of("poller") == ["started", "cancelled"]


async def test_cancelling_the_run_cancels_the_loops() -> None:
    leadership, rec, stop = SwitchedLeadership(), Recorder(), asyncio.Event()
    leadership.gain()
    runner = asyncio.create_task(LeaderTasks(leadership, stop, {"p": rec.loop("p")}).run())
    await soon(lambda: rec.of("p") == ["started"], timeout=2)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert rec.of("p") == ["started", "cancelled"]


async def test_the_sqlite_serve_always_leads() -> None:
    leadership, rec, stop = (
        AlwaysLeader("host:42", "2025-01-01T00:00:00Z"),
        Recorder(),
        asyncio.Event(),
    )
    runner = asyncio.create_task(LeaderTasks(leadership, stop, {"p": rec.loop("p")}).run())
    await soon(lambda: rec.of("p") == ["started"], timeout=2)
    assert await leadership.leader() == {
        "replica": "host:42",
        "since": "2025-01-01T00:00:00Z",
        "alive": True,
        "heartbeat_age": None,
    }
    stop.set()
    await asyncio.wait_for(runner, 2)


async def soon(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, timeout=timeout)
