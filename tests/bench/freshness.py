"""Freshness: from a change in BookStack (its webhook sent at once, as BookStack does) to
the change visible in the mirror's change feed. An in-process Service and fake BookStack;
the feed is read through a separate database connection (SQLite or PostgreSQL, as the
mirror's), as a downstream indexer would.

Reports p50/p95/p99/max over single changes spaced apart, overall and per kind.
Goal: p50 <= 0.3 s.

    .venv/bin/python tests/bench/freshness.py [--changes 200] [--spacing 0.1]
        [--backend sqlite|postgres] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import tempfile
import time
from pathlib import Path

import backend

from eventsync.app import open_app
from eventsync.config import Settings
from eventsync.logging import configure_logging
from eventsync.service import Service
from eventsync.testing import FakeBookStack

SECRET = "bench-freshness-secret-0123456789"
RPM = 100_000
TIMEOUT = 10.0  # a change not visible by then counts as missed


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def visible(
    feed: backend.Reader, after: int, entity: str, entity_id: int, poll: float
) -> float | None:
    """Wait for a feed row about the entity after `after`; returns when it was seen."""
    deadline = time.perf_counter() + TIMEOUT
    while time.perf_counter() < deadline:
        row = await feed.fetchone(
            "SELECT seq FROM changes WHERE seq > ? AND entity = ? AND entity_id = ? "
            "ORDER BY seq LIMIT 1",
            (after, entity, entity_id),
        )
        if row is not None:
            return time.perf_counter()
        await asyncio.sleep(poll)
    return None


async def run(args: argparse.Namespace) -> None:
    configure_logging("json", "warning")
    workdir = Path(tempfile.mkdtemp(prefix="eventsync-freshness-"))
    rng = random.Random(args.seed)
    lags: dict[str, list[float]] = collections.defaultdict(list)
    missed: collections.Counter[str] = collections.Counter()
    async with (
        backend.database(args, workdir, "freshness") as db,
        FakeBookStack(requests_per_minute=RPM) as fake,
    ):
        fake.seed(pages=args.pages, books=max(1, args.pages // 20), seed=args.seed)
        settings = Settings(
            bookstack_url=fake.url,
            bookstack_token_id=fake.token_id,
            bookstack_token_secret=fake.token_secret,
            webhook_secret=SECRET,
            **db.settings(),
            listen="127.0.0.1:0",
            requests_per_minute=RPM,
            poll_interval=args.poll_interval,
            # The sweep's share of a 100,000/min budget would be 166 reads/s of background
            # load: unrealistic (at BookStack's 180/min it is 0.25/s). Off.
            sweep_share=0.0,
        )
        async with (
            open_app(settings) as app,
            db.reader() as feed,
        ):
            store = app.store
            svc = Service(app)
            await svc.start()
            try:
                await asyncio.wait_for(svc.synced.wait(), 60)
                fake.add_webhook(f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}")
                await svc.dispatcher.drain(30)
                fake.faults.latency = args.api_latency
                seq = await store.last_seq()
                books = sorted(fake.state.books)
                for n in range(args.changes):
                    roll = rng.random()
                    started = time.perf_counter()
                    if roll < 0.7:
                        kind, entity, eid = "page update", "page", rng.choice(pages(fake))
                        await fake.update_page(eid, html=f"<p>fresh {n}</p>")
                    elif roll < 0.85:
                        kind, entity, eid = "book update", "book", rng.choice(books)
                        await fake.update_book(eid, description=f"fresh {n}")
                    else:
                        kind, entity = "permissions", "permissions"
                        eid = rng.choice(pages(fake))
                        # Restrict, or back to inheriting: always a change to the mirror.
                        restricted = ("page", eid) in fake.state.entity_permissions
                        await fake.set_permissions(
                            "page",
                            eid,
                            fallback=None
                            if restricted
                            else {"view": True, "create": False, "update": False, "delete": False},
                        )
                    seen = await visible(feed, seq, entity, eid, args.poll)
                    if seen is None:
                        missed[kind] += 1
                    else:
                        lags[kind].append(seen - started)
                    seq = await store.last_seq()
                    await asyncio.sleep(args.spacing)
            finally:
                await svc.stop()
    print(f"backend: {db.description}")
    report(lags, missed, args)


def pages(fake: FakeBookStack) -> list[int]:
    return sorted(i for i, p in fake.state.pages.items() if not p.trashed and not p.draft)


def report(
    lags: dict[str, list[float]], missed: collections.Counter[str], args: argparse.Namespace
) -> None:
    every = [x for values in lags.values() for x in values]
    print(
        f"{len(every)} changes seen, missed (> {TIMEOUT:.0f} s): {dict(missed) or 'none'}; "
        f"spacing {args.spacing * 1000:.0f} ms; feed polled every {args.poll * 1000:.0f} ms; "
        f"API latency {args.api_latency * 1000:.0f} ms"
    )

    def line(name: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return (
            f"  {name:<12} n={len(ms):<4} p50 {percentile(ms, 50):7.1f} ms  "
            f"p95 {percentile(ms, 95):7.1f} ms  p99 {percentile(ms, 99):7.1f} ms  "
            f"max {max(ms, default=float('nan')):7.1f} ms  mean {statistics.fmean(ms):7.1f} ms"
        )

    print(line("all", every))
    for kind in sorted(lags):
        print(line(kind, lags[kind]))
    p50 = percentile(every, 50)
    print(f"goal p50 <= 0.3 s: {'met' if p50 <= 0.3 else 'NOT met'} (p50 {p50:.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--spacing", type=float, default=0.1, help="seconds between changes")
    parser.add_argument("--poll", type=float, default=0.002, help="feed poll interval (s)")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="audit-log poll (s)")
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--api-latency", type=float, default=0.0, help="seconds the fake adds to each API call"
    )
    backend.add_arguments(parser)
    args = parser.parse_args()
    backend.check_arguments(parser, args)
    if not 1 <= args.changes <= 2000:
        parser.error("--changes must be between 1 and 2000")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
