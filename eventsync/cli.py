"""The `eventsync` command: builds every object from settings and runs one command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from eventsync import __version__
from eventsync.answers import (
    AccessUnavailable,
    BadRequest,
    UnknownItem,
    can_see,
    content_type_of,
    ensure_answerable,
    who_can_see,
)
from eventsync.app import make_client, open_app, open_local, open_serve, open_store
from eventsync.apply import SyncSummary
from eventsync.config import Settings, load_settings
from eventsync.errors import (
    AuthError,
    BookStackError,
    ConfigError,
    EventsyncError,
    ForbiddenError,
    NotFound,
    Unavailable,
    UnknownRoute,
)
from eventsync.logging import configure_logging, get_logger, redact
from eventsync.store.base import KINDS, Store, StoreError, is_postgres_url
from eventsync.store.serve_lock import ServeLock, serving

EXIT_OK = 0
EXIT_INCONSISTENT = 1
EXIT_USAGE = 2

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]
# SQLite's INTEGER: a seq or id beyond it is no row, and SQLite would raise on it.
MAX_INTEGER = 2**63 - 1

log = get_logger("eventsync.cli")


def _secrets(settings: Settings) -> list[str]:
    out = []
    for value in (settings.bookstack_token_secret, settings.webhook_secret, settings.read_token):
        if value is not None:
            out.append(value.get_secret_value())
    return out


# ---- reconcile -------------------------------------------------------------------------------


class _ProgressBar:
    """A tqdm bar on a terminal; nothing otherwise (the log has the figures)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def plan(self, more: int) -> None:
        """`more` reads were planned: the sync plans as its listings arrive."""
        if not self.enabled or not more:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=more, unit="req", desc="syncing", file=sys.stderr)
        else:
            self.bar.total += more
            self.bar.refresh()

    def step(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(summary: SyncSummary) -> str:
    lines = [f"{'':12}{'created':>9}{'updated':>9}{'deleted':>9}{'unchanged':>11}"]
    for kind, t in summary.kinds.items():
        lines.append(f"{kind:12}{t.created:>9}{t.updated:>9}{t.deleted:>9}{t.unchanged:>11}")
    p = summary.permissions
    lines.append(f"{'permissions':12}{'':>9}{p.updated:>9}{'':>9}{p.unchanged:>11}")
    lines.append(f"memberships changed: {summary.memberships_changed}")
    lines.append(f"API requests: {summary.requests}   time: {summary.seconds:.1f} s")
    if summary.complete:
        lines.append("mirror is consistent with BookStack")
    else:
        lines.append(f"mirror is NOT consistent: {len(summary.problems)} problem(s):")
        lines.extend(f"  - {p}" for p in summary.problems[:20])
        if len(summary.problems) > 20:
            lines.append(f"  … and {len(summary.problems) - 20} more (see the log)")
    return "\n".join(lines)


async def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """After an outage: drain the audit log from the cursor, process every pending job, then
    diff the listings against the mirror (what emits no event: attachments, link rewrites,
    cascades). A gap, no sync point, a long downtime or --full make it a thorough diff that
    also re-reads every item's permissions. Exit 0 only when the mirror is consistent."""
    from eventsync.events import DIFF_KEY
    from eventsync.ingest.auditlog import GAP, LAST_POLL, AuditPoller
    from eventsync.reconcile import AUDIT_CURSOR, LAST_FULL_SYNC

    started = time.monotonic()
    bar = _ProgressBar(sys.stderr.isatty() and not args.json)
    async with open_app(settings, on_plan=bar.plan, on_progress=bar.step) as app:
        client, store, queue = app.client, app.store, app.queue
        reconciler, handlers, dispatcher = app.reconciler, app.handlers, app.dispatcher
        await queue.recover()
        requests_before = client.stats.requests
        reasons = []
        if args.full:
            reasons.append("--full")
        if await store.get_state(LAST_FULL_SYNC) is None:
            reasons.append("no sync point")
        last_poll = await store.get_state(LAST_POLL)
        if last_poll is not None and time.time() - float(last_poll) > settings.max_downtime:
            down = time.time() - float(last_poll)
            reasons.append(f"down for {down:.0f} s, longer than EVENTSYNC_MAX_DOWNTIME")
        poller = AuditPoller(client, queue)
        if await store.get_state(AUDIT_CURSOR) is not None and not reasons:
            # Drain the audit log first: it may also reveal a gap (a cleared log).
            try:
                await poller.poll_once()
            except ForbiddenError:
                reasons.append("the token cannot read the audit log")
            except UnknownRoute:
                reasons.append("this BookStack has no audit-log API (before v23.08)")
        gap = await store.get_state(GAP)
        if gap:
            reasons.append(f"gap: {gap}")
        drained = True
        try:
            if reasons:
                print(f"diff sync of everything ({'; '.join(reasons)})", file=sys.stderr)
                sync_started = time.time()
                # Events may be lost (or skipped, as the cursor moves to the log's head), and
                # a listing diff cannot see what they said about content permissions or role
                # membership: this sync re-reads those for every item.
                summary = await reconciler.full_sync(all_permissions=True, set_cursor=True)
                if summary.complete:
                    async with store.transaction() as tx:
                        await tx.delete_state(GAP)
                    with contextlib.suppress(ForbiddenError, UnknownRoute):
                        await poller.poll_once()  # what happened while it ran
            else:
                # The events first (their jobs read what they name), then the listings for
                # what no event reports; what the jobs just read shows up unchanged there.
                drained = await dispatcher.drain(timeout=args.timeout)
                sync_started = time.time()
                summary = await reconciler.full_sync(all_permissions=False, set_cursor=False)
            if summary.complete:
                await queue.cancel(DIFF_KEY, queued_before=sync_started)  # this sync was it
            drained = await dispatcher.drain(timeout=args.timeout) and drained
        finally:
            bar.close()
        dead = len(await queue.dead_letters())
        requests = client.stats.requests - requests_before
    summary.absorb(handlers.summary)
    summary.requests = requests
    summary.seconds = time.monotonic() - started
    if not drained:
        summary.problems.append("pending jobs did not finish in time (see `eventsync status`)")
    if dead:
        summary.problems.append(f"{dead} dead letter(s): see `eventsync dead-letters list`")
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(format_summary(summary))
    return EXIT_OK if summary.complete else EXIT_INCONSISTENT


# ---- export / status ---------------------------------------------------------------------------


def _must_exist(settings: Settings) -> None:
    # A PostgreSQL mirror is created by whoever connects first; only a file can be missing.
    if not is_postgres_url(settings.database) and not Path(settings.database).exists():
        raise ConfigError(
            f"database {settings.database} does not exist yet: run `eventsync reconcile` first "
            "(or set EVENTSYNC_DATABASE)"
        )


async def _open_existing(settings: Settings) -> Store:
    _must_exist(settings)
    return await open_store(settings.database, settings.database_schema)


async def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    async with await _open_existing(settings) as store:
        if args.as_user is None:
            doc = await store.export()
        else:
            await ensure_answerable(store)
            if await store.get("user", args.as_user) is None:
                raise UnknownItem(f"no user {args.as_user} in the mirror")
            doc = await store.export_as_user(args.as_user)
    json.dump(doc, sys.stdout, ensure_ascii=False, indent=args.indent)
    sys.stdout.write("\n")
    return EXIT_OK


async def cmd_who_can_see(settings: Settings, args: argparse.Namespace) -> int:
    async with await _open_existing(settings) as store:
        lines = await who_can_see(store, args.kind, args.id)
    print("\n".join(lines))
    return EXIT_OK


async def cmd_can_see(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when the user can see the item, 1 when not (as grep does), 2 on an error."""
    async with await _open_existing(settings) as store:
        visible, line = await can_see(store, args.user, args.kind, args.id)
    print(line)
    return EXIT_OK if visible else EXIT_INCONSISTENT


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from eventsync.service import status_data

    _must_exist(settings)
    async with open_local(settings) as local:
        data = await status_data(local.store, local.queue)
    if is_postgres_url(settings.database):
        # Who leads the replicas, from the row the leader keeps.
        from eventsync.store.postgres.coordination import connect, read_leader

        conn = await connect(settings.database, settings.database_schema, "status")
        async with conn:
            data["leader"] = await read_leader(conn)
    else:
        # Who runs the leader's loops: the one serve on a SQLite file (the OS holds its lock).
        holder = serving(Path(settings.database))
        data["leader"] = (
            None
            if holder is None
            else {
                "replica": holder.replica,
                "since": holder.since,
                "alive": True,
                "heartbeat_age": None,
            }
        )
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"database:        {data['database']}")
    if data["token_rejected"]:
        since, _, why = data["token_rejected"].partition(" ")
        print(
            f"API token:       REJECTED by BookStack since {since} (revoked, rotated or "
            f"expired?): {why}; serve holds its requests and resumes once the token works"
        )
    print(f"leader:          {_leader_line(data['leader'])}")
    print(f"audit cursor:    {data['audit_cursor']}")
    access = {
        "readable": "yes",
        "no access": "NO (the token lacks audit-log access): running on webhooks and diff syncs",
        "no audit-log API": (
            "NO: this BookStack has no audit-log API (it came in v23.08): running on "
            "webhooks and periodic diff syncs"
        ),
        None: "unknown",
    }
    print(f"audit access:    {access[data['audit_log']]}")
    print(f"last full sync:  {data['last_full_sync_at'] or 'never'}")
    if data["last_full_sync_requests"] is not None:
        print(
            f"                 {data['last_full_sync_requests']} requests, "
            f"{data['last_full_sync_seconds']} s"
        )
    print(f"change feed seq: {data['last_change_seq']}")
    print(f"queue depth:     {data['queue_depth']}   dead letters: {data['dead_letters']}")
    sweep = data["sweep"]
    if sweep["progress"] is not None or sweep["last_cycle_seconds"] is not None:
        progress = f"{100 * (sweep['progress'] or 0):.1f} %"
        cycle = sweep["last_cycle_seconds"]
        print(
            f"sweep:           {progress} of this cycle; last full cycle "
            f"{'not finished yet' if cycle is None else f'{cycle:.0f} s'}"
        )
    if data["audit_gap"]:
        print(f"gap detected:    {data['audit_gap']} (run `eventsync reconcile`)")
    elif data.get("last_gap"):
        print(f"last gap:        {data['last_gap']} (closed by a thorough diff sync)")
    if data["access_unavailable"]:
        print(f"effective access: unavailable: {data['access_unavailable']}")
    else:
        print("effective access: answered (who-can-see, can-see, export --as-user, /access)")
    counts = data["counts"]
    plural = {"shelf": "shelves", "permissions": "content permissions"}
    print(
        "mirror:          "
        + ", ".join(f"{counts[k]} {plural.get(k, k + 's')}" for k in (*KINDS, "permissions"))
    )
    for i, s in enumerate(data.get("subscriptions", [])):
        line = f"{s['id']}: {s['state']}, {s['behind']} behind (cursor {s['cursor']})"
        if s["last_error"]:
            line += f"; last error: {s['last_error']}"
        print(f"{'subscriptions:' if i == 0 else '':17}{line}")
    return EXIT_OK


def _leader_line(leader: dict[str, Any] | None) -> str:
    if leader is None:
        return "none (no serve running)"
    if leader["alive"]:
        return f"{leader['replica']} since {leader['since']}"
    return f"none right now (last: {leader['replica']}, {leader['heartbeat_age']:.0f} s ago)"


# ---- check ---------------------------------------------------------------------------------------


async def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    """Each prerequisite of a working sync, with what to fix when it fails."""
    failures = 0

    def report(ok: bool, what: str, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {what}{': ' + detail if detail else ''}")

    async with make_client(settings, max_attempts=2, backoff_cap=1.0, timeout=10.0) as client:
        try:
            await client.get("/api/books", {"count": 1})
        except Unavailable as exc:
            report(
                False,
                f"reach BookStack at {settings.base_url}",
                f"{exc} — check EVENTSYNC_BOOKSTACK_URL and that BookStack is up",
            )
            return EXIT_INCONSISTENT
        except AuthError as exc:
            report(True, f"reach BookStack at {settings.base_url}")
            if exc.status == 403 and "expired" in str(exc):
                fix = "the token has expired: give it a later expiry date, or create a new one"
            elif exc.status == 403:
                fix = "give the token's user a role with 'Access system API'"
            else:
                fix = (
                    "check EVENTSYNC_BOOKSTACK_TOKEN_ID and _TOKEN_SECRET (the token may have "
                    "been revoked or rotated)"
                )
            report(False, "API token accepted", f"{exc} — {fix}")
            return EXIT_INCONSISTENT
        except ForbiddenError as exc:
            report(True, f"reach BookStack at {settings.base_url}")
            report(
                False,
                "API access",
                f"{exc} — give the token's user a role with 'Access system API'",
            )
            return EXIT_INCONSISTENT
        except (NotFound, UnknownRoute):
            report(
                False,
                f"reach BookStack at {settings.base_url}",
                "no BookStack API there (404) — EVENTSYNC_BOOKSTACK_URL should be the "
                "wiki's base URL, without /api",
            )
            return EXIT_INCONSISTENT
        except BookStackError as exc:
            report(False, f"reach BookStack at {settings.base_url}", str(exc))
            return EXIT_INCONSISTENT
        report(True, f"reach BookStack at {settings.base_url}")
        report(True, "API token accepted, API access allowed")
        probes = [
            (
                "/api/audit-log",
                "audit-log access",
                "the token's role needs 'Manage app settings' and 'Manage users'; without it "
                "eventsync relies on webhooks and periodic diff syncs only",
            ),
            ("/api/users", "user listing", "the token's role needs 'Manage users'"),
            ("/api/roles", "role listing", "the token's role needs 'Manage roles & permissions'"),
            ("/api/pages", "page listing", ""),
        ]
        for path, what, fix in probes:
            try:
                await client.get(path, {"count": 1})
                report(True, what)
            except ForbiddenError as exc:
                report(False, what, f"{exc} — {fix}" if fix else str(exc))
            except UnknownRoute:
                if path != "/api/audit-log":
                    report(False, what, f"BookStack has no {path} here (an HTML 404)")
                    continue
                # Supported (DESIGN 14), so a warning rather than a failure: eventsync works,
                # with fewer guarantees, and only an upgrade changes it.
                print(
                    f"warn  {what}: this BookStack has no audit-log API (/api/audit-log "
                    "answers an HTML 404; the audit log came in BookStack v23.08) — eventsync "
                    "runs on webhooks and periodic diff syncs only, and cannot confirm "
                    "webhooks against the log; upgrade BookStack to v23.08 or later for it"
                )
            except BookStackError as exc:
                report(False, what, str(exc))
    return EXIT_OK if failures == 0 else EXIT_INCONSISTENT


# ---- serve / changes / dead letters ------------------------------------------------------------


async def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from eventsync.server import check_exposure, check_listen
    from eventsync.service import Service

    if args.demo_if_unconfigured and settings.bookstack_url is None:
        print(
            "eventsync: no BookStack configured (EVENTSYNC_BOOKSTACK_URL is unset): running "
            "`eventsync demo` against the bundled fake BookStack instead",
            file=sys.stderr,
        )
        return await cmd_demo(settings, args)
    settings.require("webhook_secret")
    # One serve per SQLite file, and said first: a second serve with the same settings would
    # otherwise be told that its port is in use, which names the wrong problem. On PostgreSQL
    # any number of replicas may serve one mirror.
    replicas = is_postgres_url(settings.database)
    lock = contextlib.nullcontext(None) if replicas else ServeLock(Path(settings.database))
    with lock as held:
        # Before any start-up work: a port in use or a host that does not resolve is a
        # setting to fix, not something to find after the database is open and the sync
        # has begun.
        check_exposure(settings.listen_host, settings.read_token)
        check_listen(settings.listen_host, settings.listen_port)
        holder = None if held is None else held.holder
        async with open_serve(settings, holder) as (app, leadership):
            return await Service(app, leadership=leadership).run_until_stopped()


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from eventsync.demo import run_demo

    return await run_demo(getattr(args, "database", None))


async def cmd_changes(settings: Settings, args: argparse.Namespace) -> int:
    """The change feed as NDJSON; --follow keeps tailing it."""
    after = args.after
    async with await _open_existing(settings) as store:
        grown: asyncio.Event | None = None
        if args.follow and store.announces:
            # PostgreSQL announces every commit to the feed: wait for that, not the interval.
            grown = asyncio.Event()
            store.on_feed_commit.append(grown.set)
            await store.listen()
        while True:
            if grown is not None:
                grown.clear()  # before the read: a commit after it sets it again
            rows = await store.changes(after, 1000)
            for row in rows:
                sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            if rows:
                after = rows[-1]["seq"]
                continue
            if not args.follow:
                return EXIT_OK
            if grown is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(grown.wait(), timeout=max(args.interval, 30.0))
            else:
                await asyncio.sleep(args.interval)


# ---- subscriptions (outbound webhooks) ---------------------------------------------------------


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_subscriptions(subs: list[dict[str, Any]]) -> None:
    if not subs:
        print("no subscriptions")
        return
    print(f"{'id':>4}  {'state':<17}{'cursor':>9}{'behind':>9}{'delivered':>11}  kinds / url")
    for s in subs:
        kinds = ",".join(s["kinds"]) if s["kinds"] else "all"
        print(
            f"{s['id']:>4}  {s['state']:<17}{s['cursor']:>9}{s['behind']:>9}"
            f"{s['delivered']:>11}  {kinds} {s['url']}"
        )
        if s["last_error"]:
            since = f", failing since {_when(s['failing_since'])}" if s["failing_since"] else ""
            print(f"      last error: {s['last_error']} ({s['attempts']} attempt(s){since})")


async def cmd_subscriptions(settings: Settings, args: argparse.Namespace) -> int:
    """Outbound webhooks: each subscription gets every change-feed row (of its kinds), signed
    (Standard Webhooks), from its own cursor; `serve` delivers them."""
    from eventsync.delivery import (
        check_destination,
        check_url,
        new_secret,
        parse_kinds,
        parse_secret,
        shown_url,
        subscription_status,
    )
    from eventsync.errors import AddressRefused, UsageError
    from eventsync.store.subscriptions import Subscriptions

    action = args.action
    if action == "add":
        # Everything about the input first: a refusal changes nothing.
        url = args.url.strip()
        parsed = check_url(url)
        kinds = parse_kinds(args.kinds)
        secret = parse_secret(args.secret) if args.secret is not None else None
        try:
            await check_destination(parsed, settings.subscriptions_allow_private)
        except AddressRefused as exc:
            raise UsageError(str(exc)) from None
    # A subscription may come before the first sync (it then gets the whole of it): add
    # creates the database; the other actions need one.
    opened = (
        open_store(settings.database, settings.database_schema)
        if action == "add"
        else _open_existing(settings)
    )
    async with await opened as store:
        subs = Subscriptions(store)
        head = await store.last_seq()
        if getattr(args, "from_seq", None) is not None and args.from_seq > head + 1:
            raise UsageError(f"--from {args.from_seq} is past the change feed's head ({head})")
        if action == "list":
            listed = await subscription_status(store)
            if args.json:
                print(json.dumps(listed, indent=2))
            else:
                print_subscriptions(listed)
            return EXIT_OK
        if action == "add":
            # --from SEQ: SEQ is the first change delivered. Without it, the first change
            # after this moment.
            cursor = head if args.from_seq is None else max(0, args.from_seq - 1)
            added = await subs.add(url, kinds, secret or new_secret(), cursor)
            what = ",".join(kinds) if kinds else "every change"
            print(
                f"subscription {added.id}: {shown_url(url)} ({what}), from seq {cursor + 1}, "
                f"in {settings.database}"
            )
            if secret is None:
                # The only time it is shown: nothing prints or logs it again.
                print(f"secret: {added.secret}")
                print("(shown only now: give it to the receiver, which verifies the signatures)")
            else:
                print("secret: the one given with --secret")
            print("`eventsync serve` delivers it (within a second when it is running)")
            return EXIT_OK
        sub_id = args.id
        if action == "remove":
            done = await subs.remove(sub_id)
            message = f"subscription {sub_id} removed"
        elif action == "pause":
            done = await subs.pause(sub_id)
            message = f"subscription {sub_id} paused; `resume` carries on from where it stopped"
        elif action == "resume":
            done = await subs.resume(sub_id)
            message = f"subscription {sub_id} resumed"
        else:  # replay
            cursor = max(0, args.from_seq - 1)
            done = await subs.replay(sub_id, cursor)
            message = (
                f"subscription {sub_id}: delivering again from seq {cursor + 1}, "
                "with new webhook-ids"
            )
            current = await subs.get(sub_id)
            if current is not None and current.paused:
                message += f" (it is paused: `eventsync subscriptions resume {sub_id}`)"
        if not done:
            raise UsageError(f"no subscription with id {sub_id}")
        print(message)
        return EXIT_OK


def _add_subscriptions_parser(sub: Any) -> None:
    p = sub.add_parser(
        "subscriptions", help="outbound webhooks: add, list, remove, pause, resume, replay"
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    seq = _whole_number(0, MAX_INTEGER)
    a = actions.add_parser("add", help="deliver the change feed to URL (signed, retried)")
    a.add_argument("url", metavar="URL", help="http(s) URL of the receiver")
    a.add_argument(
        "--kinds", help="only these feed entities, comma-separated (page,book,…); default all"
    )
    a.add_argument(
        "--secret",
        help="signing secret, whsec_ and base64 (Standard Webhooks); default: a new one, "
        "printed once",
    )
    a.add_argument(
        "--from",
        dest="from_seq",
        type=seq,
        default=None,
        metavar="SEQ",
        help="first change to deliver (default: the first one after now)",
    )
    a = actions.add_parser("list", help="every subscription with its cursor and state")
    a.add_argument("--json", action="store_true")
    for name, what in (
        ("remove", "delete a subscription"),
        ("pause", "stop delivering (the cursor stays)"),
        ("resume", "deliver again from where it stopped, at once"),
    ):
        a = actions.add_parser(name, help=what)
        a.add_argument("id", metavar="ID", type=_whole_number(1, MAX_INTEGER))
    a = actions.add_parser("replay", help="deliver again from a seq, with new webhook-ids")
    a.add_argument("id", metavar="ID", type=_whole_number(1, MAX_INTEGER))
    a.add_argument("--from", dest="from_seq", type=seq, required=True, metavar="SEQ")
    p.set_defaults(func=cmd_subscriptions)


async def cmd_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    _must_exist(settings)
    async with open_local(settings) as local:
        queue = local.queue
        if args.action == "retry":
            if args.id is None and not args.all:
                raise ConfigError("dead-letters retry needs an ID or --all")
            moved = await queue.retry_dead(None if args.all else args.id)
            if args.id is not None and not moved:
                raise ConfigError(f"no dead letter with id {args.id}")
            print(
                f"{moved} dead letter(s) queued again; `eventsync serve` or "
                "`eventsync reconcile` will process them"
            )
            return EXIT_OK
        letters = await queue.dead_letters()
        if args.json:
            print(json.dumps(letters, indent=2))
        elif not letters:
            print("no dead letters")
        for d in letters if not args.json else ():
            print(f"{d['id']:>5}  {d['key']:<20} attempts={d['attempts']}  {d['failed_at']}")
            print(f"       {d['error']}")
    return EXIT_OK


# ---- entry point ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other eventsync error; --help has the usage.
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not between {low} and {high}")
        return value

    return parse


def _kind(text: str) -> str:
    try:
        return content_type_of(text)
    except BadRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="eventsync",
        description="Keep a local mirror of a BookStack wiki in sync.",
    )
    parser.add_argument("--version", action="version", version=f"eventsync {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file (keys as in DESIGN.md)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="webhook receiver, audit poller, workers, reconciler")
    p.add_argument(
        "--demo-if-unconfigured",
        action="store_true",
        help="run `eventsync demo` when no BookStack is configured",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="see it work: a fake BookStack, serve, and live edits")
    p.add_argument(
        "--database",
        type=Path,
        default=None,
        help="keep the demo mirror in this file (default: a temporary one)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "reconcile", help="after an outage: catch up from the audit log, diff-sync gaps"
    )
    p.add_argument("--full", action="store_true", help="diff-sync everything")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=1800.0,
        help="give up on pending jobs after this many seconds (default 1800)",
    )
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("changes", help="the change feed as NDJSON")
    p.add_argument(
        "--after", type=_whole_number(0, MAX_INTEGER), default=0, help="start after this seq"
    )
    p.add_argument("--follow", action="store_true", help="keep printing new changes")
    p.add_argument("--interval", type=_seconds, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_changes)

    _add_subscriptions_parser(sub)

    p = sub.add_parser("dead-letters", help="list or retry jobs that kept failing")
    p.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    p.add_argument(
        "id", nargs="?", type=_whole_number(1, MAX_INTEGER), help="the dead letter to retry"
    )
    p.add_argument("--all", action="store_true", help="retry every dead letter")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dead_letters)

    p = sub.add_parser("export", help="the whole mirror as one canonical JSON document")
    p.add_argument(
        "--indent", type=_whole_number(0, 16), default=None, help="pretty-print with this indent"
    )
    p.add_argument(
        "--as-user",
        type=_whole_number(1, MAX_INTEGER),
        default=None,
        metavar="ID",
        help="only the content sections, as this BookStack user sees them",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("who-can-see", help="the users who can view an item, and why")
    p.add_argument("kind", type=_kind, metavar="KIND", help="shelf, book, chapter or page")
    p.add_argument("id", type=_whole_number(1, MAX_INTEGER), metavar="ID")
    p.set_defaults(func=cmd_who_can_see)

    p = sub.add_parser("can-see", help="can this user view the item? one line with the reason")
    p.add_argument("user", type=_whole_number(1, MAX_INTEGER), metavar="USER")
    p.add_argument("kind", type=_kind, metavar="KIND", help="shelf, book, chapter or page")
    p.add_argument("id", type=_whole_number(1, MAX_INTEGER), metavar="ID")
    p.set_defaults(func=cmd_can_see)

    p = sub.add_parser("status", help="cursor, last sync, counts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check", help="verify URL, token, API and audit-log access")
    p.set_defaults(func=cmd_check)
    return parser


def _fail(message: str, code: int) -> int:
    # Errors can quote what came back from BookStack or the OS: redacted like the log.
    print(f"eventsync: {redact(message)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    configure_logging(settings.log_format, settings.log_level, secrets=_secrets(settings))
    func: Command = args.func
    try:
        return asyncio.run(func(settings, args))
    except (ConfigError, StoreError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (AccessUnavailable, BadRequest) as exc:
        # The mirror cannot answer that (a sync token that does not see everything), or the
        # question is malformed: both to fix before asking again.
        return _fail(str(exc), EXIT_USAGE)
    except AuthError as exc:
        return _fail(
            f"BookStack rejected the API token: {exc} "
            "(check EVENTSYNC_BOOKSTACK_TOKEN_ID / EVENTSYNC_BOOKSTACK_TOKEN_SECRET)",
            EXIT_USAGE,
        )
    except EventsyncError as exc:
        return _fail(str(exc), EXIT_INCONSISTENT)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # A file the OS refuses (a setting or argument named it): no traceback either.
        if exc.filename:
            return _fail(f"{exc.filename}: {exc.strerror or exc}", EXIT_USAGE)
        return _fail(f"{exc.strerror or exc}", EXIT_INCONSISTENT)
    except Exception as exc:
        # None of ours: a bug. One line here; the traceback goes to the log at debug level.
        log.debug("unexpected error", exc_info=True)
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}", EXIT_INCONSISTENT)
