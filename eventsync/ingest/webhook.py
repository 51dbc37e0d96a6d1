"""`POST /webhooks/bookstack/{secret}`: validate, commit to the inbox, then answer."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Callable

from aiohttp import web

from eventsync.errors import UnstorableEvent
from eventsync.events import BadEvent, Event, from_webhook
from eventsync.ingest.inbox import Inbox
from eventsync.logging import debug_enabled, get_logger

log = get_logger("eventsync.webhook")

MAX_BODY = 1024 * 1024


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


@functools.cache
def _accepted_body(outcome: str) -> bytes:
    # A handful of outcomes: encode each once, not once per webhook.
    return json.dumps({"status": "accepted", "outcome": outcome}).encode()


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


async def _read_capped(request: web.Request, limit: int) -> bytes:
    """Read the body up to `limit` bytes. One read() returns what has arrived so far, which for
    a chunked body is not the whole of it."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await request.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class WebhookReceiver:
    def __init__(
        self,
        secret: str,
        inbox: Inbox,
        *,
        on_event: Callable[[Event, str], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        # Compare digests: equal length, so the comparison time says nothing about the secret.
        self._secret_digest = _digest(secret)
        self.inbox = inbox
        self._on_event = on_event
        self._on_reject = on_reject

    def _reject(self, reason: str, status: int, message: str) -> web.Response:
        if self._on_reject is not None:
            self._on_reject(reason)
        log.info("webhook rejected", reason=reason, status=status)
        return json_error(status, message)

    async def handle(self, request: web.Request) -> web.Response:
        given = request.match_info.get("secret", "")
        if not hmac.compare_digest(_digest(given), self._secret_digest):
            return self._reject("bad_secret", 404, "Not Found")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return self._reject("too_large", 413, f"the body is over {MAX_BODY} bytes")
        if request.content_type != "application/json":
            return self._reject("content_type", 415, "BookStack webhooks are application/json")
        try:
            body = await _read_capped(request, MAX_BODY + 1)
        except (ConnectionError, OSError):
            return self._reject("invalid", 400, "the body could not be read")
        if len(body) > MAX_BODY:
            return self._reject("too_large", 413, f"the body is over {MAX_BODY} bytes")
        try:
            # JSON between systems is UTF-8 (RFC 8259 8.1), and only strict decoding keeps
            # what is stored equal to what was sent (a BOM may be ignored: 8.1 again).
            text = body.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            return self._reject("bad_json", 400, "the body is not UTF-8")
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError):
            # RecursionError: nesting deeper than the parser's stack (`[[[[…`).
            return self._reject("bad_json", 400, "the body is not valid JSON")
        try:
            event = from_webhook(raw, text)
        except BadEvent as exc:
            return self._reject("invalid", 422, str(exc))
        try:
            outcome = await self.inbox.submit(event)
        except UnstorableEvent:
            # Validation let through a value the database refuses; the inbox logged which.
            return self._reject("invalid", 422, "the event cannot be stored")
        except RuntimeError:
            return json_error(503, "shutting down")
        if self._on_event is not None:
            self._on_event(event, outcome)
        if debug_enabled():
            log.debug("webhook accepted", type=event.type, key=event.key, outcome=outcome)
        return web.Response(
            body=_accepted_body(outcome), status=202, content_type="application/json"
        )
