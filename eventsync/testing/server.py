"""The fake BookStack HTTP server: lifecycle, auth, rate limit, faults and webhook delivery."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web

from eventsync.testing.admin import AdminMutations
from eventsync.testing.api import (
    FAKE_KEY,
    TOKEN_KEY,
    USER_KEY,
    ApiError,
    error_response,
    not_found_page,
    routes,
)
from eventsync.testing.models import ApiToken, Webhook
from eventsync.testing.mutations import ACTING_IP, ContentMutations
from eventsync.testing.seed import seed_wiki
from eventsync.testing.sorting import SortRuleMutations
from eventsync.testing.state import ADMIN_USER_ID, Clock, Outgoing, WikiState

logger = logging.getLogger(__name__)

RATE_WINDOW = 60.0  # seconds: Laravel's perMinute decay

# The audit-log API came in BookStack v23.08; FakeBookStack(audit_log=False) is an older one,
# where the route answers like any unknown one (api.not_found_page).
AUDIT_LOG_ROUTE = "/api/audit-log"


@dataclass
class Faults:
    """Failures to inject; tests may change any field at any time."""

    latency: float = 0.0  # seconds added to every API request
    error_rate: float = 0.0  # share of API requests answered with error_status
    error_status: int = 500
    outage: bool = False  # every API request gets 503
    short_listings: set[str] = field(default_factory=set)  # routes whose pages lose a row
    fail_listings: set[str] = field(default_factory=set)  # routes that always answer 500
    webhook_drop: float = 0.0  # share of webhooks never sent
    webhook_duplicate: float = 0.0  # share of webhooks sent twice
    webhook_delay: float = 0.0  # >0: sent later from a background task, may reorder
    # Route template or exact path -> (status, message) answered once authenticated, as
    # BookStack's JSON error: a 422 or 400 that no retry can fix.
    error_routes: dict[str, tuple[int, str]] = field(default_factory=dict)
    seed: int = 0  # seeds the random choices above, so runs repeat


@dataclass
class RequestRecord:
    method: str
    path: str
    route: str  # the route template, e.g. "/api/pages/{id}"; "" when no route matched
    status: int
    query: dict[str, str]
    token_id: str | None = None
    # When it arrived (time.monotonic): tests hold request rates to the budget with it.
    at: float = field(default_factory=time.monotonic)


@dataclass
class WebhookDelivery:
    webhook_id: int
    url: str
    event: str
    body: dict[str, Any]
    status: int | None = None
    error: str | None = None


@dataclass
class _Bucket:
    reset_at: float  # time.monotonic() at which the window ends
    hits: int = 0


class FakeBookStack(ContentMutations, AdminMutations, SortRuleMutations):
    """An in-process BookStack for tests: real HTTP on 127.0.0.1, state in memory."""

    def __init__(
        self,
        requests_per_minute: int = 180,
        clock: Clock | None = None,
        recycle_bin_lifetime: int = 30,
        audit_log: bool = True,
    ) -> None:
        self.state = WikiState(clock=clock, recycle_bin_lifetime=recycle_bin_lifetime)
        # False: a BookStack before v23.08, whose API has no /api/audit-log at all (it still
        # logs activities and sends webhooks). Tests may switch it at any time.
        self.audit_log = audit_log
        self.requests_per_minute = requests_per_minute
        self.faults = Faults()
        self.requests: list[RequestRecord] = []
        self.webhook_deliveries: list[WebhookDelivery] = []
        self.rate_limit_hits = 0
        self.url = ""
        self.token_id = "eventsync-admin-id"
        self.token_secret = "eventsync-admin-secret"
        self.add_token(ADMIN_USER_ID, self.token_id, self.token_secret)
        self._revoked: dict[str, ApiToken] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._rngs: dict[str, tuple[int, random.Random]] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._api_middleware])
        app[FAKE_KEY] = self
        for method, path, handler in routes():
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        bound_port = sockets[0].getsockname()[1]
        self.url = f"http://{host}:{bound_port}"
        # APP_URL follows the address; content seeded before start() gets its links moved
        # along, as `bookstack:update-url` would.
        old_url, self.state.app_url = self.state.app_url, self.url
        self.state.update_url(old_url, self.url)
        return self.url

    async def stop(self) -> None:
        await self.drain_webhooks()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeBookStack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------- helpers
    def add_token(
        self, user_id: int, token_id: str, secret: str, expires_at: datetime | None = None
    ) -> None:
        self.state.tokens[token_id] = ApiToken(
            token_id=token_id, secret=secret, user_id=user_id, expires_at=expires_at
        )

    def revoke_token(self, token_id: str | None = None) -> None:
        """Delete an API token (the sync token by default), as an admin would in the UI: its
        requests get BookStack's 401 until `restore_token`."""
        token_id = token_id or self.token_id
        self._revoked[token_id] = self.state.tokens.pop(token_id)

    def restore_token(self, token_id: str | None = None) -> None:
        """Bring a revoked token back with the same id and secret."""
        token_id = token_id or self.token_id
        self.state.tokens[token_id] = self._revoked.pop(token_id)

    def request_counts(self) -> collections.Counter[str]:
        return collections.Counter(r.route or r.path for r in self.requests)

    def reset_requests(self) -> None:
        self.requests.clear()

    def seed(
        self,
        *,
        pages: int = 100,
        books: int = 10,
        shelves: int = 3,
        chapters_per_book: int = 2,
        users: int = 5,
        roles: int = 3,
        attachments: int = 20,
        permission_share: float = 0.05,
        seed: int = 0,
    ) -> None:
        seed_wiki(
            self.state,
            pages=pages,
            books=books,
            shelves=shelves,
            chapters_per_book=chapters_per_book,
            users=users,
            roles=roles,
            attachments=attachments,
            permission_share=permission_share,
            seed=seed,
        )

    def add_webhook(
        self,
        url: str,
        events: Sequence[str] = ("all",),
        timeout: float = 3.0,
        name: str = "eventsync",
    ) -> int:
        # Webhook::updateTrackedEvents keeps only 'all' when it is among the events.
        tracked = ("all",) if "all" in events else tuple(events)
        webhook_id = self.state.next_id("webhooks")
        self.state.webhooks[webhook_id] = Webhook(
            id=webhook_id, name=name, url=url, events=tracked, timeout=timeout
        )
        return webhook_id

    def truth(self) -> dict[str, Any]:
        return self.state.truth(ADMIN_USER_ID)

    def _rng(self, purpose: str) -> random.Random:
        seed, rng = self._rngs.get(purpose, (None, None))
        if rng is None or seed != self.faults.seed:
            rng = random.Random(f"{purpose}:{self.faults.seed}")
            self._rngs[purpose] = (self.faults.seed, rng)
        return rng

    # ------------------------------------------------------------ webhooks
    async def _flush(self) -> None:
        """POST what the last activities queued, one after another, as the sync queue does."""
        while self.state.outbox:
            outgoing = self.state.outbox.pop(0)
            rng = self._rng("webhooks")
            if rng.random() < self.faults.webhook_drop:
                continue
            copies = 2 if rng.random() < self.faults.webhook_duplicate else 1
            for _ in range(copies):
                if self.faults.webhook_delay > 0:
                    delay = self.faults.webhook_delay
                    task = asyncio.create_task(self._send_later(outgoing, delay))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
                else:
                    await self._send(outgoing)

    async def _send_later(self, outgoing: Outgoing, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._send(outgoing)

    async def _send(self, outgoing: Outgoing) -> None:
        webhook = outgoing.webhook
        delivery = WebhookDelivery(webhook.id, webhook.url, outgoing.body["event"], outgoing.body)
        self.webhook_deliveries.append(delivery)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=webhook.timeout, connect=10)
        try:
            async with self._session.post(
                webhook.url,
                data=json.dumps(outgoing.body),
                # Guzzle's default agent, as a real BookStack's webhook POSTs carry it.
                headers={"Content-Type": "application/json", "User-Agent": "GuzzleHttp/7"},
                timeout=timeout,
            ) as response:
                await response.read()
                delivery.status = response.status
                if response.status >= 400:
                    delivery.error = f"Response status from endpoint was {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            # DispatchWebhookJob catches everything: no retry, just a logged error.
            delivery.error = str(exc) or type(exc).__name__

    async def drain_webhooks(self) -> None:
        """Wait for webhooks still being sent from background tasks (webhook_delay)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # --------------------------------------------------------- rate limit
    def _hit(self, ip: str) -> tuple[bool, dict[str, str]]:
        """Laravel ThrottleRequests: check, then count, in a fixed window from the first hit."""
        limit = self.requests_per_minute
        now = time.monotonic()
        bucket = self._buckets.get(ip)
        if bucket is None or now >= bucket.reset_at:
            bucket = self._buckets[ip] = _Bucket(reset_at=now + RATE_WINDOW)
        if bucket.hits >= limit:
            retry_after = max(0, math.ceil(bucket.reset_at - now))
            return True, {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": "0",
                "Retry-After": str(retry_after),
                "X-RateLimit-Reset": str(int(time.time()) + retry_after),
            }
        bucket.hits += 1
        return False, {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, limit - bucket.hits)),
        }

    # -------------------------------------------------------------- auth
    def _authenticate(self, request: web.Request) -> int:
        """ApiTokenGuard (FACTS §4): each failure with its own status and message."""
        header = request.headers.get("Authorization", "").strip()
        if not header:
            raise ApiError(401, "No authorization token found on the request")
        if ":" not in header or not header.startswith("Token "):
            raise ApiError(
                401,
                "An authorization token was found on the request but the format appeared incorrect",
            )
        parts = header.replace("Token ", "").split(":")
        token = self.state.tokens.get(parts[0])
        if token is None:
            raise ApiError(
                401, "No matching API token was found for the provided authorization token"
            )
        if parts[1] != token.secret:
            raise ApiError(401, "The secret provided for the given used API token is incorrect")
        if token.expires_at is not None and token.expires_at <= self.state.now():
            raise ApiError(403, "The authorization token used has expired")
        user = self.state.users.get(token.user_id)
        if user is None or not self.state.user_can(user.id, "access-api"):
            raise ApiError(
                403, "The owner of the used API token does not have permission to make API calls"
            )
        if self.state.email_confirmation_required and not user.email_confirmed:
            raise ApiError(401, "The email address for the account in use needs to be confirmed")
        request[TOKEN_KEY] = token.token_id
        return user.id

    # --------------------------------------------------------- middleware
    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/api/") and request.path != "/api":
            return await handler(request)  # type: ignore[no-any-return]
        match_error = request.match_info.http_exception
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None and match_error is None else ""
        if route == AUDIT_LOG_ROUTE and not self.audit_log:
            route = ""
        if not route:
            # No route, so no throttle middleware ran.
            status = match_error.status if match_error is not None else 404
            if status == 404 and request.method in ("GET", "HEAD"):
                # The web routes' fallback catches it and renders the HTML 404 page (FACTS).
                response = not_found_page(self.state.app_url, self.state.url(request.path))
            else:
                # Not seen on a real BookStack: Laravel's handler renders a bare JSON error.
                message = "Not found" if status == 404 else "Method not allowed"
                response = error_response(status, message)
            self._record(request, "", response.status)
            return response

        limited, headers = self._hit(request.remote or "unknown")
        if limited:
            self.rate_limit_hits += 1
            response = error_response(429, "Too Many Attempts.")
        else:
            response = await self._handle(request, handler, route)
        response.headers.update(headers)
        self._record(request, route, response.status)
        return response

    async def _handle(self, request: web.Request, handler: Any, route: str) -> web.StreamResponse:
        faults = self.faults
        if faults.latency > 0:
            await asyncio.sleep(faults.latency)
        if faults.outage:
            return error_response(503, "Service Unavailable")
        if faults.error_rate > 0 and self._rng("errors").random() < faults.error_rate:
            return error_response(faults.error_status, "Server Error")
        if route in faults.fail_listings and request.method == "GET":
            return error_response(500, "Server Error")
        token = ACTING_IP.set(request.remote or "127.0.0.1")
        try:
            request[USER_KEY] = self._authenticate(request)
            injected = faults.error_routes.get(request.path) or faults.error_routes.get(route)
            if injected is not None:
                return error_response(*injected)
            return await handler(request)  # type: ignore[no-any-return]
        except ApiError as exc:
            extra = {"validation": exc.validation} if exc.validation else {}
            return error_response(exc.status, exc.message, **extra)
        except web.HTTPException as exc:
            return error_response(exc.status, exc.reason)
        except Exception:
            # A bug in the fake: answer like BookStack's handler would, and say why in the log.
            logger.exception("fake BookStack failed on %s %s", request.method, request.path)
            return error_response(500, "An unknown error occurred")
        finally:
            ACTING_IP.reset(token)

    def _record(self, request: web.Request, route: str, status: int) -> None:
        self.requests.append(
            RequestRecord(
                method=request.method,
                path=request.path,
                route=route,
                status=status,
                query=dict(request.query),
                token_id=request.get(TOKEN_KEY),
            )
        )
