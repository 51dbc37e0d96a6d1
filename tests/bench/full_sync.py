"""First full sync of an empty mirror: `eventsync reconcile --full` as a subprocess against
a fake BookStack in this process, under a real rate limit; then a second diff full sync with
nothing changed.

Reports API requests by route against the lower bound (listing pages at 500 rows, one read
per entity that its listing does not fully describe, one content-permission read per
restricted item and the `{is_restricted}` search pages that find them, one audit-log head),
wall time against the time the request budget
allows, and the sync process's peak RSS. Goals: requests <= 1.05 x lower bound, wall <= 1.1 x
time bound, RSS <= 150 MB. The second sync must read no page bodies: listings, plus roles,
which a full sync always re-reads (their membership changes move no timestamp).

    .venv/bin/python tests/bench/full_sync.py [--pages 2000] [--books 60] [--rpm 5900]
        [--backend sqlite|postgres] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import backend

from eventsync.app import open_app
from eventsync.config import Settings
from eventsync.logging import configure_logging
from eventsync.records import COMPLETE_FROM_LISTING, ENDPOINTS
from eventsync.store.mirror import SECTION_OF
from eventsync.testing import FakeBookStack

PAGE_SIZE = 500  # BookStack's maximum `count` per listing request
SEARCH_PAGE = 100  # /api/search's maximum `count`, per entity type
AUDIT = "/api/audit-log"
CONTENT = ("shelf", "book", "chapter", "page")  # the kinds that carry content permissions
GOAL_REQUESTS = 1.05
GOAL_WALL = 1.1
GOAL_RSS_MB = 150.0
# `eventsync reconcile --full --json` that reports its own peak RSS (VmHWM, KiB) on exit.
# Not getrusage(RUSAGE_CHILDREN): Linux keeps a child's maxrss across exec, and a child
# forked from this process (which holds the fake's whole wiki) starts out as large as it.
PEAK_REPORTING_RECONCILE = """
import atexit, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("VMHWM " + line.split()[1] + "\\n")
atexit.register(report)
from eventsync.cli import main
sys.argv = ["eventsync", "reconcile", "--full", "--json"]
raise SystemExit(main())
"""


def lower_bound(truth: dict[str, Any]) -> dict[str, int]:
    """The fewest requests any correct first sync can make, by part."""
    counts = {kind: len(truth[section]) for kind, section in SECTION_OF.items()}
    per_type = collections.Counter(p["content_type"] for p in truth["permissions"])
    return {
        # An empty listing still takes one request to learn that it is empty.
        "listing pages": sum(max(1, math.ceil(n / PAGE_SIZE)) for n in counts.values()),
        "entity reads": sum(n for k, n in counts.items() if k not in COMPLETE_FROM_LISTING),
        # Only items with permissions of their own are read; every other has the default.
        "permission reads": len(truth["permissions"]),
        # The {is_restricted} search: up to SEARCH_PAGE results of each type per page.
        "search pages": max(1, math.ceil(max(per_type.values(), default=0) / SEARCH_PAGE)),
        "audit-log head": 1,
    }


def first_difference(mirror: Any, truth: Any, path: str = "") -> str | None:
    """Where the export first departs from truth(), as a path; None when they are equal."""
    if isinstance(mirror, dict) and isinstance(truth, dict):
        for key in sorted(set(mirror) | set(truth), key=str):
            if key not in mirror or key not in truth:
                side = "mirror" if key not in mirror else "truth"
                return f"{path}.{key}: missing from the {side}"
            found = first_difference(mirror[key], truth[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(mirror, list) and isinstance(truth, list):
        if all(isinstance(r, dict) and ("id" in r or "content_id" in r) for r in mirror + truth):
            # Rows are matched by identity, so one missing row is reported as that row, not
            # as every later row shifted by one.
            def key(r: dict[str, Any]) -> tuple[str, int]:
                return (str(r.get("content_type", "")), int(r.get("id", r.get("content_id", 0))))

            a = {key(r): r for r in mirror}
            b = {key(r): r for r in truth}
            for k in sorted(set(a) | set(b)):
                label = f"{path}[{k[0] + ' ' if k[0] else ''}{k[1]}]"
                if k not in a or k not in b:
                    return f"{label}: missing from the {'mirror' if k not in a else 'truth'}"
                found = first_difference(a[k], b[k], label)
                if found:
                    return found
            return None
        if len(mirror) != len(truth):
            return f"{path}: mirror {mirror!r:.200} != truth {truth!r:.200}"
        for i, (x, y) in enumerate(zip(mirror, truth, strict=True)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if mirror != truth:
        return f"{path}: mirror {mirror!r:.200} != truth {truth!r:.200}"
    return None


def print_routes(counts: collections.Counter[str], indent: str = "  ") -> None:
    for route, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"{indent}{n:6}  {route}")


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


async def first_sync(
    fake: FakeBookStack, db: backend.Database, workdir: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], float, float]:
    """`eventsync reconcile --full --json` in its own process, so its peak RSS is its own and
    not the fake's (which holds the whole wiki and its request log in this process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSYNC_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(
        EVENTSYNC_BOOKSTACK_URL=fake.url,
        EVENTSYNC_BOOKSTACK_TOKEN_ID=fake.token_id,
        EVENTSYNC_BOOKSTACK_TOKEN_SECRET=fake.token_secret,
        **db.env(),
        EVENTSYNC_REQUESTS_PER_MINUTE=str(args.rpm),
        EVENTSYNC_FETCH_CONCURRENCY=str(args.concurrency),
        EVENTSYNC_LOG_FORMAT="json",
        EVENTSYNC_LOG_LEVEL="warning",
    )
    log_path = workdir / "reconcile.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        # cwd is the temp dir so that no .env file of the caller's is picked up.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PEAK_REPORTING_RECONCILE,
            env=env,
            cwd=workdir,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
        )
        out, _ = await proc.communicate()
    wall = time.monotonic() - started
    peaks = [line for line in log_path.read_text(errors="replace").splitlines()]
    rss_mb = next(
        (int(line.split()[1]) / 1024 for line in peaks if line.startswith("VMHWM ")), float("nan")
    )
    if proc.returncode != 0:
        print(f"`eventsync reconcile --full` exited with {proc.returncode}", file=sys.stderr)
        print(out.decode(errors="replace")[-4000:], file=sys.stderr)
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise SystemExit(1)
    return json.loads(out), wall, rss_mb


async def run(args: argparse.Namespace) -> int:
    configure_logging("json", "warning")
    with tempfile.TemporaryDirectory(prefix="eventsync-full-sync-") as tmp:
        workdir = Path(tmp)
        async with (
            backend.database(args, workdir, "full_sync") as db,
            FakeBookStack(requests_per_minute=args.server_rpm) as fake,
        ):
            fake.seed(
                pages=args.pages,
                books=args.books,
                shelves=args.shelves,
                users=args.users,
                roles=args.roles,
                attachments=args.attachments,
                seed=args.seed,
            )
            fake.faults.latency = args.latency
            truth = fake.truth()
            bound = lower_bound(truth)
            summary, wall, rss_mb = await first_sync(fake, db, workdir, args)
            counts = fake.request_counts()
            statuses = collections.Counter(r.status for r in fake.requests)
            settings = Settings(
                bookstack_url=fake.url,
                bookstack_token_id=fake.token_id,
                bookstack_token_secret=fake.token_secret,
                **db.settings(),
                requests_per_minute=args.rpm,
                fetch_concurrency=args.concurrency,
            )
            async with open_app(settings) as app:
                store = app.store
                difference = first_difference(await store.export(), truth)

                # The second sync runs in-process: only its request count is measured. It is
                # the reconciler's default full sync, which reads content permissions only of
                # items the search newly finds restricted; the CLI asks for every restricted
                # item's on purpose (events about permissions may have been lost).
                fake.reset_requests()
                again = await app.reconciler.full_sync()
                second = fake.request_counts()
                difference_after = first_difference(await store.export(), fake.truth())

    print(f"backend: {db.description}")
    print(
        f"wiki: {len(truth['pages'])} pages, {len(truth['chapters'])} chapters, "
        f"{len(truth['books'])} books, {len(truth['shelves'])} shelves, "
        f"{len(truth['attachments'])} attachments, {len(truth['users'])} users, "
        f"{len(truth['roles'])} roles, {len(truth['permissions'])} non-default permissions"
    )
    print(
        f"budget: client {args.rpm:.0f}/min, fake's limit {args.server_rpm}/min, "
        f"concurrency {args.concurrency}, API latency {args.latency * 1000:.0f} ms"
    )
    total = sum(counts.values())
    floor = sum(bound.values())
    print(f"\nfirst sync (`eventsync reconcile --full`, empty database): {total} API requests")
    print_routes(counts)
    print(f"  statuses: {dict(statuses)}; the sync counted {summary['requests']} itself")
    if counts[AUDIT] > 1:
        # Not part of the diff sync: `reconcile` polls once more for what happened meanwhile.
        print(f"  {AUDIT}: {counts[AUDIT]} = the head + the poll `reconcile` makes after the sync")
    print(
        "  lower bound: " + " + ".join(f"{n} {part}" for part, n in bound.items()) + f" = {floor}"
    )
    ratio = total / floor
    print(
        f"  requests / lower bound: {ratio:.3f}  "
        f"(goal <= {GOAL_REQUESTS}: {verdict(ratio <= GOAL_REQUESTS)})"
    )
    time_bound = total / (args.rpm / 60)
    wall_ratio = wall / time_bound
    print(
        f"  wall: {wall:.1f} s for the whole process ({summary['seconds']:.1f} s in the sync "
        f"itself); time bound {total} / {args.rpm / 60:.1f} per s = {time_bound:.1f} s"
    )
    print(
        f"  wall / time bound: {wall_ratio:.3f}  (goal <= {GOAL_WALL}: "
        f"{verdict(wall_ratio <= GOAL_WALL)}); sync alone "
        f"{summary['seconds'] / time_bound:.3f}"
    )
    print(
        f"  peak RSS of the sync process: {rss_mb:.1f} MB  "
        f"(goal <= {GOAL_RSS_MB:.0f} MB: {verdict(rss_mb <= GOAL_RSS_MB)})"
    )
    print(f"  complete: {summary['complete']}; problems: {summary['problems'] or 'none'}")
    print(f"  export equals fake.truth(): {'OK' if difference is None else difference}")

    second_total = sum(second.values())
    listing_routes = {ENDPOINTS[k][0] for k in SECTION_OF} | {AUDIT, "/api/search"}
    listings = sum(n for r, n in second.items() if r in listing_routes)
    reads = collections.Counter({r: n for r, n in second.items() if r not in listing_routes})
    membership_reads = reads.pop("/api/roles/{id}", 0) + reads.pop("/api/shelves/{id}", 0)
    print(f"\nsecond full sync, nothing changed: {second_total} API requests")
    print_routes(second)
    print(
        f"  {listings} listing/audit requests, {membership_reads} role and shelf reads (by "
        "design: a full sync re-reads them, their members and books move no timestamp), "
        f"other reads: {sum(reads.values())} (goal 0)"
    )
    print(
        f"  page bodies fetched: {second.get('/api/pages/{id}', 0)}; "
        f"complete: {again.complete}; "
        f"export equals fake.truth(): {'OK' if difference_after is None else difference_after}"
    )
    print(
        f"  (`eventsync reconcile --full` on this mirror would also re-read the "
        f"{bound['permission reads']} restricted items' permissions: the CLI asks for that)"
    )
    ok = (
        summary["complete"]
        and difference is None
        and difference_after is None
        and not reads
        and again.complete
    )
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--books", type=int, default=60)
    parser.add_argument("--shelves", type=int, default=3)
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--roles", type=int, default=3)
    parser.add_argument("--attachments", type=int, default=20)
    parser.add_argument(
        "--rpm",
        type=float,
        default=5900.0,
        help="the client's budget per minute (EVENTSYNC_REQUESTS_PER_MINUTE)",
    )
    parser.add_argument(
        "--server-rpm",
        type=int,
        default=6000,
        help="the fake's API_REQUESTS_PER_MIN; keep it above --rpm plus the client's burst",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="EVENTSYNC_FETCH_CONCURRENCY")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds the fake adds to each API call"
    )
    parser.add_argument("--seed", type=int, default=1)
    backend.add_arguments(parser)
    args = parser.parse_args()
    backend.check_arguments(parser, args)
    if not 1 <= args.books <= args.pages <= 50_000:
        parser.error("need 1 <= --books <= --pages <= 50,000")
    if not 0 < args.rpm <= 100_000:
        parser.error("--rpm must be within (0, 100000] (the setting's range)")
    raise SystemExit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
