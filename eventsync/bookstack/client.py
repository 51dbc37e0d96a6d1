"""The one rate-limited, retrying HTTP client every BookStack API call goes through."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, NamedTuple, Self

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from eventsync import __version__
from eventsync.aio import wait_any
from eventsync.bookstack.ratelimit import RateLimiter
from eventsync.bookstack.token import PROBE_BASE, PROBE_CAP, TokenState
from eventsync.errors import (
    AuthError,
    BookStackError,
    ForbiddenError,
    IncompleteListing,
    InvalidRequest,
    NotFound,
    Unavailable,
    UnknownRoute,
)

log = structlog.get_logger("eventsync.bookstack")

Row = dict[str, Any]
FilterValue = str | int | bool
Params = Mapping[str, FilterValue]

# Filterable and sortable fields of each listing endpoint, the first being BookStack's default
# sort (FACTS §4, from each API controller's field list). BookStack silently IGNORES a filter
# on any other field, so a typo would return every row and a diff sync would treat rows it
# never asked for as in scope; we refuse such filters before sending anything. Note that
# /api/roles has no `id` here: it can be neither sorted nor filtered by id.
LISTING_FIELDS: dict[str, tuple[str, ...]] = {
    "/api/books": (
        "id", "name", "slug", "description", "created_at", "updated_at",
        "created_by", "updated_by", "owned_by",
    ),
    "/api/chapters": (
        "id", "book_id", "name", "slug", "description", "priority", "created_at",
        "updated_at", "created_by", "updated_by", "owned_by",
    ),
    "/api/pages": (
        "id", "book_id", "chapter_id", "name", "slug", "priority", "draft", "template",
        "created_at", "updated_at", "created_by", "updated_by", "owned_by",
    ),
    "/api/shelves": (
        "id", "name", "slug", "description", "created_at", "updated_at", "created_by",
        "updated_by", "owned_by",
    ),
    "/api/attachments": (
        "id", "name", "extension", "uploaded_to", "external", "order", "created_at",
        "updated_at", "created_by", "updated_by",
    ),
    "/api/image-gallery": (
        "id", "name", "url", "path", "type", "uploaded_to", "created_by", "updated_by",
        "created_at", "updated_at",
    ),
    "/api/users": (
        "id", "name", "slug", "email", "external_auth_id", "created_at", "updated_at",
        "last_activity_at",
    ),
    "/api/roles": (
        "display_name", "description", "mfa_enforced", "external_auth_id", "created_at",
        "updated_at", "permissions_count", "users_count",
    ),
    "/api/recycle-bin": (
        "id", "deleted_by", "created_at", "updated_at", "deletable_type", "deletable_id",
    ),
    "/api/audit-log": (
        "id", "type", "detail", "user_id", "loggable_id", "loggable_type", "ip", "created_at",
    ),
}  # fmt: skip

# Operators ListingResponseBuilder knows, by name only: anything else, the symbols `>`, `!=`
# and the like included, silently becomes `eq` (`requestFilterToQueryFilter`).
FILTER_OPERATORS = frozenset({"eq", "ne", "gt", "lt", "gte", "lte", "like"})

# BookStack clamps `count` to 1..API_MAX_ITEM_COUNT (500 by default).
MAX_COUNT = 500

# How long to wait after a 429 that says nothing about when to come back: a whole window.
DEFAULT_RETRY_AFTER = 60.0

# Laravel sends Retry-After in whole seconds, rounded down; coming back exactly on time can
# still land in the old window.
RETRY_AFTER_MARGIN = 0.25

# 429s do not use up `max_attempts` (they are the server pacing us, not failing), but a server
# that keeps answering 429 is unavailable all the same.
MAX_RATE_LIMITED = 20

# ApiTokenGuard refuses an expired token, and one whose user lost "Access system API", with a
# 403 (FACTS §4), yet like a 401 they concern the token, not the request: nothing succeeds
# until someone fixes it. Told apart from an action's 403 by BookStack's message.
TOKEN_REFUSALS_403 = (
    "The authorization token used has expired",
    "does not have permission to make API calls",
)

# The probe of a rejected token: any API user may list books, and one row is cheap.
PROBE_PATH = "/api/books"

_NUMERIC_SEGMENT = re.compile(r"/\d+(?=/|$)")


def route_template(path: str) -> str:
    """`/api/pages/12?x=1` → `/api/pages/{id}`: a label with bounded cardinality."""
    return _NUMERIC_SEGMENT.sub("/{id}", path.split("?", 1)[0])


def _query_value(value: FilterValue) -> str:
    # MySQL compares a string like "true" as 0, so booleans go as 0/1 (FACTS §8).
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def encode_filters(endpoint: str, filters: Params | None) -> dict[str, str]:
    """`{"draft": False, "updated_at:gt": "2024-…"}` → `{"filter[draft]": "0", …}`.

    Raises ValueError for an endpoint, field or operator BookStack would silently ignore.
    """
    fields = LISTING_FIELDS.get(endpoint)
    if fields is None:
        raise ValueError(f"unknown listing endpoint {endpoint!r}; known: {sorted(LISTING_FIELDS)}")
    encoded: dict[str, str] = {}
    for key, value in (filters or {}).items():
        name, _, op = key.partition(":")
        if name not in fields:
            raise ValueError(
                f"{endpoint} cannot filter on {name!r} (BookStack would ignore it and return "
                f"everything); filterable: {', '.join(fields)}"
            )
        if op and op not in FILTER_OPERATORS:
            raise ValueError(f"unknown filter operator {op!r} in {key!r}")
        encoded[f"filter[{key}]"] = _query_value(value)
    return encoded


@dataclass
class ClientStats:
    """Counters for one client. `by_route` is keyed by (route template, HTTP status), with
    status 0 for an attempt that got no response (connection error, timeout)."""

    requests: int = 0
    by_route: Counter[tuple[str, int]] = field(default_factory=Counter)
    retries: int = 0  # attempts repeated after a 5xx, transport error or bad JSON
    rate_limited: int = 0  # 429s received (each followed by a pause and a retry)
    limiter_waits: int = 0  # requests that had to wait for the rate limiter
    limiter_waited_seconds: float = 0.0
    last_attempt_at: float = 0.0  # our clock, the latest request sent
    last_answer_at: float = 0.0  # our clock, the latest non-5xx answer: BookStack was up

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_route": {f"{route} {status}": n for (route, status), n in self.by_route.items()},
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "limiter_waits": self.limiter_waits,
            "limiter_waited_seconds": round(self.limiter_waited_seconds, 3),
        }


class Listing(AsyncIterator[Row]):
    """The rows of a listing: iterate with `async for`, or `await` it for a list.

    Rows arrive as pages come in; a listing found short raises IncompleteListing after the
    rows it did get, so a consumer must not act on "what is missing" until iteration ended
    without error.
    """

    def __init__(self, rows: Callable[[Listing], AsyncIterator[Row]]) -> None:
        self._factory = rows
        self._rows: AsyncIterator[Row] | None = None
        # When the first page was requested: everything the listing shows is at least that
        # new, and what it lacks was gone (or not yet there) by then.
        self.started_at: float | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Row:
        if self._rows is None:
            self._rows = self._factory(self)
        return await anext(self._rows)

    def __await__(self) -> Generator[Any, None, list[Row]]:
        return self._collect().__await__()

    async def _collect(self) -> list[Row]:
        return [row async for row in self]

    async def aclose(self) -> None:
        aclose = getattr(self._rows, "aclose", None)
        if aclose is not None:
            await aclose()


class _Transient(Exception):
    """An attempt that may succeed if repeated: 5xx, transport error, unparseable 2xx."""

    def __init__(self, reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class _Call:
    """Bookkeeping shared by the attempts of one logical request."""

    method: str
    path: str
    route: str
    probe: bool = False  # sent even while the token is rejected
    attempt: int = 0
    rate_limited: int = 0
    sent_at: float = 0.0  # our clock when the latest attempt was sent


# /api/search takes at most 100 rows per type and page (500 is a 422).
SEARCH_COUNT = 100
# A bound on one search's pages: 1,000 pages is 100,000 items of one type.
MAX_SEARCH_PAGES = 1000


class Read(NamedTuple):
    """A JSON object read from BookStack, and when the request that got it was sent."""

    row: Row
    sent_at: float


class BookStackClient:
    """BookStack REST API client: auth, one rate limiter, retries, keyset pagination.

    One client per BookStack source; every task of that source shares it, and with it the
    rate limiter. Use `async with`, or call `close()`.
    """

    def __init__(
        self,
        base_url: str,
        token_id: str,
        token_secret: str,
        *,
        requests_per_minute: float = 150,
        timeout: float = 30.0,
        max_attempts: int = 6,
        backoff_cap: float = 30.0,
        max_retry_after: float = 120.0,
        session: aiohttp.ClientSession | None = None,
        limiter: RateLimiter | None = None,
        backoff_base: float = 0.5,
        max_rate_limited: int = MAX_RATE_LIMITED,
        token_probe_base: float = PROBE_BASE,
        token_probe_cap: float = PROBE_CAP,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.base_url = base_url.rstrip("/")
        # Kept out of every message and log line; only ever sent in the header.
        self._headers = {
            "Authorization": f"Token {token_id}:{token_secret}",
            "Accept": "application/json",
            "User-Agent": f"eventsync/{__version__}",
        }
        self.limiter = limiter or RateLimiter(requests_per_minute)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_attempts = max_attempts
        self._backoff_cap = backoff_cap
        self._backoff_base = backoff_base
        self._max_retry_after = max_retry_after
        self._max_rate_limited = max_rate_limited
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self.stats = ClientStats()
        self.token = TokenState(token_probe_base, token_probe_cap)

    def __repr__(self) -> str:
        return f"BookStackClient({self.base_url!r})"

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("BookStackClient is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                # BookStack also accepts a browser session: a cookie could silently switch
                # us from the token's identity (and rate-limit bucket) to a session's.
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        """Close the session this client created (not one passed in). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()

    # --- single requests ------------------------------------------------------------------

    async def get(self, path: str, params: Params | None = None) -> Row:
        """GET `path` (like `/api/pages/12`) and return its JSON object."""
        return (await self.read(path, params)).row

    async def read(self, path: str, params: Params | None = None) -> Read:
        """GET `path` and return its JSON object with the moment the answering request was
        sent: the state it shows is at least that new. A BookStackError raised here carries
        the same moment as `sent_at` (a 404 says "gone as of then")."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        query = {k: _query_value(v) for k, v in (params or {}).items()}
        call = _Call("GET", path, route_template(path))
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=wait_random_exponential(multiplier=self._backoff_base, max=self._backoff_cap),
            retry=retry_if_exception_type(_Transient),
            before_sleep=lambda state: self._before_retry(call, state),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    call.attempt = attempt.retry_state.attempt_number
                    result = await self._attempt(call, query)
        except _Transient as exc:
            raise Unavailable(
                f"BookStack {call.method} {path} failed {call.attempt} times, last: {exc}",
                status=exc.status,
                path=path,
            ) from exc
        except BookStackError as exc:
            exc.sent_at = call.sent_at
            raise
        return Read(result, call.sent_at)

    def _before_retry(self, call: _Call, state: RetryCallState) -> None:
        self.stats.retries += 1
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        log.warning(
            "bookstack.retry",
            method=call.method,
            route=call.route,
            status=getattr(exc, "status", None),
            attempt=state.attempt_number,
            wait=round(state.upcoming_sleep, 3),
            reason=str(exc),
        )

    async def _attempt(self, call: _Call, query: dict[str, str]) -> Row:
        """One attempt; 429s are waited out and retried here, outside the attempt budget."""
        session = self._ensure_session()
        # A session passed in has neither our headers nor our cookie policy.
        headers = None if self._owns_session else self._headers
        while True:
            waited = await self.limiter.acquire()
            if waited > 0:
                self.stats.limiter_waits += 1
                self.stats.limiter_waited_seconds += waited
            if self.token.rejected is not None and not call.probe:
                # Every request would be refused too: spend none until a probe says the
                # token works again (held here, after the limiter, so none slips through).
                raise self.token.held_error(call.method, call.path)
            started = time.monotonic()
            call.sent_at = time.time()
            self.stats.last_attempt_at = call.sent_at
            try:
                async with session.request(
                    call.method,
                    self.base_url + call.path,
                    params=query,
                    headers=headers,
                    timeout=self._timeout,
                    # A redirect means a wrong base URL (http→https, login page); following
                    # it would hide that and could carry the token elsewhere.
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    response_headers = response.headers
                    body = await response.read()
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                self._count(call.route, 0)
                raise _Transient(f"{type(exc).__name__}: {exc}", None) from exc
            self._count(call.route, status)
            log.debug(
                "bookstack.request",
                method=call.method,
                route=call.route,
                status=status,
                attempt=call.attempt,
                wait=round(waited, 3),
                elapsed=round(time.monotonic() - started, 3),
            )
            if status == 429:
                self._rate_limited(call, response_headers)
                continue
            self._learn_limits(response_headers)
            if status < 500:
                # BookStack answered (even a 404 is an answer): it is up.
                self.stats.last_answer_at = time.time()
            if 200 <= status < 300:
                self._token_works(call)
                return self._parse(status, body)
            if status >= 500:
                raise _Transient(f"HTTP {status}", status)
            error = self._client_error(call, status, response_headers, body)
            if isinstance(error, AuthError):
                self._token_refused(call, error)
            elif status >= 400 and not isinstance(error, UnknownRoute):
                # BookStack authenticates before it checks permissions or finds the item;
                # an unknown route (and a 429) is answered before any authentication.
                self._token_works(call)
            raise error

    def _token_refused(self, call: _Call, error: AuthError) -> None:
        if self.token.reject(error, call.sent_at):
            log.error(
                "BookStack rejects the API token (revoked, rotated or expired?): no request "
                "is sent until it works again; probing it at a growing interval",
                status=error.status,
                error=str(error),
                first_probe_in=self.token.next_probe_delay(),
            )

    def _token_works(self, call: _Call) -> None:
        if self.token.rejected is None:
            return
        probes, held = self.token.probes, self.token.held
        lasted = self.token.accept(call.sent_at)
        if lasted is not None:
            log.warning(
                "BookStack accepts the API token again: requests resume",
                rejected_seconds=round(lasted, 1),
                probes=probes,
                held_requests=held,
            )

    # --- token probes ---------------------------------------------------------------------

    async def probe_token(self) -> bool:
        """One cheap request, sent even while the token is rejected: True if it works."""
        call = _Call("GET", PROBE_PATH, route_template(PROBE_PATH), probe=True, attempt=1)
        if self.token.rejected is not None:
            self.token.probes += 1
        try:
            await self._attempt(call, {"count": "1"})
        except AuthError:
            return False
        except (BookStackError, _Transient) as exc:
            # BookStack down or refusing the probe for another reason: try again later.
            log.debug("token probe failed", error=str(exc))
        return self.token.rejected is None

    async def until_token_works(self, stop: asyncio.Event | None = None) -> bool:
        """While the token is rejected, probe it at a growing interval; True once it works,
        False if `stop` was set first. One task per client should do this (the others wait
        for `token.working`), or the probes multiply."""
        while self.token.rejected is not None:
            delay = self.token.next_probe_delay()
            if stop is None:
                await asyncio.sleep(delay)
            else:
                await wait_any(stop, timeout=delay)
                if stop.is_set():
                    return False
            if self.token.rejected is not None:
                await self.probe_token()
        return True

    def _count(self, route: str, status: int) -> None:
        self.stats.requests += 1
        self.stats.by_route[(route, status)] += 1

    @staticmethod
    def _parse(status: int, body: bytes) -> Row:
        # A proxy or maintenance page answering 200 with HTML is a transient failure, not data.
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise _Transient(f"HTTP {status} with a body that is not JSON", status) from exc
        if not isinstance(payload, dict):
            raise _Transient(f"HTTP {status} with JSON that is not an object", status)
        return payload

    def _rate_limited(self, call: _Call, headers: Mapping[str, str]) -> None:
        self.stats.rate_limited += 1
        call.rate_limited += 1
        limit = _int_header(headers, "X-RateLimit-Limit")
        self.limiter.update_from_headers(None, limit)
        if call.rate_limited > self._max_rate_limited:
            raise Unavailable(
                f"BookStack {call.method} {call.path} answered 429 {call.rate_limited} times",
                status=429,
                path=call.path,
            )
        delay = self._retry_after(headers)
        # Pause the shared limiter: the server's window is spent for every task of this
        # source, not only for the one that happened to get the 429.
        self.limiter.pause_until(self.limiter.clock() + delay)
        log.warning(
            "bookstack.rate_limited",
            method=call.method,
            route=call.route,
            status=429,
            attempt=call.attempt,
            wait=round(delay, 3),
        )

    def _retry_after(self, headers: Mapping[str, str]) -> float:
        delay: float | None = None
        value = headers.get("Retry-After")
        if value:
            try:
                delay = float(value)
            except ValueError:
                try:
                    delay = parsedate_to_datetime(value).timestamp() - time.time()
                except (TypeError, ValueError):
                    delay = None
        if delay is None and (reset := headers.get("X-RateLimit-Reset")):
            # Laravel sends the reset as a Unix timestamp.
            try:
                delay = float(reset) - time.time()
            except ValueError:
                delay = None
        if delay is None:
            delay = DEFAULT_RETRY_AFTER
        return min(max(0.0, delay) + RETRY_AFTER_MARGIN, self._max_retry_after)

    def _learn_limits(self, headers: Mapping[str, str]) -> None:
        remaining = _int_header(headers, "X-RateLimit-Remaining")
        limit = _int_header(headers, "X-RateLimit-Limit")
        if remaining is not None or limit is not None:
            self.limiter.update_from_headers(remaining, limit)

    @staticmethod
    def _client_error(
        call: _Call, status: int, headers: Mapping[str, str], body: bytes
    ) -> BookStackError:
        if 300 <= status < 400:
            return InvalidRequest(
                f"BookStack {call.method} {call.path} redirected ({status}) to "
                f"{headers.get('Location', '?')}: check the base URL",
                status=status,
                path=call.path,
            )
        found = _error_message(body)
        if status == 404 and (found is None or "json" not in headers.get("Content-Type", "")):
            # BookStack answers an unknown route with its HTML error page (FACTS, first
            # section), every missing item with JSON: this one is about the route.
            return UnknownRoute(
                f"BookStack {call.method} {call.path} failed (404): no such API route here "
                "(an HTML page, not BookStack's JSON error)",
                status=status,
                path=call.path,
            )
        detail = found or f"HTTP {status}"
        message = f"BookStack {call.method} {call.path} failed ({status}): {detail}"
        cls: type[BookStackError] = {401: AuthError, 403: ForbiddenError, 404: NotFound}.get(
            status, InvalidRequest
        )
        if status == 403 and any(refusal in detail for refusal in TOKEN_REFUSALS_403):
            cls = AuthError
        return cls(message, status=status, path=call.path)

    # --- listings -------------------------------------------------------------------------

    def list(
        self, endpoint: str, *, filters: Params | None = None, count: int = MAX_COUNT
    ) -> Listing:
        """Every row of a listing endpoint (like `/api/pages`) that matches `filters`.

        Filters are `{"field": value}` or `{"field:op": value}`; unknown fields raise
        ValueError here, before any request. Pages by keyset (`sort=+id`,
        `filter[id:gt]=<last id>`), which neither skips nor repeats rows when rows are
        inserted or deleted meanwhile, as offset paging would; `/api/roles` cannot be keyed
        by id and is paged by offset, deduplicated and checked against `total` instead.
        """
        params = encode_filters(endpoint, filters)
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be within 1..{MAX_COUNT}, not {count}")
        if "id" not in LISTING_FIELDS[endpoint]:
            return Listing(lambda listing: self._offset_rows(listing, endpoint, params, count))
        # A caller's own lower bound on id becomes the starting point of the keyset.
        after = params.pop("filter[id:gt]", None)
        start = int(after) if after is not None else None
        return Listing(
            lambda listing: self._keyset_rows(listing, endpoint, params, count, start, None)
        )

    async def list_all(self, endpoint: str, *, filters: Params | None = None) -> list[Row]:
        """`list()` collected; raises IncompleteListing when it came back short."""
        return await self.list(endpoint, filters=filters)

    async def list_timed(
        self, endpoint: str, *, filters: Params | None = None
    ) -> tuple[list[Row], float]:
        """`list_all()` and when its first page was requested (see `Listing.started_at`)."""
        listing = self.list(endpoint, filters=filters)
        rows = await listing
        assert listing.started_at is not None  # every listing makes at least one request
        return rows, listing.started_at

    def audit_log_after(
        self, after_id: int, *, limit_pages: int | None = None, count: int = MAX_COUNT
    ) -> Listing:
        """Audit-log rows with `id > after_id`, ascending; at most `limit_pages` requests.

        Iterate (`async for`) to handle rows as they come, or `await` for a list.
        """
        if limit_pages is not None and limit_pages < 1:
            raise ValueError("limit_pages must be at least 1")
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be within 1..{MAX_COUNT}, not {count}")
        return Listing(
            lambda listing: self._keyset_rows(
                listing, "/api/audit-log", {}, count, after_id, limit_pages
            )
        )

    async def latest_audit_id(self) -> int | None:
        """The highest activity id, or None when the audit log is empty."""
        rows = await self.latest_audit_rows(1)
        return _row_id("/api/audit-log", rows[0]) if rows else None

    async def latest_audit_rows(self, count: int) -> list[Row]:
        """The `count` newest audit-log rows, highest id first (one request)."""
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be within 1..{MAX_COUNT}, not {count}")
        body = await self.get("/api/audit-log", {"sort": "-id", "count": count})
        data, _total = _listing_page("/api/audit-log", body)
        return data

    async def recent(
        self, endpoint: str, count: int, *, filters: Params | None = None
    ) -> tuple[list[Row], int, float]:
        """The `count` rows most recently updated (`sort=-updated_at`), the listing's `total`
        and when the request was sent: one request, whatever the listing's size."""
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be within 1..{MAX_COUNT}, not {count}")
        query: dict[str, FilterValue] = {
            **encode_filters(endpoint, filters),
            "sort": "-updated_at",
            "count": count,
        }
        read = await self.read(endpoint, query)
        data, total = _listing_page(endpoint, read.row)
        return data, total, read.sent_at

    async def search_all(self, query: str) -> set[tuple[str, int]]:
        """(type, id) of every item `GET /api/search` finds for `query`. Its pages hold up
        to SEARCH_COUNT rows of *each* type and have no stable order without search terms
        (FACTS, first section): pages are read until the distinct items add up to `total`;
        a page that comes back empty first means the answer cannot be trusted
        (IncompleteListing)."""
        found: set[tuple[str, int]] = set()
        page = 1
        while True:
            body = await self.get(
                "/api/search", {"query": query, "page": page, "count": SEARCH_COUNT}
            )
            data, total = _listing_page("/api/search", body)
            for row in data:
                kind, item_id = row.get("type"), row.get("id")
                if isinstance(kind, str) and isinstance(item_id, int):
                    found.add((kind, item_id))
            if len(found) == total:
                return found
            if not data or len(found) > total or page >= MAX_SEARCH_PAGES:
                raise IncompleteListing(
                    f"/api/search {query!r}: {len(found)} distinct items, total {total}",
                    path="/api/search",
                )
            page += 1

    async def _page(self, listing: Listing, endpoint: str, query: Params) -> tuple[list[Row], int]:
        read = await self.read(endpoint, query)
        if listing.started_at is None:
            listing.started_at = read.sent_at
        return _listing_page(endpoint, read.row)

    async def _keyset_rows(
        self,
        listing: Listing,
        endpoint: str,
        params: dict[str, str],
        count: int,
        after: int | None,
        limit_pages: int | None,
    ) -> AsyncIterator[Row]:
        last_id = after
        pages = 0
        while True:
            query: dict[str, FilterValue] = {**params, "sort": "+id", "count": count}
            if last_id is not None:
                query["filter[id:gt]"] = last_id
            data, total = await self._page(listing, endpoint, query)
            pages += 1
            for row in data:
                row_id = _row_id(endpoint, row)
                # A server that ignores the filter or the sort would have us loop forever
                # or skip rows; either way the listing cannot be trusted.
                if last_id is not None and row_id <= last_id:
                    raise IncompleteListing(
                        f"{endpoint} returned id {row_id} after {last_id}: the server ignored "
                        "filter[id:gt] or sort=+id",
                        path=endpoint,
                    )
                last_id = row_id
                yield row
            if len(data) >= total:
                return
            if len(data) < min(count, total):
                raise IncompleteListing(
                    f"{endpoint} returned {len(data)} rows where {min(count, total)} of "
                    f"{total} were due",
                    path=endpoint,
                )
            if limit_pages is not None and pages >= limit_pages:
                return

    async def _offset_rows(
        self, listing: Listing, endpoint: str, params: dict[str, str], count: int
    ) -> AsyncIterator[Row]:
        # Offset paging over a sort with ties can repeat or skip rows between pages; repeats
        # are dropped here and skips are caught by comparing the unique count with `total`.
        seen: set[int] = set()
        offset = 0
        total = 0
        sort = "+" + LISTING_FIELDS[endpoint][0]
        while True:
            query: dict[str, FilterValue] = {
                **params,
                "sort": sort,
                "count": count,
                "offset": offset,
            }
            data, total = await self._page(listing, endpoint, query)
            for row in data:
                row_id = _row_id(endpoint, row)
                if row_id not in seen:
                    seen.add(row_id)
                    yield row
            offset += len(data)
            if not data or offset >= total:
                break
        if len(seen) != total:
            raise IncompleteListing(
                f"{endpoint} gave {len(seen)} distinct rows where total said {total}",
                path=endpoint,
            )


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _error_message(body: bytes) -> str | None:
    """BookStack's `{"error": {"message", "validation"?}}`, or `{"message"}` (FACTS §4)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message: str = error["message"]
        validation = error.get("validation")
        if isinstance(validation, dict) and validation:
            details = "; ".join(
                f"{name}: {' '.join(map(str, msgs)) if isinstance(msgs, list) else msgs}"
                for name, msgs in validation.items()
            )
            message = f"{message} ({details})"
        return message
    if isinstance(payload.get("message"), str):
        return str(payload["message"])
    return None


def _listing_page(endpoint: str, body: Row) -> tuple[list[Row], int]:
    data = body.get("data")
    total = body.get("total")
    if (
        not isinstance(data, list)
        or not all(isinstance(row, dict) for row in data)
        or not isinstance(total, int)
        or isinstance(total, bool)
    ):
        raise IncompleteListing(
            f"{endpoint} did not return a listing ({{data: [...], total: N}})", path=endpoint
        )
    return data, total


def _row_id(endpoint: str, row: Row) -> int:
    row_id = row.get("id")
    if not isinstance(row_id, int) or isinstance(row_id, bool):
        raise IncompleteListing(f"{endpoint} returned a row without an integer id", path=endpoint)
    return row_id
