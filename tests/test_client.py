"""BookStackClient and RateLimiter against real HTTP servers scripted inside each test."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from eventsync.bookstack.client import BookStackClient, ClientStats, route_template
from eventsync.bookstack.models import AuditLogEntry, ContentPermissions, Page, Role, Shelf
from eventsync.bookstack.ratelimit import LocalBudget, RateLimiter, default_burst
from eventsync.bookstack.token import TokenState
from eventsync.errors import (
    AuthError,
    ForbiddenError,
    IncompleteListing,
    InvalidRequest,
    NotFound,
    PermanentError,
    Unavailable,
    UnknownRoute,
)
from eventsync.testing.api import not_found_page

TOKEN_ID = "tok-id-123"
TOKEN_SECRET = "tok-secret-very-private"

Row = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServeFactory = Callable[[dict[str, Handler]], Awaitable[str]]
ClientFactory = Callable[..., BookStackClient]


@pytest.fixture
def serve(aiohttp_server: Callable[[web.Application], Awaitable[TestServer]]) -> ServeFactory:
    """`await serve({"/api/pages/{id}": handler})` → base URL of a running server."""

    async def factory(routes: dict[str, Handler]) -> str:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")

    return factory


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """A client with fast retries (and a generous rate) unless a test says otherwise."""
    clients: list[BookStackClient] = []

    def factory(base_url: str, **kwargs: Any) -> BookStackClient:
        kwargs.setdefault("requests_per_minute", 6000)
        kwargs.setdefault("backoff_base", 0.001)
        kwargs.setdefault("backoff_cap", 0.01)
        client = BookStackClient(base_url, TOKEN_ID, TOKEN_SECRET, **kwargs)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


def scripted(*responses: Callable[[], web.StreamResponse]) -> tuple[Handler, list[web.Request]]:
    """A handler answering with `responses` in turn (the last one repeats); logs requests."""
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        return responses[min(len(seen), len(responses)) - 1]()

    return handler, seen


def ok(payload: Row | None = None) -> Callable[[], web.StreamResponse]:
    return lambda: web.json_response(payload if payload is not None else {"id": 1})


def status(code: int, body: Row | None = None, **headers: str) -> Callable[[], web.Response]:
    return lambda: web.json_response(body or {}, status=code, headers=headers)


class ListingServer:
    """A BookStack listing: `filter[id:gt]`, `sort=±id`, `count`, `offset`, `total`.

    `hook(request_index, page)` runs after each page is cut and before it is sent: it may
    change `rows` (to simulate concurrent inserts and deletes) or return another page.
    """

    def __init__(self, rows: list[Row], *, ignore_id_filter: bool = False) -> None:
        self.rows = {row["id"]: row for row in rows}
        self.ignore_id_filter = ignore_id_filter
        self.queries: list[dict[str, str]] = []
        self.hook: Callable[[int, list[Row]], list[Row] | None] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.queries.append(query)
        rows = sorted(self.rows.values(), key=lambda row: row["id"])
        after = query.get("filter[id:gt]")
        if after is not None and not self.ignore_id_filter:
            rows = [row for row in rows if row["id"] > int(after)]
        if query.get("sort") == "-id":
            rows.reverse()
        total = len(rows)
        offset = int(query.get("offset", 0))
        page = rows[offset : offset + int(query.get("count", 100))]
        if self.hook is not None:
            page = self.hook(len(self.queries), page) or page
        return web.json_response({"data": page, "total": total})


def rows(n: int, start: int = 1) -> list[Row]:
    return [{"id": i, "name": f"item {i}"} for i in range(start, start + n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- session, auth, cookies -----------------------------------------------------------------


async def test_auth_headers_sent_and_cookies_neither_stored_nor_sent(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        response = web.json_response({"id": 1})
        response.set_cookie("bookstack_session", "session-value")
        return response

    client = make_client(await serve({"/api/pages/{id}": handler}))
    async with client:
        assert await client.get("/api/pages/1") == {"id": 1}
        assert await client.get("/api/pages/2") == {"id": 1}
        assert isinstance(client._session.cookie_jar, aiohttp.DummyCookieJar)  # type: ignore[union-attr]

    assert len(seen) == 2
    for request in seen:
        assert request.headers["Authorization"] == f"Token {TOKEN_ID}:{TOKEN_SECRET}"
        assert request.headers["Accept"] == "application/json"
        assert request.headers["User-Agent"].startswith("eventsync/")
        assert "Cookie" not in request.headers
    assert TOKEN_SECRET not in repr(client)


async def test_close_is_idempotent_and_final(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    handler, _ = scripted(ok())
    client = make_client(await serve({"/api/pages/{id}": handler}))
    await client.get("/api/pages/1")  # session created lazily without `async with`
    await client.close()
    await client.close()
    with pytest.raises(RuntimeError):
        await client.get("/api/pages/1")


async def test_session_passed_in_gets_headers_and_is_left_open(serve: ServeFactory) -> None:
    handler, seen = scripted(ok())
    base = await serve({"/api/pages/{id}": handler})
    async with aiohttp.ClientSession() as session:
        async with BookStackClient(base, TOKEN_ID, TOKEN_SECRET, session=session) as client:
            await client.get("/api/pages/1")
        assert not session.closed
    assert seen[0].headers["Authorization"] == f"Token {TOKEN_ID}:{TOKEN_SECRET}"


# --- retries --------------------------------------------------------------------------------


async def test_5xx_is_retried_then_succeeds(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    handler, seen = scripted(status(503), status(503), ok({"id": 7}))
    client = make_client(await serve({"/api/pages/{id}": handler}))
    assert await client.get("/api/pages/7") == {"id": 7}
    assert len(seen) == 3
    assert client.stats.retries == 2
    assert client.stats.by_route[("/api/pages/{id}", 503)] == 2
    assert client.stats.by_route[("/api/pages/{id}", 200)] == 1


@pytest.mark.parametrize("draw", ["low", "high"])
async def test_5xx_retries_back_off_exponentially_with_full_jitter(
    serve: ServeFactory, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, draw: str
) -> None:
    """DESIGN 5: each retry waits a random time between 0 and a bound that doubles from
    backoff_base up to backoff_cap. With the random draw pinned to one end of its range the
    waits are exactly 0 or exactly the bounds: a retry without back-off, or one without
    jitter, cannot give both."""
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return low if draw == "low" else high

    monkeypatch.setattr(random, "uniform", uniform)
    handler, seen = scripted(*[status(503)] * 5, ok({"id": 7}))
    client = make_client(
        await serve({"/api/pages/{id}": handler}),
        max_attempts=6,
        backoff_base=0.01,
        backoff_cap=0.05,
    )
    with capture_logs() as logs:
        assert await client.get("/api/pages/7") == {"id": 7}
    assert len(seen) == 6
    bounds = [0.01, 0.02, 0.04, 0.05, 0.05]
    assert draws == [(0, pytest.approx(b)) for b in bounds]
    waits = [e["wait"] for e in logs if e["event"] == "bookstack.retry"]
    assert waits == ([0.0] * len(bounds) if draw == "low" else bounds)


async def test_2xx_that_is_not_json_is_retried(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    handler, seen = scripted(
        lambda: web.Response(text="<html>maintenance</html>", content_type="text/html"),
        ok({"id": 1}),
    )
    client = make_client(await serve({"/api/pages/{id}": handler}))
    assert await client.get("/api/pages/1") == {"id": 1}
    assert len(seen) == 2


async def test_exhausted_retries_raise_unavailable(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    handler, seen = scripted(status(502))
    client = make_client(await serve({"/api/pages/{id}": handler}), max_attempts=3)
    with pytest.raises(Unavailable) as caught:
        await client.get("/api/pages/1")
    assert len(seen) == 3
    assert caught.value.status == 502
    assert caught.value.path == "/api/pages/1"
    assert TOKEN_SECRET not in str(caught.value)
    assert client.stats.retries == 2


async def test_connection_errors_raise_unavailable(make_client: ClientFactory) -> None:
    client = make_client(f"http://127.0.0.1:{free_port()}", max_attempts=2)
    with pytest.raises(Unavailable) as caught:
        await client.get("/api/pages/1")
    assert caught.value.status is None
    assert client.stats.by_route[("/api/pages/{id}", 0)] == 2


async def test_timeouts_are_retried(serve: ServeFactory, make_client: ClientFactory) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.5)
        return web.json_response({"id": 1})

    client = make_client(await serve({"/api/pages/{id}": handler}), timeout=0.1)
    assert await client.get("/api/pages/1") == {"id": 1}
    assert calls == 2


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        (401, AuthError, "No matching API token was found for the provided authorization token"),
        # BookStack refuses an expired token, and a user without API access, with a 403: the
        # token is unusable all the same (FACTS §4).
        (403, AuthError, "The authorization token used has expired"),
        (
            403,
            AuthError,
            "The owner of the used API token does not have permission to make API calls",
        ),
        (403, ForbiddenError, "You do not have permission to perform the requested action."),
        (404, NotFound, "Page not found"),
        (422, InvalidRequest, "The given data was invalid."),
        (400, InvalidRequest, "Bad request"),
        (405, InvalidRequest, "Method not allowed"),
    ],
)
async def test_4xx_maps_to_errors_and_is_not_retried(
    serve: ServeFactory,
    make_client: ClientFactory,
    code: int,
    error: type[Exception],
    message: str,
) -> None:
    body: Row = {"error": {"message": message, "code": code}}
    if code == 422:
        body["error"]["validation"] = {"name": ["The name field is required."]}
    handler, seen = scripted(status(code, body))
    client = make_client(await serve({"/api/pages/{id}": handler}))
    with pytest.raises(error) as caught:
        await client.get("/api/pages/3")
    assert len(seen) == 1
    assert message in str(caught.value)
    assert caught.value.status == code  # type: ignore[attr-defined]
    assert caught.value.path == "/api/pages/3"  # type: ignore[attr-defined]
    assert TOKEN_SECRET not in str(caught.value) and TOKEN_ID not in str(caught.value)
    if code == 422:
        assert "The name field is required." in str(caught.value)
    # Every refusal but the token's is one that no repetition can fix.
    assert isinstance(caught.value, PermanentError) == (error is not AuthError)


async def test_an_html_404_is_an_unknown_route_not_a_missing_item(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    """BookStack answers an API route it does not have (the audit log before v23.08, a wrong
    base URL) with its HTML page: that must not read as "this item is gone", which would
    remove it from the mirror."""
    handler, seen = scripted(
        lambda: not_found_page("http://127.0.0.1", "http://127.0.0.1/api/audit-log")
    )
    client = make_client(await serve({"/api/audit-log": handler}))
    with pytest.raises(UnknownRoute, match="no such API route") as caught:
        await client.get("/api/audit-log", {"count": 1})
    assert not isinstance(caught.value, NotFound)
    assert caught.value.status == 404 and len(seen) == 1
    assert client.token.rejected is None


# --- a rejected token -------------------------------------------------------------------------


def unauthorized() -> web.Response:
    return web.json_response(
        {"error": {"message": "The secret provided for the given used API token is incorrect"}},
        status=401,
    )


async def test_after_a_401_nothing_is_sent_until_a_probe_finds_the_token_works(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    revoked = True
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return unauthorized() if revoked else web.json_response({"id": 1, "data": [], "total": 0})

    url = await serve({"/api/pages/{id}": handler, "/api/books": handler})
    client = make_client(url, token_probe_base=0.05, token_probe_cap=0.2)
    with capture_logs() as logs:
        with pytest.raises(AuthError):
            await client.get("/api/pages/1")
        for i in range(20):  # every caller, however many, is held back without a request
            with pytest.raises(AuthError, match="not sent"):
                await client.get(f"/api/pages/{i}")
    assert hits == ["/api/pages/1"]
    assert client.token.rejected is not None and client.token.held == 20
    assert not client.token.working.is_set()
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1 and "rejects the API token" in errors[0]["event"]

    # Probes at a growing interval: 0.05, 0.1, 0.2, 0.2, ... s.
    stop = asyncio.Event()
    prober = asyncio.create_task(client.until_token_works(stop))
    await asyncio.sleep(0.5)
    probes = client.token.probes
    assert 2 <= probes <= 4 and set(hits[1:]) == {"/api/books"}
    revoked = False
    assert await asyncio.wait_for(prober, 1.0) is True
    assert client.token.rejected is None and client.token.working.is_set()
    assert await client.get("/api/pages/7") == {"id": 1, "data": [], "total": 0}
    assert hits[-1] == "/api/pages/7"


async def test_an_answer_to_a_request_sent_before_the_401_does_not_end_the_rejection(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    async def slow_ok(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.json_response({"id": 1})

    async def refused(request: web.Request) -> web.Response:
        return unauthorized()

    client = make_client(await serve({"/api/pages/{id}": slow_ok, "/api/books/{id}": refused}))
    slow = asyncio.create_task(client.get("/api/pages/1"))  # sent while the token still worked
    await asyncio.sleep(0.1)
    with pytest.raises(AuthError):
        await client.get("/api/books/1")
    assert await slow == {"id": 1}
    assert client.token.rejected is not None


def test_token_probes_back_off_to_a_cap() -> None:
    token = TokenState(probe_base=5, probe_cap=120)
    delays = []
    for probes in range(8):
        token.probes = probes
        delays.append(token.next_probe_delay())
    assert delays == [5, 10, 20, 40, 80, 120, 120, 120]


async def test_redirect_is_an_error_not_followed(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    handler, seen = scripted(lambda: web.Response(status=302, headers={"Location": "/login"}))
    client = make_client(await serve({"/api/pages/{id}": handler}))
    with pytest.raises(InvalidRequest, match="check the base URL"):
        await client.get("/api/pages/1")
    assert len(seen) == 1


# --- 429 and the rate limiter ---------------------------------------------------------------


async def test_429_retry_after_pauses_every_task(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    stamps: list[tuple[float, int]] = []

    async def handler(request: web.Request) -> web.Response:
        stamps.append((time.monotonic(), len(stamps)))
        if len(stamps) == 1:
            return web.json_response(
                {"error": {"message": "Too Many Attempts.", "code": 429}},
                status=429,
                headers={"Retry-After": "1", "X-RateLimit-Remaining": "0"},
            )
        return web.json_response({"id": int(request.match_info["id"])})

    # 10 requests a second, burst 1: the 429 comes back long before the second request's turn.
    limiter = RateLimiter(600, burst=1)
    client = make_client(await serve({"/api/pages/{id}": handler}), limiter=limiter)
    started = time.monotonic()
    results = await asyncio.gather(*(client.get(f"/api/pages/{i}") for i in range(5)))

    assert sorted(r["id"] for r in results) == [0, 1, 2, 3, 4]
    assert time.monotonic() - started >= 1.0
    refused_at = stamps[0][0]
    assert len(stamps) == 6
    assert all(at >= refused_at + 1.0 for at, _ in stamps[1:])
    assert client.stats.rate_limited == 1
    assert client.stats.retries == 0  # 429s do not use up the 5xx retry budget
    assert client.stats.by_route[("/api/pages/{id}", 429)] == 1
    assert client.stats.limiter_waits >= 4


async def test_endless_429_gives_up(serve: ServeFactory, make_client: ClientFactory) -> None:
    handler, seen = scripted(
        status(429, {"error": {"message": "Too Many Attempts."}}, **{"Retry-After": "0"})
    )
    client = make_client(await serve({"/api/pages/{id}": handler}), max_rate_limited=3)
    with pytest.raises(Unavailable) as caught:
        await client.get("/api/pages/1")
    assert caught.value.status == 429
    assert len(seen) == 4


def test_retry_after_forms() -> None:
    client = BookStackClient("http://127.0.0.1:1", TOKEN_ID, TOKEN_SECRET, max_retry_after=120)
    in_30s = datetime.now(UTC) + timedelta(seconds=30)
    assert client._retry_after({"Retry-After": "5"}) == pytest.approx(5.25)
    assert 28 < client._retry_after({"Retry-After": format_datetime(in_30s, usegmt=True)}) < 31
    assert 28 < client._retry_after({"X-RateLimit-Reset": str(int(time.time()) + 30)}) < 31.5
    assert client._retry_after({"Retry-After": "3600"}) == 120
    assert client._retry_after({}) == pytest.approx(60.25)
    assert client._retry_after({"Retry-After": "soon"}) == pytest.approx(60.25)


async def test_rate_limiter_never_exceeds_budget_server_side(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    stamps: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        stamps.append(time.monotonic())
        return web.json_response({"id": 1})

    client = make_client(
        await serve({"/api/pages/{id}": handler}), limiter=RateLimiter(600, burst=2)
    )
    await asyncio.gather(*(client.get(f"/api/pages/{i}") for i in range(25)))
    assert len(stamps) == 25
    # 10 a second plus a burst of 2, with one request's worth of scheduling slack.
    worst = max(sum(1 for s in stamps if start <= s < start + 1.0) for start in stamps)
    assert worst <= 13
    assert stamps[-1] - stamps[0] >= 2.2 - 0.05  # (25 - 2) requests at 0.1 s each


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


async def test_limiter_spaces_requests_by_fake_clock() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, burst=3, clock=clock, sleep=clock.sleep)
    waited = [await limiter.acquire() for _ in range(10)]
    assert waited[:3] == [0.0, 0.0, 0.0]
    assert waited[3:] == pytest.approx([1.0] * 7)
    assert clock.now == pytest.approx(1007.0)
    assert limiter.waits == 7
    assert limiter.waited_seconds == pytest.approx(7.0)


async def test_limiter_is_fifo_under_contention() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, burst=1, clock=clock, sleep=clock.sleep)
    done: list[int] = []

    async def worker(i: int) -> None:
        await limiter.acquire()
        done.append(i)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(worker(i)))
        await asyncio.sleep(0)  # start them in a known order
    await asyncio.gather(*tasks)
    assert done == [0, 1, 2, 3, 4, 5]
    assert clock.now == pytest.approx(1005.0)


async def test_limiter_pause_and_headers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(150, clock=clock, sleep=clock.sleep)
    limiter.pause_until(clock.now + 5)
    limiter.pause_until(clock.now + 2)  # never shortens a pause
    assert await limiter.acquire() == pytest.approx(5.0)

    # The first hit of a server window was seen at t; remaining 0 later pauses until t + 60.
    seen_at = clock.now
    limiter.update_from_headers(179, 180)
    clock.now += 10
    limiter.update_from_headers(0, 180)
    assert limiter.paused_until == pytest.approx(seen_at + 60)
    assert await limiter.acquire() == pytest.approx(50.0)

    # Without that, a whole window from now.
    clock.now += 100
    limiter.update_from_headers(0, None)
    assert limiter.paused_until == pytest.approx(clock.now + 60)


async def test_limiter_defaults_and_fitting_a_lower_server_limit() -> None:
    assert RateLimiter(150).burst == 10
    assert RateLimiter(30).burst == 5
    assert RateLimiter(3).burst == default_burst(3) == 1
    with pytest.raises(ValueError):
        RateLimiter(0)
    limiter = RateLimiter(150)
    limiter.update_from_headers(50, 180)  # the server allows more than we use: unchanged
    assert (limiter.per_minute, limiter.burst) == (150, 10)
    limiter.update_from_headers(50, 60)  # BookStack set to 60 a minute: fit burst + rate in it
    assert limiter.burst + limiter.per_minute <= 60
    limiter.update_from_headers(50, 180)  # never raised again above what fits
    assert limiter.burst + limiter.per_minute <= 60


# --- listings -------------------------------------------------------------------------------


async def test_keyset_pagination_survives_concurrent_inserts_and_deletes(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    listing = ListingServer(rows(1234))
    deleted_ahead: set[int] = set()
    inserted: set[int] = set()

    def churn(index: int, page: list[Row]) -> None:
        if len(page) < 500:  # the last page: nothing comes after it
            return
        last = page[-1]["id"]
        # Delete a row already served and one not reached yet; insert a new row at the end.
        listing.rows.pop(page[0]["id"], None)
        ahead = last + 7
        if ahead in listing.rows:
            listing.rows.pop(ahead)
            deleted_ahead.add(ahead)
        new_id = max(listing.rows) + 1
        listing.rows[new_id] = {"id": new_id, "name": "new"}
        inserted.add(new_id)

    listing.hook = churn  # type: ignore[assignment]
    client = make_client(await serve({"/api/pages": listing.handle}))
    got = await client.list_all("/api/pages")

    ids = [row["id"] for row in got]
    assert ids == sorted(set(ids))  # every row once, ascending
    expected = (set(range(1, 1235)) - deleted_ahead) | inserted
    assert set(ids) == expected
    assert len(listing.queries) == 3
    assert all(q["sort"] == "+id" and q["count"] == "500" for q in listing.queries)
    assert "filter[id:gt]" not in listing.queries[0]
    assert listing.queries[1]["filter[id:gt]"] == "500"


async def test_listing_edges(serve: ServeFactory, make_client: ClientFactory) -> None:
    empty, small = ListingServer([]), ListingServer(rows(10))
    client = make_client(await serve({"/api/books": empty.handle, "/api/pages": small.handle}))
    assert await client.list_all("/api/books") == []
    assert len(await client.list_all("/api/pages")) == 10
    assert len(empty.queries) == len(small.queries) == 1
    # A caller's own id:gt becomes the keyset start.
    assert [r["id"] for r in await client.list("/api/pages", filters={"id:gt": 7})] == [8, 9, 10]
    first = [row async for row in client.list("/api/pages", count=3)]
    assert len(first) == 10
    assert [q.get("filter[id:gt]") for q in small.queries[-4:]] == [None, "3", "6", "9"]


async def test_short_listing_raises_incomplete(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    listing = ListingServer(rows(1234))
    listing.hook = lambda index, page: page[:499] if index == 2 else None  # type: ignore[assignment]
    client = make_client(await serve({"/api/pages": listing.handle}))
    with pytest.raises(IncompleteListing):
        await client.list_all("/api/pages")

    # Iterating yields what did arrive, then raises at the end.
    listing.queries.clear()
    got: list[Row] = []
    with pytest.raises(IncompleteListing):
        async for row in client.list("/api/pages"):
            got.append(row)
    assert len(got) == 999


async def test_server_ignoring_id_filter_is_detected(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    listing = ListingServer(rows(1234), ignore_id_filter=True)
    client = make_client(await serve({"/api/pages": listing.handle}))
    with pytest.raises(IncompleteListing, match="ignored"):
        await client.list_all("/api/pages")
    assert len(listing.queries) == 2


async def test_malformed_listing_is_incomplete(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    handler, _ = scripted(ok({"data": [{"id": 1}]}))  # no total
    client = make_client(await serve({"/api/pages": handler}))
    with pytest.raises(IncompleteListing):
        await client.list_all("/api/pages")


def roles_server(n: int, shift: int) -> tuple[Handler, list[dict[str, str]]]:
    """/api/roles with offset paging whose pages start `shift` rows off (unstable sort)."""
    all_roles = [{"id": i, "display_name": f"role {i:04}"} for i in range(1, n + 1)]
    queries: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        query = dict(request.query)
        queries.append(query)
        offset, count = int(query.get("offset", 0)), int(query["count"])
        start = max(0, offset + shift) if offset else 0
        return web.json_response({"data": all_roles[start : start + count], "total": n})

    return handler, queries


async def test_roles_are_paged_by_offset_and_deduplicated(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    handler, queries = roles_server(1100, shift=-1)  # each page repeats the previous last row
    client = make_client(await serve({"/api/roles": handler}))
    got = await client.list_all("/api/roles")
    assert sorted(r["id"] for r in got) == list(range(1, 1101))
    assert [q["offset"] for q in queries] == ["0", "500", "1000"]
    assert all(q["sort"] == "+display_name" and "filter[id:gt]" not in q for q in queries)
    with pytest.raises(ValueError):
        client.list("/api/roles", filters={"id:gt": 1})


async def test_roles_with_skipped_rows_are_incomplete(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    handler, _ = roles_server(1100, shift=+1)  # each page skips one row
    client = make_client(await serve({"/api/roles": handler}))
    with pytest.raises(IncompleteListing, match="1099 distinct"):
        await client.list_all("/api/roles")


async def test_bad_filters_fail_before_any_request(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    listing = ListingServer(rows(3))
    client = make_client(await serve({"/api/pages": listing.handle}))
    with pytest.raises(ValueError, match="drafts"):
        await client.list_all("/api/pages", filters={"drafts": 0})
    with pytest.raises(ValueError, match="operator"):
        client.list("/api/pages", filters={"draft:is": 0})
    with pytest.raises(ValueError, match="unknown listing endpoint"):
        client.list("/api/page")
    with pytest.raises(ValueError, match="count"):
        client.list("/api/pages", count=501)
    assert listing.queries == []

    await client.list_all(
        "/api/pages", filters={"draft": False, "template": True, "name:like": "a%"}
    )
    assert listing.queries[0]["filter[draft]"] == "0"
    assert listing.queries[0]["filter[template]"] == "1"
    assert listing.queries[0]["filter[name:like]"] == "a%"


# --- audit log ------------------------------------------------------------------------------


async def test_audit_log_after_and_latest_id(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    log_rows = [
        {"id": i, "type": "page_update", "detail": f"({i}) p", "created_at": "2024-10-15 10:00:00"}
        for i in range(1, 1101)
    ]
    listing, empty = ListingServer(log_rows), ListingServer([])
    client = make_client(await serve({"/api/audit-log": listing.handle}))
    assert await client.latest_audit_id() == 1100
    assert listing.queries[-1] == {"sort": "-id", "count": "1"}

    ids = [row["id"] async for row in client.audit_log_after(1000)]
    assert ids == list(range(1001, 1101))
    assert listing.queries[-1]["filter[id:gt]"] == "1000"

    first = await client.audit_log_after(0, limit_pages=1)
    assert [row["id"] for row in first] == list(range(1, 501))

    empty_client = make_client(await serve({"/api/audit-log": empty.handle}))
    assert await empty_client.latest_audit_id() is None
    assert await empty_client.audit_log_after(5) == []


# --- stats ----------------------------------------------------------------------------------


async def test_stats_count_by_route_template(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    page, _ = scripted(ok())
    missing, _ = scripted(status(404, {"error": {"message": "gone", "code": 404}}))
    client = make_client(
        await serve(
            {
                "/api/pages/{id}": page,
                "/api/books/{id}": missing,
                "/api/content-permissions/{type}/{id}": page,
            }
        )
    )
    await client.get("/api/pages/12")
    await client.get("/api/pages/13")
    await client.get("/api/content-permissions/page/7")
    with pytest.raises(NotFound):
        await client.get("/api/books/5")
    stats: ClientStats = client.stats
    assert stats.requests == 4
    assert stats.by_route == {
        ("/api/pages/{id}", 200): 2,
        ("/api/content-permissions/page/{id}", 200): 1,
        ("/api/books/{id}", 404): 1,
    }
    assert stats.as_dict()["by_route"]["/api/pages/{id} 200"] == 2
    assert route_template("/api/pages/12?x=1") == "/api/pages/{id}"


# --- models ---------------------------------------------------------------------------------


def test_models_normalise_bookstack_quirks() -> None:
    user = {"id": 3, "name": "Ann", "slug": "ann"}
    page = Page.model_validate(
        {
            "id": 1, "book_id": 2, "chapter_id": 0, "name": "P", "slug": "p",
            "created_by": user, "updated_by": 4, "owned_by": None, "draft": 0,
            "template": True, "revision_count": 3, "editor": "wysiwyg", "html": "<p>x</p>",
            "raw_html": "<p>x</p>", "markdown": "", "tags": [{"name": "a", "value": "b"}],
            "created_at": "2024-10-15T10:00:00.000000Z", "unexpected": "dropped",
        }
    )  # fmt: skip
    assert (page.chapter_id, page.created_by, page.updated_by, page.owned_by) == (None, 3, 4, None)
    assert page.draft is False and page.tags[0].name == "a"
    assert page.created_at == "2024-10-15T10:00:00.000000Z"
    assert (
        Page.model_validate({"id": 1, "book_id": 2, "chapter_id": 9, "name": "x"}).chapter_id == 9
    )

    shelf = Shelf.model_validate(
        {"id": 1, "name": "S", "books": [{"id": 5, "name": "B"}, {"id": 2, "name": "A"}]}
    )
    assert [b.id for b in shelf.books] == [5, 2]
    role = Role.model_validate(
        {"id": 1, "display_name": "Admin", "system_name": "admin", "permissions": ["a"],
         "users": [user], "users_count": 1}
    )  # fmt: skip
    assert role.users[0].id == 3
    perms = ContentPermissions.model_validate(
        {
            "owner": None,
            "role_permissions": [{"role_id": 2, "view": True, "create": False, "update": 0,
                                  "delete": False, "role": {"id": 2, "display_name": "E"}}],
            "fallback_permissions": {"inheriting": True, "view": None, "create": None,
                                     "update": None, "delete": None},
        }
    )  # fmt: skip
    assert perms.owner is None and perms.fallback_permissions.inheriting
    entry = AuditLogEntry.model_validate(
        {"id": 9, "type": "page_delete", "detail": "P", "user_id": 1, "loggable_id": None,
         "loggable_type": None, "ip": "127.0.0.1", "created_at": "2024-10-15 10:00:00",
         "user": None}
    )  # fmt: skip
    assert entry.loggable_id is None


class RecordingBudget:
    """A SharedBudget that answers from a script and records what it is told."""

    def __init__(self, clock: FakeClock, answers: list[float]) -> None:
        self.clock = clock
        self.answers = answers
        self.calls: list[tuple[Any, ...]] = []

    async def take(self) -> float:
        self.calls.append(("take", self.clock.now))
        return self.answers.pop(0) if self.answers else 0.0

    async def pause(self, seconds: float) -> None:
        self.calls.append(("pause", self.clock.now, seconds))

    async def lower(self, per_minute: float, burst: int) -> None:
        self.calls.append(("lower", per_minute, burst))


async def test_limiter_takes_its_tokens_from_the_budget_and_passes_on_what_it_learns() -> None:
    clock = FakeClock()
    budget = RecordingBudget(clock, [0.0, 2.5, 0.0])
    limiter = RateLimiter(150, clock=clock, sleep=clock.sleep, budget=budget)
    assert await limiter.acquire() == 0.0
    # The budget says wait (another replica took the token): waited, then asked again.
    assert await limiter.acquire() == pytest.approx(2.5)
    assert [c[0] for c in budget.calls] == ["take", "take", "take"]

    # A 429 pauses this process at once; the budget (every other replica) hears of it with
    # the next acquire, before that one waits out the pause.
    budget.calls.clear()
    limiter.pause_until(clock.now + 30)
    limiter.update_from_headers(5, 60)  # and BookStack allows only 60 a minute
    assert await limiter.acquire() == pytest.approx(30.0)
    assert budget.calls[0] == ("pause", 1002.5, pytest.approx(30.0))
    assert budget.calls[1] == ("lower", limiter.per_minute, limiter.burst)
    assert limiter.burst + limiter.per_minute <= 60
    # After the pause (this process slept it out), a token from the budget; told once only.
    assert [c[0] for c in budget.calls[2:]] == ["take"]
    await limiter.acquire()
    assert [c[0] for c in budget.calls[2:]] == ["take", "take"]


async def test_local_budget_refills_pauses_and_lowers() -> None:
    clock = FakeClock()
    budget = LocalBudget(60, 2, clock=clock)
    assert [await budget.take() for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    clock.now += 0.5
    assert await budget.take() == pytest.approx(0.5)  # the half token earned is kept
    await budget.pause(10)
    await budget.pause(3)  # never shortens
    assert await budget.take() == pytest.approx(10.0)
    clock.now += 10
    assert await budget.take() == 0.0  # refilled meanwhile, up to the burst
    await budget.lower(30, 1)
    await budget.lower(120, 5)  # never raised
    assert (budget.per_minute, budget.burst) == (30, 1)
    assert await budget.take() == 0.0
    assert await budget.take() == pytest.approx(2.0)
