"""`GET /changes/stream`: the change feed as server-sent events, woken by each commit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from eventsync.delivery import encode_row, parse_kinds
from eventsync.errors import UsageError
from eventsync.feed import FeedWatch
from eventsync.metrics import Metrics
from eventsync.store.base import Store
from eventsync.store.subscriptions import Subscriptions

# Rows read and written at a time while catching up.
STREAM_BATCH = 200
# A client that takes no bytes for this long is dropped: it holds a task and a buffer.
WRITE_TIMEOUT = 60.0
# What EventSource waits before it reconnects (it sends Last-Event-ID then).
RETRY_MS = 2000
MAX_SEQ = 2**62


def _seq(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be a change-feed seq (an integer)") from None
    if not 0 <= value <= MAX_SEQ:
        raise web.HTTPBadRequest(reason=f"{name} must be between 0 and {MAX_SEQ}")
    return value


def stream_handler(
    store: Store,
    feed: FeedWatch,
    stop: asyncio.Event,
    metrics: Metrics,
    heartbeat: Callable[[], float],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    subs = Subscriptions(store)

    async def stream(request: web.Request) -> web.StreamResponse:
        # A reconnecting EventSource sends the last id it saw: that wins over ?after=.
        # Neither: from now on (?after=0 is the whole feed).
        last_id = request.headers.get("Last-Event-ID", "").strip()
        after = request.query.get("after", "").strip()
        if last_id:
            position = _seq(last_id, "Last-Event-ID")
        elif after:
            position = _seq(after, "after")
        else:
            position = await store.last_seq()
        try:
            kinds = parse_kinds(request.query.get("kinds"))
        except UsageError as exc:
            raise web.HTTPBadRequest(reason=str(exc)) from None

        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                # nginx buffers proxied responses by default: an event would wait for more.
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        metrics.stream_clients.inc()
        last_write = time.monotonic()

        async def write(text: str) -> None:
            nonlocal last_write
            async with asyncio.timeout(WRITE_TIMEOUT):
                await response.write(text.encode())
            last_write = time.monotonic()

        told = position  # the last id the client has been sent
        try:
            await write(f"retry: {RETRY_MS}\n: eventsync change feed after {position}\n\n")
            while not stop.is_set():
                mark = feed.mark()
                head = await store.last_seq()
                rows = []
                if head > position:
                    rows = await subs.rows(position, kinds, through=head, limit=STREAM_BATCH)
                if rows:
                    await write("".join(f"id: {r['seq']}\ndata: {encode_row(r)}\n\n" for r in rows))
                    position = told = rows[-1]["seq"]
                    if len(rows) == STREAM_BATCH:
                        continue  # catching up: no wait
                elif head > position:
                    position = head  # rows of other kinds only, up to the head
                quiet = heartbeat() - (time.monotonic() - last_write)
                if quiet > 0:
                    await feed.wait(mark, stop, timeout=quiet)
                    if mark.is_set() or stop.is_set():
                        continue
                if position > told:
                    # An id with no data moves the client's Last-Event-ID past rows it
                    # filtered out, without an event (HTML: dispatching an event, step 1).
                    await write(f"id: {position}\n\n")
                    told = position
                await write(": keep-alive\n\n")
        except (ConnectionError, TimeoutError):
            pass  # the client went, or stopped reading
        finally:
            metrics.stream_clients.dec()
        return response

    return stream
