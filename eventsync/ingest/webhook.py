"""`POST /webhooks/bookstack/{secret}`: validate, commit to the inbox, then answer."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import zlib
from collections.abc import Callable

from aiohttp import web

from eventsync.errors import UnstorableEvent
from eventsync.events import BadEvent, Event, from_webhook
from eventsync.ingest.inbox import Inbox
from eventsync.logging import debug_enabled, get_logger

log = get_logger("eventsync.webhook")

MAX_BODY = 1024 * 1024
# Content codings a body may arrive in (RFC 9110 8.4.1; x-gzip is gzip, 8.4.1.3), decoded
# here (aiohttp's own decoding is off: server.RUNNER_OPTIONS) so that one that does not decode
# is a 400. Any other coding is 415, as RFC 9110 15.5.16 says: nothing is guessed at.
SUPPORTED_CODINGS = ("gzip", "x-gzip", "deflate")
ACCEPT_ENCODING = "gzip, deflate"
# More codings than anyone applies on purpose: each layer costs a pass over up to MAX_BODY.
MAX_CODINGS = 3


class _Undecodable(ValueError):
    """The body is not in the content coding its Content-Encoding names."""


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


def content_codings(header: str) -> list[str] | None:
    """The codings a Content-Encoding header says were applied, in order (identity left
    out), or None when one of them is not supported."""
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if len(codings) > MAX_CODINGS or any(c not in SUPPORTED_CODINGS for c in codings):
        return None
    return codings


def _inflate(data: bytes, coding: str, cap: int) -> bytes:
    """Undo one coding; stops at `cap` bytes of output (the caller answers 413), so a small
    body that inflates to gigabytes costs no more than one that inflates to `cap`."""
    wbits = 31  # gzip
    if coding == "deflate":
        # "deflate" is the zlib format (RFC 9110 8.4.1.2); some senders send raw deflate,
        # which aiohttp and browsers accept too. A zlib stream's first byte says which.
        wbits = 15 if data[:1] and data[0] & 0x0F == 8 else -15
    out = bytearray()
    while True:
        decoder = zlib.decompressobj(wbits)
        try:
            out += decoder.decompress(data, cap - len(out))
        except zlib.error:
            raise _Undecodable(f"the body is not valid {coding}") from None
        if len(out) >= cap:
            return bytes(out)
        if not decoder.eof:
            raise _Undecodable(f"the {coding} body ends early")
        data = decoder.unused_data
        if not data:
            return bytes(out)
        if wbits != 31:  # only gzip has several members (RFC 1952 2.2)
            raise _Undecodable(f"the {coding} body has data after its end")


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
        codings = content_codings(",".join(request.headers.getall("Content-Encoding", [])))
        if codings is None:
            response = self._reject(
                "content_type", 415, f"the only content codings accepted are {ACCEPT_ENCODING}"
            )
            response.headers["Accept-Encoding"] = ACCEPT_ENCODING
            return response
        try:
            body = await _read_capped(request, MAX_BODY + 1)
        except (ConnectionError, OSError, web.RequestPayloadError):
            # RequestPayloadError: broken chunked framing, the sender's fault like the rest.
            return self._reject("invalid", 400, "the body could not be read")
        try:
            for coding in reversed(codings):
                if len(body) > MAX_BODY:
                    break
                body = _inflate(body, coding, MAX_BODY + 1)
        except _Undecodable as exc:
            return self._reject("bad_json", 400, str(exc))
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
