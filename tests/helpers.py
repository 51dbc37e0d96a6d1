"""Helpers shared by the test modules (imported as `helpers`: pytest puts tests/ on the path)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web

from eventsync.app import App, open_app
from eventsync.bookstack.client import BookStackClient
from eventsync.config import Settings
from eventsync.testing import FakeBookStack

# Set by conftest's on_both_backends while a test runs on PostgreSQL: the URL to use for a
# SQLite path a test names (commands the test starts get the URL in their environment).
DATABASES: Callable[[Any], str] | None = None


def database_value(path: Any) -> str:
    """EVENTSYNC_DATABASE for the database a test calls `path`, on the backend it runs on."""
    return DATABASES(path) if DATABASES is not None else str(path)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "the condition"
) -> None:
    """Wait until `check()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        await asyncio.sleep(0.1)


def first_difference(mirror: dict[str, Any], truth: dict[str, Any]) -> str | None:
    """The first section and row where the mirror's export and the truth differ."""
    for section in truth:
        rows = mirror.get(section)
        if rows is None:
            return f"{section}: missing from the export"
        for index, (got, want) in enumerate(zip(rows, truth[section], strict=False)):
            if got != want:
                fields = sorted(k for k in {*got, *want} if got.get(k) != want.get(k))
                return (
                    f"{section}[{index}] (id {want.get('id', want.get('content_id'))}) "
                    f"differs in {fields}: mirror {got} != truth {want}"
                )
        if len(rows) != len(truth[section]):
            extra = rows[len(truth[section]) :] or truth[section][len(rows) :]
            return f"{section}: mirror {len(rows)} rows, truth {len(truth[section])}; {extra[0]}"
    return None


def client_for(fake: FakeBookStack, **overrides: Any) -> BookStackClient:
    """A client of `fake` that retries fast (tests wait milliseconds, not the production
    back-off) and is not throttled by default."""
    options: dict[str, Any] = {
        "requests_per_minute": 100_000,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "max_attempts": 2,
        **overrides,
    }
    return BookStackClient(fake.url, fake.token_id, fake.token_secret, **options)


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every JSON body with its headers, and can
    run a hook on each arrival."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self.on_body: Callable[[Any], Awaitable[None]] | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None

    def keep(self, body: Any) -> Any:
        """What is kept of a body (subclasses tag it)."""
        return body

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(self.keep(body))
        self.headers.append(dict(request.headers))
        if self.on_body is not None:
            await self.on_body(body)
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def events(self) -> list[str]:
        return [b["event"] for b in self.bodies]


def mirror_settings(fake: FakeBookStack, db: Any, **extra: Any) -> Settings:
    """Settings of a mirror of `fake` in `db`, not throttled; `extra` overrides."""
    values: dict[str, Any] = {
        "bookstack_url": fake.url,
        "bookstack_token_id": fake.token_id,
        "bookstack_token_secret": fake.token_secret,
        "database": db,
        "requests_per_minute": 100_000,
        **extra,
    }
    return Settings(**values)


def app_for(fake: FakeBookStack, db: Any, **options: Any) -> AbstractAsyncContextManager[App]:
    """The composition root (app.open_app) of a mirror of `fake` in `db`, with a client_for
    `fake`; `options` go to App.build."""
    return open_app(mirror_settings(fake, db), client=client_for(fake), **options)


def service_settings(fake: FakeBookStack, db: Any, secret: str, **extra: Any) -> Settings:
    """Settings of a `serve` against `fake`: any port on 127.0.0.1, no throttle, a fast poll,
    the sweep off; `extra` overrides."""
    values: dict[str, Any] = {
        "webhook_secret": secret,
        "listen": "127.0.0.1:0",
        "poll_interval": 0.3,
        "sweep_share": 0.0,
        **extra,
    }
    return mirror_settings(fake, db, **values)
