"""A webhook receiver for the delivery tests: a real aiohttp server on 127.0.0.1 that records
every request (verified with the Standard Webhooks reference implementation) and answers as
the test tells it to: succeed, fail, hang past the sender's timeout, drop the connection,
redirect, or stream an answer that never ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

# What the receiver does with a request.
OK = "ok"
FAIL = "fail"  # 500, after reading the body
HANG = "hang"  # reads the body, answers 200 only after `hang` seconds: too late
DROP = "drop"  # reads the body, closes the connection without an answer
REDIRECT = "redirect"  # 307 to `redirect_to`
ENDLESS = "endless"  # 200, then a body that never ends
BUSY = "busy"  # 503 with Retry-After
HUGE = "huge"  # 500 with a 5 MB body
SLOW = "slow"  # 204 after `slow` seconds (within the sender's timeout)


# What a receiver has processed once it took the body: it answered 2xx, or it meant to and
# the answer came too late or was cut off (the sender cannot tell those from a failure).
PROCESSED = frozenset({OK, HANG, SLOW, ENDLESS})


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived
    behaviour: str
    verified: bool
    error: str = ""

    @property
    def processed(self) -> bool:
        return self.behaviour in PROCESSED

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def changes(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.body)["changes"]
        return rows


@dataclass
class Receiver:
    secret: str | None = None
    default: str = OK
    plan: list[str] = field(default_factory=list)  # behaviours for the next requests
    hang: float = 5.0
    slow: float = 0.3
    in_flight: int = 0
    redirect_to: str = ""
    retry_after: str = "1"
    received: list[Received] = field(default_factory=list)
    url: str = ""
    port: int = 0  # 0: any free port (kept across stop() and start(): an outage, then back)
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        behaviour = self.plan.pop(0) if self.plan else self.default
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified, error = False, ""
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
                verified = True
            except WebhookVerificationError as exc:
                error = str(exc)
        self.received.append(Received(headers, body, time.time(), behaviour, verified, error))
        self._arrived.set()
        if behaviour == SLOW:
            self.in_flight += 1
            try:
                await asyncio.sleep(self.slow)
            finally:
                self.in_flight -= 1
            return web.Response(status=204)
        if behaviour == FAIL:
            return web.Response(status=500, text="receiver is broken")
        if behaviour == HUGE:
            return web.Response(status=500, body=b"y" * 5_000_000)
        if behaviour == BUSY:
            return web.Response(status=503, headers={"Retry-After": self.retry_after})
        if behaviour == HANG:
            await asyncio.sleep(self.hang)
            return web.Response(status=200)
        if behaviour == DROP:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # nothing more to say on a closed connection
        if behaviour == REDIRECT:
            return web.Response(status=307, headers={"Location": self.redirect_to})
        if behaviour == ENDLESS:
            response = web.StreamResponse(status=200)
            await response.prepare(request)
            try:
                while True:
                    await response.write(b"x" * 65536)
                    await asyncio.sleep(0.001)
            except (ConnectionError, asyncio.CancelledError):
                return response
        return web.Response(status=204)

    # ---- what arrived --------------------------------------------------------------------------

    def by_id(self, processed: bool = True) -> dict[str, list[dict[str, Any]]]:
        """Every distinct webhook-id this receiver processed (or, with processed=False, got)
        with its rows, in order of first arrival. Fails when one id ever came with other
        rows: a receiver deduping by id would lose some."""
        seen: dict[str, list[dict[str, Any]]] = {}
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.received:
            rows = r.changes
            if r.webhook_id in seen:
                assert seen[r.webhook_id] == rows, f"webhook-id {r.webhook_id} with other rows"
            seen.setdefault(r.webhook_id, rows)
            if (r.processed or not processed) and r.webhook_id not in out:
                out[r.webhook_id] = rows
        return out

    def deduped(self) -> list[dict[str, Any]]:
        """What a receiver that dedups by webhook-id processed, in order: each delivery
        it answered 2xx (or took and answered too late), once."""
        return [row for rows in self.by_id().values() for row in rows]

    def seqs(self) -> list[int]:
        return [row["seq"] for row in self.deduped()]

    def behaviours(self) -> list[str]:
        return [r.behaviour for r in self.received]


async def wait_for_requests(receiver: Receiver, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.received) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(receiver.received)} requests arrived, not {count}")
        receiver._arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(receiver._arrived.wait(), 0.2)


def without_state(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "state"} for row in rows]
