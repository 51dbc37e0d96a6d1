"""For programs downstream of eventsync: verify a delivery's signature (`verify`), and follow
the change feed over HTTP from a stored seq (`changes`).

A webhook receiver::

    payload = verify(request.headers, await request.read(), SECRET)  # SignatureError if not
    for change in payload["changes"]: ...

An indexer that resumes where it stopped::

    async for change in changes("http://127.0.0.1:8780", after=load_seq(), kinds=["page"]):
        index(change)
        save_seq(change["seq"])
"""

from __future__ import annotations

import asyncio
import binascii
import json
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import aiohttp
from standardwebhooks import Webhook, WebhookVerificationError

from eventsync.errors import FeedError, SignatureError

__all__ = ["FeedError", "SignatureError", "changes", "verify"]

# One server-sent event at most (a page's state is its whole HTML, twice, and its markdown).
MAX_EVENT = 64 * 1024 * 1024


def verify(headers: Mapping[str, str], body: bytes | str, secret: str) -> Any:
    """The delivery's parsed JSON body (`{"changes": [...]}`), once its Standard Webhooks
    signature (`webhook-id`, `webhook-timestamp`, `webhook-signature`) checks out with
    `secret` (`whsec_…`, as `eventsync subscriptions add` printed it). Raises SignatureError
    otherwise, also for a timestamp more than five minutes from now (a replayed request).

    Uses the reference implementation (`standardwebhooks`). Dedup by `webhook-id`: a
    delivery can arrive more than once, always with the same id and the same changes."""
    try:
        hook = Webhook(secret)
    except (binascii.Error, ValueError, TypeError, RuntimeError):
        raise SignatureError("the secret is not whsec_ followed by base64") from None
    except Exception as exc:  # the library's EmptyWebhookSecretError
        raise SignatureError(f"the secret is unusable: {exc}") from None
    try:
        return hook.verify(body, {str(k): str(v) for k, v in headers.items()})
    except WebhookVerificationError as exc:
        raise SignatureError(f"signature does not verify: {exc}") from None
    except UnicodeDecodeError:
        raise SignatureError("the body is not UTF-8") from None
    except json.JSONDecodeError:
        raise SignatureError("signed, but the body is not JSON") from None
    except (ValueError, binascii.Error):
        # A webhook-signature without its "v1," or with broken base64: the library's own
        # parsing raises these.
        raise SignatureError("malformed webhook-signature header") from None


async def _events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str | None, str]]:
    """(last event id, data) per event of a text/event-stream (an id with no data comes as
    data ""), by the HTML standard's rules: lines end in LF or CRLF, ':' starts a comment,
    one space after the field's colon is dropped."""
    buffer = bytearray()
    last_id: str | None = None
    data: list[str] = []
    has_id = False
    async for chunk in content.iter_any():
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > MAX_EVENT:
                    raise FeedError(f"an event of the stream is over {MAX_EVENT} bytes")
                break
            line = bytes(buffer[:end]).rstrip(b"\r").decode("utf-8", "replace")
            del buffer[: end + 1]
            if not line:
                if data or has_id:
                    yield last_id, "\n".join(data)
                data, has_id = [], False
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "id" and "\0" not in value:
                last_id, has_id = value, True


async def changes(
    url: str,
    *,
    after: int = 0,
    kinds: Iterable[str] | None = None,
    token: str | None = None,
    session: aiohttp.ClientSession | None = None,
    reconnect_max: float = 30.0,
    read_timeout: float = 90.0,
) -> AsyncIterator[dict[str, Any]]:
    """Every change after seq `after`, for ever: each row as `GET /changes` gives it plus its
    `state` (the entity's mirror row after the change; null after a delete), in seq order.

    `url` is `eventsync serve`'s base URL. Reads `GET /changes/stream` and reconnects by
    itself (from the last seq it saw, with back-off up to `reconnect_max` seconds) when the
    connection drops or serve restarts; a connection silent for `read_timeout` seconds (serve
    sends a heartbeat every EVENTSYNC_STREAM_HEARTBEAT) is taken for dead. Store each
    change's `seq` once it is processed and pass it as `after` next time: nothing is missed.
    A 4xx (a bad kind, a missing or wrong `token` for EVENTSYNC_READ_TOKEN) raises FeedError.
    """
    own = session is None
    http = session or aiohttp.ClientSession()
    position = after
    failures = 0
    params = {"kinds": ",".join(kinds)} if kinds else {}
    stream_url = url.rstrip("/") + "/changes/stream"
    try:
        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(position)}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                async with http.get(
                    stream_url,
                    params={**params, "after": str(position)},
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=read_timeout),
                ) as response:
                    if 400 <= response.status < 500:
                        text = (await response.content.read(2000)).decode("utf-8", "replace")
                        raise FeedError(
                            f"{stream_url} answered {response.status}: {text.strip()}",
                            status=response.status,
                        )
                    if response.status != 200:
                        raise aiohttp.ClientResponseError(
                            response.request_info, (), status=response.status
                        )
                    if not response.content_type.startswith("text/event-stream"):
                        raise FeedError(
                            f"{stream_url} is not an event stream ({response.content_type}): "
                            "is the URL eventsync serve's?"
                        )
                    async for event_id, data in _events(response.content):
                        failures = 0
                        if event_id is not None and event_id.isdigit():
                            position = max(position, int(event_id))
                        if data:
                            yield json.loads(data)
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                pass  # reconnect below, from `position`
            failures += 1
            delay = min(reconnect_max, 0.5 * 2 ** min(failures - 1, 16))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
    finally:
        if own:
            await http.close()
