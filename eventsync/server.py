"""The HTTP side of `serve`: webhook endpoint, change feed, health, status, metrics."""

from __future__ import annotations

import hmac
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from eventsync import answers
from eventsync.errors import ConfigError
from eventsync.ingest.webhook import json_error
from eventsync.logging import debug_enabled, get_logger
from eventsync.stream import stream_handler

if TYPE_CHECKING:
    from eventsync.service import Service

log = get_logger("eventsync.http")

MAX_CHANGES = 1000
WEBHOOK_ROUTE = "/webhooks/bookstack/{secret}"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# For web.AppRunner. The receiver decodes Content-Encoding itself (ingest/webhook.py): aiohttp's
# decoding fails a body that does not decode in the middle of the handler's read (a 500), and
# hands on bodies of codings it does not know as they came.
RUNNER_OPTIONS: dict[str, Any] = {"auto_decompress": False}


def check_listen(host: str, port: int) -> None:
    """Fail with one line naming EVENTSYNC_LISTEN when `serve` could not listen there (a host
    that does not resolve, an address not on this machine, a port in use or not ours to
    take), before any start-up work: bind what aiohttp will bind, the way asyncio binds it,
    and let go again."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"setting EVENTSYNC_LISTEN is invalid: cannot resolve {host} ({reason})"
        ) from None
    for family, kind, proto, _name, address in dict.fromkeys(infos):
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"setting EVENTSYNC_LISTEN is invalid: cannot listen on {shown}: "
                f"{exc.strerror or exc}"
            ) from None


# Paths that need the read token when one is set: the change feed (and its stream), effective
# access and status carry content and who may see it. Health, readiness, metrics and the
# webhook route stay open (BookStack and probes call them without a key).
PROTECTED_PREFIXES = ("/changes", "/access/", "/status")


def is_loopback(host: str) -> bool | None:
    """Does `host` (an address or a name) only ever mean this machine? None when the name
    does not resolve (check_listen says so)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError, ValueError):
        return None
    return all(ipaddress.ip_address(i[4][0].split("%", 1)[0]).is_loopback for i in infos)


def check_exposure(host: str, read_token: object | None) -> None:
    """`serve` on an address other hosts can reach needs EVENTSYNC_READ_TOKEN: the change feed
    and the access answers are for those hosts now, and carry content. Checked before
    anything is bound there."""
    if read_token is None and is_loopback(host) is False:
        raise ConfigError(
            f"setting EVENTSYNC_READ_TOKEN is required to listen on {host} "
            "(EVENTSYNC_LISTEN), which other hosts can reach: /changes, /access and /status "
            "carry content"
        )


def _protected(path: str) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p) for p in PROTECTED_PREFIXES)


def read_token_middleware(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token is not None else None

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and _protected(request.path):
            given = request.headers.get("Authorization", "").strip().encode(errors="replace")
            # Constant time: how much of a guess matched must not show in the answer's time.
            if not hmac.compare_digest(given, expected):
                response = json_error(401, "a valid Authorization: Bearer <read token> is needed")
                response.headers["WWW-Authenticate"] = 'Bearer realm="eventsync"'
                return response
        return await handler(request)

    return require_token


@web.middleware
async def _errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON errors for every path, and an access log that names the route, never the URL
    (the webhook URL carries the secret)."""
    started = time.monotonic()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = json_error(exc.status, exc.reason)
    except Exception:
        log.exception("request failed", route=name)
        response = json_error(500, "internal error")
    # An accepted webhook is the hot path (thousands a second in a burst) and its job logs
    # one line of its own: its access line is debug. Everything else, rejections included,
    # is info.
    if name == WEBHOOK_ROUTE and response.status < 300 and not debug_enabled():
        return response
    level = log.debug if name == WEBHOOK_ROUTE and response.status < 300 else log.info
    level(
        "http",
        method=request.method,
        route=name,
        status=response.status,
        ms=round((time.monotonic() - started) * 1000, 1),
    )
    return response


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be an integer") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(reason=f"{name} must be between {low} and {high}")
    return value


def build_app(service: Service) -> web.Application:
    token = service.settings.read_token
    app = web.Application(
        middlewares=[
            _errors_and_access_log,
            read_token_middleware(token.get_secret_value() if token is not None else None),
        ]
    )

    async def changes(request: web.Request) -> web.Response:
        after = _int_param(request, "after", 0, 0, 2**62)
        limit = _int_param(request, "limit", 100, 1, MAX_CHANGES)
        rows = await service.store.changes(after, limit)
        last = rows[-1]["seq"] if rows else after
        return web.json_response({"changes": rows, "last_seq": last})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, reasons = await service.readiness()
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "reasons": reasons}
        return web.json_response(body, status=200 if ready else 503)

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(await service.status())

    async def metrics(_request: web.Request) -> web.Response:
        await service.refresh_metrics()
        body, content_type = service.metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    app.router.add_post(WEBHOOK_ROUTE, service.receiver.handle)
    app.router.add_get("/changes", changes)
    app.router.add_get(
        "/changes/stream",
        stream_handler(
            service.store,
            service.feed,
            service.stop_event,
            service.metrics,
            lambda: service.settings.stream_heartbeat,
        ),
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    for path, handler in answers.routes(service.store):
        app.router.add_get(path, handler)
    return app
