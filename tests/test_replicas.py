"""Replicas: two and three `eventsync serve` processes on one PostgreSQL mirror behind a
round-robin proxy, as a deployment runs them. Any replica takes any webhook; one is killed
with SIGKILL in the middle of a burst and left down, then restarted; the leader's loops move
to a survivor; and together they keep to one request budget."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import eventually, first_difference
from test_serve import (
    WEBHOOK_SECRET,
    Serve,
    export,
    free_port,
    run_cli,
    serve_env,
    serving,
)

from eventsync.testing import FakeBookStack

pytestmark = pytest.mark.timeout(180)


class RoundRobin:
    """A load balancer on 127.0.0.1: each request to the next replica in turn; one that
    refuses the connection is skipped for the next (nginx's `proxy_next_upstream error`)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.sent: dict[int, int] = dict.fromkeys(ports, 0)
        self._turn = itertools.count()
        self.port = free_port()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        start = next(self._turn)
        for step in range(len(self.ports)):
            port = self.ports[(start + step) % len(self.ports)]
            try:
                async with self._session.request(
                    request.method,
                    f"http://127.0.0.1:{port}{request.path_qs}",
                    data=body,
                    headers={"Content-Type": request.headers.get("Content-Type", "")},
                ) as answer:
                    self.sent[port] += 1
                    return web.Response(status=answer.status, body=await answer.read())
            except aiohttp.ClientConnectionError:
                continue
        return web.Response(status=502)

    async def __aenter__(self) -> RoundRobin:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None and self._session is not None
        await self._runner.cleanup()
        await self._session.close()


async def status_of(serve: Serve) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        return await serve.status(session)


async def leader_of(serves: list[Serve]) -> Serve:
    """The replica that leads, as the replicas' own /status says; waits for there to be one."""
    found: list[Serve] = []

    async def one() -> bool:
        found.clear()
        for serve in serves:
            if serve.proc.returncode is None:
                status = await status_of(serve)
                leader = status.get("leader") or {}
                if leader.get("alive") and leader.get("replica") == status.get("replica"):
                    found.append(serve)
        return len(found) == 1

    await eventually(one, timeout=20.0, what="one replica leading")
    return found[0]


async def converges(env: dict[str, str], cwd: Path, fake: FakeBookStack, timeout: float) -> None:
    last: dict[str, Any] = {}

    async def equal() -> bool:
        nonlocal last
        last = await export(env, cwd)
        return last == fake.truth()

    try:
        await eventually(equal, timeout=timeout)
    except AssertionError:
        raise AssertionError(first_difference(last, fake.truth())) from None


@asynccontextmanager
async def replicas(
    fake: FakeBookStack, database: str, cwd: Path, count: int, **extra: str
) -> AsyncIterator[tuple[list[dict[str, str]], list[Serve]]]:
    """`count` serves started at the same moment on one (empty) PostgreSQL mirror."""
    envs = [serve_env(fake, database, free_port(), **extra) for _ in range(count)]
    async with AsyncExitStack() as stack:
        serves = await asyncio.gather(
            *(
                stack.enter_async_context(serving(env, cwd, f"replica-{n}"))
                for n, env in enumerate(envs)
            )
        )
        yield envs, list(serves)


async def test_two_replicas_lose_nothing_when_the_leader_is_killed_mid_burst(
    postgres_url: str, tmp_path: Path
) -> None:
    async with FakeBookStack(requests_per_minute=100_000) as fake:
        fake.seed(pages=60, books=4, shelves=2, permission_share=0.0, seed=21)
        async with replicas(fake, postgres_url, tmp_path, 2) as (envs, serves):
            # The initial sync ran once, on the leader: the other replica read nothing.
            leader = await leader_of(serves)
            follower = next(s for s in serves if s is not leader)
            async with RoundRobin([s.port for s in serves]) as proxy:
                fake.add_webhook(f"{proxy.url}/webhooks/bookstack/{WEBHOOK_SECRET}")
                pages = sorted(fake.state.pages)
                fake.faults.latency = 0.02  # jobs still queued and leased at the kill
                for n, page_id in enumerate(pages[:30]):
                    await fake.update_page(page_id, html=f"<p>burst edit {n}</p>")
                    if n == 12:
                        await leader.kill()  # SIGKILL, left down
                await fake.create_page(book_id=1, name="Born after the kill")
                await fake.delete_page(pages[-1])
                await fake.update_book(2, description="Described by the survivor's time")
                assert proxy.sent[leader.port] > 0 and proxy.sent[follower.port] > 0
                fake.faults.latency = 0.0
                # The survivor leads within seconds, finishes the dead one's leased jobs
                # (its process is gone) and polls the audit log for what reached nobody.
                assert await leader_of([follower]) is follower
                await converges(follower.env, tmp_path, fake, timeout=60.0)
                # `status` from outside the replicas names the same leader.
                result = await run_cli("status", "--json", env=follower.env, cwd=tmp_path)
                assert result.code == 0, result.stderr
                named = json.loads(result.stdout)["leader"]
                assert named["replica"] == (await status_of(follower))["replica"], named
                assert named["alive"] is True

                # Restarted, the killed replica follows (the lead stays where it is).
                index = serves.index(leader)
                async with serving(envs[index], tmp_path, "replica-restarted") as again:
                    proxy.ports[index] = again.port
                    proxy.sent[again.port] = 0
                    assert await leader_of([follower, again]) is follower
                    for page_id in pages[30:40]:
                        await fake.update_page(page_id, html="<p>after the restart</p>")
                    await converges(again.env, tmp_path, fake, timeout=30.0)
                    assert proxy.sent[again.port] > 0


async def test_three_replicas_together_keep_to_one_request_budget(
    postgres_url: str, tmp_path: Path
) -> None:
    rpm = 600  # 10 a second, and a burst of 10 (default_burst)
    async with FakeBookStack(requests_per_minute=100_000) as fake:
        fake.seed(pages=120, books=6, permission_share=0.0, seed=22)
        async with replicas(
            fake, postgres_url, tmp_path, 3, EVENTSYNC_REQUESTS_PER_MINUTE=str(rpm)
        ) as (envs, serves):
            async with RoundRobin([s.port for s in serves]) as proxy:
                fake.add_webhook(f"{proxy.url}/webhooks/bookstack/{WEBHOOK_SECRET}")
                fake.requests.clear()
                started = time.monotonic()
                for page_id in sorted(fake.state.pages)[:80]:
                    await fake.update_page(page_id, html="<p>spread over three replicas</p>")
                await converges(envs[0], tmp_path, fake, timeout=60.0)
                assert all(n > 0 for n in proxy.sent.values()), proxy.sent
            times = sorted(r.at for r in fake.requests if r.at >= started)
        # Every window of w seconds holds at most the burst plus w seconds' worth of tokens:
        # together, not each. Three budgets of their own would allow three times that.
        assert len(times) >= 80
        for window in (1.0, 2.0, 5.0):
            allowed = 10 + rpm / 60 * window
            most = max(
                sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times)
            )
            assert most <= allowed + 1, f"{most} requests in {window} s (budget {allowed})"
