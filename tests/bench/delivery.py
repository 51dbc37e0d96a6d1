"""Outbound delivery: deliveries per second to a local receiver, and the latency a
subscription adds to the change feed's own (BookStack change → receiver has it).

Throughput: a feed of --rows page changes (each with its state, a page of about 2 KB of
HTML) delivered from seq 1 to a receiver in its own process that answers 204, at batch
sizes 1 and the default 50, to one and to four subscriptions at once.

Latency: an in-process Service and fake BookStack (webhooks on, as freshness.py), one
subscription to an in-process receiver; single page edits spaced apart. For each: when its
row is visible in the feed (a separate SQLite connection polled every --poll s, as a
downstream reader would see it) and when the receiver got it. Goal: p50 of the difference
<= 50 ms.

    .venv/bin/python tests/bench/delivery.py [--rows 20000] [--changes 200] [--spacing 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
from aiohttp import web

from eventsync.app import open_app, open_store
from eventsync.config import Settings
from eventsync.delivery import Delivery, new_secret
from eventsync.feed import FeedWatch
from eventsync.logging import configure_logging
from eventsync.metrics import Metrics
from eventsync.service import Service
from eventsync.store.subscriptions import Subscriptions
from eventsync.testing import FakeBookStack

SECRET = "bench-delivery-secret-0123456789"
RPM = 100_000
PAGES = 500
HTML = "<p>" + "lorem ipsum dolor sit amet " * 70 + "</p>"  # about 2 KB

# A receiver in its own process: it should not share the sender's event loop.
RECEIVER = r"""
import asyncio, json, sys
from aiohttp import web
rows = 0
ids = set()
async def hook(request):
    global rows
    body = await request.read()
    ids.add(request.headers["webhook-id"])
    rows += body.count(b'"seq":')
    return web.Response(status=204)
async def count(_request):
    return web.json_response({"rows": rows, "deliveries": len(ids)})
async def main():
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/hook", hook)
    app.router.add_get("/count", count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# ---- throughput ------------------------------------------------------------------------------


async def fill(db: Path, rows: int) -> None:
    async with await open_store(db) as store:
        done = 0
        while done < rows:
            async with store.transaction() as tx:
                for _ in range(min(500, rows - done)):
                    page_id = 1 + done % PAGES
                    await tx.upsert(
                        "page",
                        {
                            "id": page_id,
                            "book_id": 1,
                            "chapter_id": None,
                            "name": f"Page {page_id}",
                            "slug": f"page-{page_id}",
                            "priority": page_id,
                            "draft": False,
                            "template": False,
                            "revision_count": done,
                            "raw_html": f"{HTML}<p>{done}</p>",
                            "html": f"{HTML}<p>{done}</p>",
                            "markdown": "",
                            "tags": [],
                        },
                    )
                    done += 1


async def throughput(db: Path, receiver_url: str, batch: int, subscribers: int) -> dict[str, Any]:
    async with await open_store(db) as store:
        subs = Subscriptions(store)
        for old in await subs.all():
            await subs.remove(old.id)
        ids = [(await subs.add(receiver_url, None, new_secret(), 0)).id for _ in range(subscribers)]
        head = await store.last_seq()
        feed = FeedWatch(store)
        delivery = Delivery(
            store, feed, Metrics(), allow_private=True, timeout=30.0, batch_size=batch
        )
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as http:
            async with http.get(receiver_url.replace("/hook", "/count")) as r:
                before = await r.json()
            started = time.perf_counter()
            task = asyncio.create_task(delivery.run(stop))
            while True:
                await asyncio.sleep(0.05)
                cursors = [(await subs.get(i)).cursor for i in ids]  # type: ignore[union-attr]
                if all(c == head for c in cursors):
                    break
            elapsed = time.perf_counter() - started
            stop.set()
            await task
            async with http.get(receiver_url.replace("/hook", "/count")) as r:
                after = await r.json()
    deliveries = after["deliveries"] - before["deliveries"]
    rows = after["rows"] - before["rows"]
    return {
        "batch": batch,
        "subscribers": subscribers,
        "rows": rows,
        "deliveries": deliveries,
        "seconds": elapsed,
        "deliveries_per_s": deliveries / elapsed,
        "changes_per_s": rows / elapsed,
    }


# ---- latency ---------------------------------------------------------------------------------


async def latency(args: argparse.Namespace, folder: Path) -> tuple[list[float], list[float]]:
    db = folder / "latency.db"
    received: dict[tuple[str, int, int], float] = {}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.perf_counter()
        for row in json.loads(body)["changes"]:
            received.setdefault((row["entity"], row["entity_id"], row["seq"]), now)
        return web.Response(status=204)

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
    feed_lags: list[float] = []
    delivery_lags: list[float] = []
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=200, books=10, seed=3)
        settings = Settings(
            bookstack_url=fake.url,
            bookstack_token_id=fake.token_id,
            bookstack_token_secret=fake.token_secret,
            webhook_secret=SECRET,
            database=db,
            listen="127.0.0.1:0",
            requests_per_minute=RPM,
            poll_interval=5.0,
            sweep_share=0.0,
            subscriptions_allow_private=True,
        )
        async with (
            open_app(settings) as app,
            aiosqlite.connect(db) as reader,
        ):
            store = app.store
            svc = Service(app)
            await svc.start()
            try:
                await asyncio.wait_for(svc.synced.wait(), 60)
                await Subscriptions(store).add(url, None, new_secret(), await store.last_seq())
                fake.add_webhook(f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}")
                await svc.dispatcher.drain(30)
                for _ in range(100):  # serve takes a new subscription up within a second
                    if svc.delivery.active:
                        break
                    await asyncio.sleep(0.05)
                pages = sorted(fake.state.pages)
                for n in range(args.changes):
                    page_id = pages[n % len(pages)]
                    after = await store.last_seq()
                    started = time.perf_counter()
                    await fake.update_page(page_id, html=f"<p>latency {n}</p>")
                    seq, seen = await visible(reader, after, page_id, args.poll)
                    if seq is None:
                        continue
                    deadline = time.perf_counter() + 10
                    while ("page", page_id, seq) not in received:
                        if time.perf_counter() > deadline:
                            break
                        await asyncio.sleep(0.001)
                    got = received.get(("page", page_id, seq))
                    if got is not None:
                        feed_lags.append(seen - started)
                        delivery_lags.append(got - started)
                    await asyncio.sleep(args.spacing)
            finally:
                await svc.stop()
    await runner.cleanup()
    return feed_lags, delivery_lags


async def visible(
    reader: aiosqlite.Connection, after: int, page_id: int, poll: float
) -> tuple[int | None, float]:
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline:
        async with reader.execute(
            "SELECT seq FROM changes WHERE seq > ? AND entity = 'page' AND entity_id = ? "
            "ORDER BY seq LIMIT 1",
            (after, page_id),
        ) as cur:
            row = await cur.fetchone()
        if row is not None:
            return int(row[0]), time.perf_counter()
        await asyncio.sleep(poll)
    return None, 0.0


# ---- main --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    configure_logging("json", "warning")
    folder = Path(tempfile.mkdtemp(prefix="eventsync-delivery-"))
    db = folder / "throughput.db"
    started = time.perf_counter()
    await fill(db, args.rows)
    size = db.stat().st_size
    async with (
        aiosqlite.connect(db) as conn,
        conn.execute("SELECT sum(length(state)) FROM changes") as cur,
    ):
        states = ((await cur.fetchone()) or (0,))[0] or 0
    print(
        f"feed: {args.rows} page changes with their states, written in "
        f"{time.perf_counter() - started:.1f} s; database {size / 1e6:.1f} MB, of which the "
        f"states {states / 1e6:.1f} MB ({states / args.rows / 1e3:.1f} kB a change)"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RECEIVER, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    port = int((await proc.stdout.readline()).decode())
    receiver = f"http://127.0.0.1:{port}/hook"
    try:
        print("throughput (receiver in its own process, answers 204):")
        for batch, subscribers in ((1, 1), (50, 1), (50, 4)):
            r = await throughput(db, receiver, batch, subscribers)
            print(
                f"  batch {r['batch']:>3}, {r['subscribers']} subscriber(s): "
                f"{r['deliveries']:>6} deliveries, {r['rows']:>6} changes in {r['seconds']:6.2f} s"
                f" = {r['deliveries_per_s']:7.0f} deliveries/s, {r['changes_per_s']:7.0f} changes/s"
            )
    finally:
        proc.kill()
        await proc.wait()

    feed_lags, delivery_lags = await latency(args, folder)
    added = [d - f for f, d in zip(feed_lags, delivery_lags, strict=True)]

    def line(name: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return (
            f"  {name:<28} n={len(ms):<4} p50 {percentile(ms, 50):7.1f} ms  "
            f"p99 {percentile(ms, 99):7.1f} ms  max {max(ms, default=float('nan')):7.1f} ms  "
            f"mean {statistics.fmean(ms) if ms else float('nan'):7.1f} ms"
        )

    print(
        f"latency ({len(feed_lags)} page edits, {args.spacing * 1000:.0f} ms apart; feed "
        f"polled every {args.poll * 1000:.0f} ms):"
    )
    print(line("change -> row in the feed", feed_lags))
    print(line("change -> subscriber has it", delivery_lags))
    print(line("added by delivery", added))
    p50 = percentile(added, 50) * 1000
    print(f"goal p50 <= 50 ms above the feed: {'met' if p50 <= 50 else 'NOT met'} ({p50:.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="changes for the throughput run")
    parser.add_argument("--changes", type=int, default=200, help="page edits for the latency run")
    parser.add_argument("--spacing", type=float, default=0.05, help="seconds between edits")
    parser.add_argument("--poll", type=float, default=0.002, help="feed poll interval (s)")
    args = parser.parse_args()
    if not 1 <= args.rows <= 200_000 or not 1 <= args.changes <= 5000:
        parser.error("--rows must be 1-200000 and --changes 1-5000")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
