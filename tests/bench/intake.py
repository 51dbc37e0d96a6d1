"""Webhook intake under load: `eventsync serve` as a subprocess (or several replicas on one
PostgreSQL database behind a local round-robin proxy), a fake BookStack in this process, and
separate load processes offering page_update webhooks at a fixed rate.

Reports accepted/s, latency of the 2xx (p50/p95/p99), errors, and whether every accepted
webhook is in the `events` table (durable): each request carries a mark of its own, and every
mark that got a 2xx must be in a stored body. Goal: >= 3,000/s durable, p99 <= 25 ms.

    .venv/bin/python tests/bench/intake.py [--rate 3000] [--seconds 10] [--workers 1]
        [--backend sqlite|postgres] [--database URL] [--replicas N] [--proxy]
    .venv/bin/python tests/bench/intake.py --profile   # in-process cProfile of the inbox
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import json
import multiprocessing as mp
import os
import pstats
import random
import re
import signal
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import backend

from eventsync.testing import FakeBookStack
from eventsync.testing.shapes import webhook_body
from eventsync.testing.state import ADMIN_USER_ID

SECRET = "bench-intake-secret-0123456789abcdef"
FAKE_RPM = 100_000  # the fake's own limit: serve's budget (--rpm) is what binds


# ---- the load process ----------------------------------------------------------------------------


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


# The load process must cost far less than the server it measures (both share this machine's
# two CPUs): requests are pre-encoded bytes on persistent HTTP/1.1 connections, and a response
# is read only as far as its status, its length and its small JSON body.
CONNECTIONS = 64
_PLACEHOLDER = "2000-01-01T00:00:00.000000Z"  # same length as every real triggered_at
# Where each request's own mark goes (in the body's `text`): load process and number, so that
# every accepted webhook can be looked for in the events table afterwards.
_MARK = "#mark-000000000000#"
_MARK_LENGTH = 12


def _requests(url: str, bodies: list[dict[str, Any]]) -> tuple[str, int, list[bytes]]:
    """host, port and one HTTP request per body, with a placeholder where triggered_at goes."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    encoded = []
    for body in bodies:
        data = json.dumps(
            {**body, "triggered_at": _PLACEHOLDER, "text": f"{body['text']} {_MARK}"}
        ).encode()
        head = (
            f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        encoded.append(head + data)
    return host, int(port), encoded


async def _offer(
    url: str, bodies: list[dict[str, Any]], rate: float, seconds: float, seed: int
) -> dict[str, Any]:
    """Open loop: request i is due at start + i/rate whatever the server does; latency is
    measured from the moment it was due, so a server that falls behind shows it (a request
    waiting for a free connection is waiting on the server)."""
    rng = random.Random(seed)
    host, port, encoded = _requests(url, bodies)
    placeholder = _PLACEHOLDER.encode()
    mark_placeholder = _MARK.encode()
    total = int(rate * seconds)
    counter = 0
    accepted_marks: list[str] = []
    cpu_started = time.process_time()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    errors: dict[str, int] = {}
    due_times: asyncio.Queue[float | None] = asyncio.Queue()

    async def connection() -> None:
        nonlocal counter
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (due := await due_times.get()) is not None:
                # A fresh change each time, not one older than our last read of the page.
                request = rng.choice(encoded).replace(placeholder, _now_iso().encode(), 1)
                counter += 1
                mark = f"{seed:02d}{counter:0{_MARK_LENGTH - 2}d}"
                request = request.replace(mark_placeholder, f"#mark-{mark}#".encode(), 1)
                try:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = head[9:12].decode()
                    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n")[0])
                    payload = await reader.readexactly(length)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                latencies.append(time.perf_counter() - due)
                statuses[status] = statuses.get(status, 0) + 1
                if status == "202":
                    accepted_marks.append(mark)
                    outcome = json.loads(payload).get("outcome", "?")
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(CONNECTIONS)]
    await asyncio.sleep(0.2)  # connections open before the clock starts
    start = time.perf_counter() + 0.05
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due_times.put_nowait(due)
    offered_for = time.perf_counter() - start
    for _ in workers:
        due_times.put_nowait(None)
    await asyncio.gather(*workers)
    finished = time.perf_counter() - start
    return {
        "latencies": latencies,
        "statuses": statuses,
        "outcomes": outcomes,
        "errors": errors,
        "offered": total,
        "offered_for": offered_for,
        "finished": finished,
        "marks": accepted_marks,
        "cpu": time.process_time() - cpu_started,
    }


def _load_worker(
    url: str,
    bodies: list[dict[str, Any]],
    rate: float,
    seconds: float,
    seed: int,
    go: Any,
    out: Any,
) -> None:
    go.wait()
    out.put(asyncio.run(_offer(url, bodies, rate, seconds, seed)))


# ---- helpers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def wait_synced(url: str, proc: asyncio.subprocess.Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise SystemExit(f"serve exited with {proc.returncode}")
            try:
                async with session.get(f"{url}/status") as r:
                    if r.status == 200 and (await r.json())["synced"]:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("serve did not finish its initial sync in time")


async def page_bodies(fake: FakeBookStack) -> list[dict[str, Any]]:
    """BookStack's page_update body for every page, built by the fake's own shape code."""
    webhook_id = fake.add_webhook("http://127.0.0.1:9/unused")
    webhook = fake.state.webhooks.pop(webhook_id)
    admin = fake.state.users[ADMIN_USER_ID]
    return [
        webhook_body(fake.state, "page_update", webhook, page, admin)
        for page in fake.state.pages.values()
        if not page.draft
    ]


# ---- the benchmark -------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="eventsync-intake-"))
    async with (
        backend.database(args, workdir, "intake") as db,
        FakeBookStack(requests_per_minute=FAKE_RPM) as fake,
    ):
        fake.seed(pages=args.pages, books=max(1, args.pages // 20), seed=1)
        bodies = await page_bodies(fake)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSYNC_")}
        env.pop("NOTIFY_SOCKET", None)
        env.update(
            EVENTSYNC_BOOKSTACK_URL=fake.url,
            EVENTSYNC_BOOKSTACK_TOKEN_ID=fake.token_id,
            EVENTSYNC_BOOKSTACK_TOKEN_SECRET=fake.token_secret,
            EVENTSYNC_WEBHOOK_SECRET=SECRET,
            **db.env(),
            EVENTSYNC_POLL_INTERVAL="5",
            EVENTSYNC_LOG_FORMAT="json",
            EVENTSYNC_LOG_LEVEL=args.log_level,
            EVENTSYNC_REQUESTS_PER_MINUTE=str(FAKE_RPM - 1),
        )
        # The initial sync at full speed (a separate command, as an operator would), so serve
        # starts with a sync point; serve itself then gets the budget under test.
        sync = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "eventsync",
            "reconcile",
            env=env,
            cwd=workdir,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if await sync.wait() != 0:
            raise SystemExit("the initial `eventsync reconcile` failed")
        env["EVENTSYNC_REQUESTS_PER_MINUTE"] = str(args.rpm)
        replicas: list[tuple[asyncio.subprocess.Process, str]] = []
        proxy: asyncio.subprocess.Process | None = None
        logs = [
            workdir / ("serve.log" if args.replicas == 1 else f"serve-{i + 1}.log")
            for i in range(args.replicas)
        ]
        try:
            for log_path in logs:
                port = free_port()
                with log_path.open("wb") as log_file:
                    serve = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "eventsync",
                        "serve",
                        env={**env, "EVENTSYNC_LISTEN": f"127.0.0.1:{port}"},
                        cwd=workdir,
                        stdout=log_file,
                        stderr=log_file,
                    )
                replicas.append((serve, f"http://127.0.0.1:{port}"))
            for serve, url in replicas:
                await wait_synced(url, serve)
            target = replicas[0][1]
            if args.replicas > 1 or args.proxy:
                proxy, target = await start_proxy([url for _, url in replicas], workdir)
            processes = {
                f"serve {i + 1}" if args.replicas > 1 else "serve": serve.pid
                for i, (serve, _) in enumerate(replicas)
            }
            if proxy is not None:
                processes["proxy"] = proxy.pid
            cpu_before = cpu_seconds(processes, db)
            fake.reset_requests()
            result = await offer_load(f"{target}/webhooks/bookstack/{SECRET}", bodies, args)
            cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_seconds(processes, db).items()}
            cpu["load processes"] = result["cpu"]
            async with aiohttp.ClientSession() as session:
                split = None
                if proxy is not None:
                    async with session.get(f"{target}/_proxy/stats") as r:
                        split = (await r.json())["upstreams"]
                async with session.get(f"{replicas[0][1]}/status") as r:
                    status = await r.json()
            # Durable: every 2xx is a row in the inbox, read through a connection of our own.
            stored = await asyncio.to_thread(stored_marks, db)
        finally:
            if proxy is not None:
                await stop_process(proxy)
            await asyncio.gather(*(stop_process(serve) for serve, _ in replicas))
        report(result, stored, status, fake, args, db, split, cpu, logs)


async def offer_load(
    url: str, bodies: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    out = ctx.Queue()
    per_worker = args.rate / args.workers
    procs = [
        ctx.Process(
            target=_load_worker,
            args=(url, bodies, per_worker, args.seconds, i, go, out),
            daemon=True,
        )
        for i in range(args.workers)
    ]
    for p in procs:
        p.start()
    await asyncio.sleep(1.0)  # let the workers import aiohttp before the clock starts
    go.set()
    loop = asyncio.get_running_loop()
    parts = [await loop.run_in_executor(None, out.get, True, args.seconds + 120) for _ in procs]
    for p in procs:
        await loop.run_in_executor(None, p.join, 10)
    merged: dict[str, Any] = {
        "latencies": [],
        "statuses": {},
        "outcomes": {},
        "errors": {},
        "marks": [],
        "offered": 0,
        "offered_for": 0.0,
        "finished": 0.0,
        "cpu": 0.0,
    }
    for part in parts:
        merged["latencies"] += part["latencies"]
        merged["marks"] += part["marks"]
        merged["offered"] += part["offered"]
        merged["cpu"] += part["cpu"]
        merged["offered_for"] = max(merged["offered_for"], part["offered_for"])
        merged["finished"] = max(merged["finished"], part["finished"])
        for key in ("statuses", "outcomes", "errors"):
            for k, v in part[key].items():
                merged[key][k] = merged[key].get(k, 0) + v
    return merged


async def start_proxy(
    upstreams: list[str], workdir: Path
) -> tuple[asyncio.subprocess.Process, str]:
    """The round-robin proxy (rrproxy.py) in a process of its own; its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (workdir / "proxy.log").open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).with_name("rrproxy.py")),
            "--listen",
            f"127.0.0.1:{port}",
            *(arg for upstream in upstreams for arg in ("--upstream", upstream)),
            cwd=workdir,
            stdout=log_file,
            stderr=log_file,
        )
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise SystemExit(f"the proxy exited with {proc.returncode}: {workdir}/proxy.log")
            try:
                async with session.get(f"{url}/_proxy/stats") as r:
                    if r.status == 200:
                        return proc, url
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("the proxy did not start in time")


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


_MARK_RE = re.compile(rf"#mark-(\d{{{_MARK_LENGTH}}})#")


def stored_marks(db: backend.Database) -> tuple[int, collections.Counter[str]]:
    """The webhook rows in the events table, and how often each request's mark is in one."""
    rows = db.rows("SELECT payload FROM events WHERE source = 'webhook'")
    marks: collections.Counter[str] = collections.Counter()
    for (payload,) in rows:
        found = _MARK_RE.search(payload or "")
        if found:
            marks[found.group(1)] += 1
    return len(rows), marks


_TICK = os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _server_pids(db: backend.Database) -> list[int]:
    """The PostgreSQL server's processes when it runs on this machine and we may see its data
    directory (the postmaster and its children); [] otherwise."""
    if not db.is_postgres:
        return []
    try:
        ((directory,),) = db.rows("SHOW data_directory")
        postmaster = int(Path(directory, "postmaster.pid").read_text().split()[0])
    except Exception:
        return []
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def cpu_seconds(processes: dict[str, int], db: backend.Database) -> dict[str, float]:
    """CPU seconds used so far by each named process, and by the PostgreSQL server as one."""
    used = {name: _process_cpu(pid) for name, pid in processes.items()}
    server = _server_pids(db)
    if server:
        used["postgres server"] = sum(_process_cpu(pid) for pid in server)
    return used


def report(
    result: dict[str, Any],
    stored: tuple[int, collections.Counter[str]],
    status: dict[str, Any],
    fake: FakeBookStack,
    args: argparse.Namespace,
    db: backend.Database,
    split: list[dict[str, Any]] | None,
    cpu: dict[str, float],
    logs: list[Path],
) -> None:
    lat = [x * 1000 for x in result["latencies"]]
    accepted = result["statuses"].get("202", 0)
    rows, marks = stored
    print(f"backend:   {db.description}")
    shape = "1 replica" if args.replicas == 1 else f"{args.replicas} replicas"
    via = "behind the round-robin proxy (tests/bench/rrproxy.py)" if split is not None else "direct"
    print(f"serve:     {shape}, {via}")
    print(
        f"offered:   {result['offered']} webhooks at {args.rate:.0f}/s for {args.seconds} s "
        f"({args.workers} load processes; {os.cpu_count()} CPUs on this machine)"
    )
    print(
        f"accepted:  {accepted}  = {accepted / result['finished']:.0f}/s over "
        f"{result['finished']:.2f} s until the last answer"
    )
    print(f"statuses:  {result['statuses']}   errors: {result['errors'] or 'none'}")
    print(f"outcomes:  {result['outcomes']}")
    print(
        f"latency:   p50 {percentile(lat, 50):.1f} ms   p95 {percentile(lat, 95):.1f} ms   "
        f"p99 {percentile(lat, 99):.1f} ms   max {max(lat, default=float('nan')):.1f} ms"
    )
    if split is not None:
        print(
            "upstreams: "
            + ";  ".join(
                f"{i + 1}: {u['requests']} requests {u['statuses']}"
                + (f" errors {u['errors']}" if u["errors"] else "")
                for i, u in enumerate(split)
            )
        )
    answered = collections.Counter(result["marks"])
    missing = sum(1 for mark in answered if mark not in marks)
    twice = sum(1 for n in marks.values() if n > 1)
    unanswered = sum(1 for mark in marks if mark not in answered)
    if missing:
        verdict = f"MISSING {missing} accepted webhooks"
    else:
        verdict = "OK: every accepted webhook is stored"
        if unanswered:
            # Committed after the client had given up waiting: kept, just never answered.
            verdict += f", and {unanswered} committed whose 2xx never reached their client"
    if twice:
        verdict += f"; {twice} stored more than once"
    print(
        f"durable:   {rows} webhook rows in the events table, {accepted} accepted; "
        f"by each request's mark: {verdict}"
    )
    print(
        f"queue:     depth {status['queue_depth']} after the load; "
        f"API requests during the load: {len(fake.requests)} (budget {args.rpm:.0f}/min"
        f"{' each' if args.replicas > 1 else ''})"
    )
    machine = result["finished"] * (os.cpu_count() or 1)
    print(
        "CPU:       "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cpu.items())
        + f" of {machine:.1f} CPU-seconds the machine had during the load"
    )
    goal_rate = accepted / result["finished"] >= 3000 * 0.98 and not missing
    goal_p99 = percentile(lat, 99) <= 25
    print(
        f"goal:      >= 3000/s durable: {'met' if goal_rate else 'NOT met'};  "
        f"p99 <= 25 ms: {'met' if goal_p99 else 'NOT met'}"
    )
    print(f"serve log: {', '.join(str(p) for p in logs)}")


# ---- in-process profile of the inbox ------------------------------------------------------------


async def profile_inbox(args: argparse.Namespace) -> None:
    """The path of one accepted webhook without HTTP: parse, Inbox.submit, group commit
    (JobQueue.record per event). Where does the time go?"""
    from eventsync.app import open_store
    from eventsync.events import from_webhook
    from eventsync.ingest.inbox import Inbox
    from eventsync.logging import configure_logging
    from eventsync.store.postgres import driver
    from eventsync.store.queue import JobQueue

    events, pages = args.profile_events, args.pages
    configure_logging("json", "warning")
    async with FakeBookStack() as fake:
        fake.seed(pages=pages, books=max(1, pages // 20), seed=1)
        bodies = await page_bodies(fake)
    workdir = Path(tempfile.mkdtemp(prefix="eventsync-intake-profile-"))
    async with (
        backend.database(args, workdir, "profile") as db,
        await open_store(db.url, db.schema) as store,
    ):
        print(f"backend: {db.description}")
        queue = JobQueue(store)
        inbox = Inbox(queue)
        inbox.start()
        rng = random.Random(1)

        async def one() -> None:
            body = dict(rng.choice(bodies))
            body["triggered_at"] = _now_iso()
            await inbox.submit(from_webhook(json.loads(json.dumps(body))))

        # Without the profiler first: the rate, and how many trips to the database thread
        # an event costs (aiosqlite: each statement, fetch and cursor close is one; the
        # PostgreSQL driver: each function handed to its thread, many statements or one).
        trips = 0
        owner: Any = driver.Connection if db.is_postgres else aiosqlite.Connection
        name = "run" if db.is_postgres else "_execute"
        real = getattr(owner, name)

        async def counted(self: Any, fn: Any, *a: Any, **k: Any) -> Any:
            nonlocal trips
            trips += 1
            return await real(self, fn, *a, **k)

        setattr(owner, name, counted)
        started = time.perf_counter()
        # 100 concurrent submitters, as 100 connections would be.
        for _ in range(events // 100):
            await asyncio.gather(*(one() for _ in range(100)))
        took = time.perf_counter() - started
        setattr(owner, name, real)
        round_trip = time.perf_counter()
        for _ in range(2000):
            await store.fetchone("SELECT 1")
        # aiosqlite: execute, fetch, close; the driver: one function for all three.
        hops = 1 if db.is_postgres else 3
        round_trip = (time.perf_counter() - round_trip) / 2000 / hops
        print(
            f"in-process inbox: {events} events in {took:.2f} s = {events / took:.0f}/s; "
            f"{trips / events:.3f} database-thread round trips per event; one round trip "
            f"alone costs {round_trip * 1e6:.0f} us, i.e. {trips / events * round_trip * 1e3:.3f} "
            f"ms of the {took / events * 1e3:.2f} ms per event"
        )
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(events // 100):
            await asyncio.gather(*(one() for _ in range(100)))
        profiler.disable()
        await inbox.close()
    print("cProfile (a coroutine's ncalls counts its resumptions):")
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(25)
    print(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=3000.0, help="webhooks per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to offer load")
    parser.add_argument("--workers", type=int, default=1, help="load processes")
    parser.add_argument("--pages", type=int, default=200, help="pages in the fake wiki")
    parser.add_argument("--log-level", default="info", help="serve's EVENTSYNC_LOG_LEVEL")
    parser.add_argument(
        "--rpm",
        type=float,
        default=150,
        help="serve's API budget per minute (default 150, as in production; the initial sync "
        "runs unthrottled before serve starts)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="`eventsync serve` processes on the one database (more than 1 needs --backend "
        "postgres); more than 1 are behind the round-robin proxy",
    )
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="send the load through the round-robin proxy even to one replica",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the inbox in-process")
    parser.add_argument("--profile-events", type=int, default=20_000)
    backend.add_arguments(parser)
    args = parser.parse_args()
    backend.check_arguments(parser, args)
    if args.rate * args.seconds > 200_000:
        parser.error("keep it bounded: rate x seconds <= 200,000")
    if not 1 <= args.workers <= 99:
        parser.error("--workers must be between 1 and 99")
    if not 1 <= args.replicas <= 16:
        parser.error("--replicas must be between 1 and 16")
    if args.replicas > 1 and args.backend != "postgres":
        parser.error("--replicas above 1 needs --backend postgres (SQLite is one process's)")
    if args.profile:
        asyncio.run(profile_inbox(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
