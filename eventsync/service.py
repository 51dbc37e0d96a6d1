"""`eventsync serve`: receiver, poller, dispatcher and periodic reconciler in one process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from eventsync.aio import wait_any
from eventsync.app import App
from eventsync.delivery import Delivery, subscription_status
from eventsync.dispatch import backoff
from eventsync.errors import AuthError, ConfigError
from eventsync.events import DIFF_KEY, FETCH, IGNORED, PERMISSIONS, ROUTES, THOROUGH, Event
from eventsync.feed import FeedWatch
from eventsync.ingest.auditlog import LAST_POLL, AuditPoller
from eventsync.ingest.inbox import Inbox
from eventsync.ingest.probe import Probe
from eventsync.ingest.webhook import WebhookReceiver
from eventsync.leadership import AlwaysLeader, Leadership, LeaderTasks
from eventsync.logging import get_logger
from eventsync.metrics import Metrics
from eventsync.notify import Notifier, watchdog_loop
from eventsync.reconcile import (
    AUDIT_ABSENT,
    AUDIT_ACCESS,
    AUDIT_CURSOR,
    AUDIT_FORBIDDEN,
    AUDIT_OVERLAP,
    AUDIT_READABLE,
    LAST_FULL_SYNC,
    LAST_GAP,
    LAST_VERIFIED,
    NO_AUDIT_LOG,
    record_gap,
)
from eventsync.server import RUNNER_OPTIONS, build_app, check_exposure
from eventsync.store.base import CONTENT_TYPES, KINDS, Job, JobQueue, Store

log = get_logger("eventsync.service")

SWEEP_POSITION = "sweep_position"
SWEEP_PROGRESS = "sweep_progress"
SWEEP_STARTED = "sweep_cycle_started_at"
SWEEP_CYCLE = "sweep_last_cycle_seconds"
_SWEEP_ORDER = {"role": 0, "shelf": 1, "book": 2, "chapter": 3, "page": 4}


def _sweep_key(item: tuple[str, list[str]]) -> str:
    """A sortable position: kind order, then zero-padded id."""
    kind, _, raw = item[0].partition(":")
    return f"{_SWEEP_ORDER[kind]}:{int(raw):012d}"


EVENT_RETENTION = 86400.0  # events are kept a day, for pairing and inspection
LONG_LIVED = frozenset(
    {
        "leader",  # runs the poller, the periodic reconcile and housekeeping while leading
        "audit poller",
        "dispatcher",
        "periodic reconcile",
        "housekeeping",
        "token watch",
        "feed watch",
        "delivery",
    }
)
READY_API_AGE = 300.0  # /readyz: BookStack answered within this many seconds
# "<since, ISO> <BookStack's refusal>" while BookStack rejects the API token, for `status`
# (another process) and /readyz; gone once it works again.
TOKEN_REJECTED = "token_rejected"
AUDIT_LOG_STATES = {
    AUDIT_READABLE: "readable",
    AUDIT_FORBIDDEN: "no access",  # a 403: the token's role lacks the permissions
    AUDIT_ABSENT: "no audit-log API",  # an HTML 404: BookStack before v23.08
}


async def status_data(store: Store, queue: JobQueue) -> dict[str, Any]:
    states = await store.states()

    def num(key: str, cast: type = int) -> Any:
        return cast(states[key]) if key in states else None

    access = states.get(AUDIT_ACCESS)
    return {
        "database": store.location,
        "token_rejected": states.get(TOKEN_REJECTED),
        "audit_cursor": num(AUDIT_CURSOR),
        "audit_access": (access == AUDIT_READABLE) if access is not None else None,
        # Why there is no audit log to read, when there is none: the fixes differ.
        "audit_log": AUDIT_LOG_STATES.get(access) if access is not None else None,
        "audit_last_poll_at": num(LAST_POLL, float),
        "audit_gap": states.get("audit_gap"),
        "last_gap": states.get(LAST_GAP),
        "last_full_sync_at": states.get(LAST_FULL_SYNC),
        "last_full_sync_requests": num("last_full_sync_requests"),
        "last_full_sync_seconds": num("last_full_sync_seconds", float),
        "last_change_seq": await store.last_seq(),
        "queue_depth": await queue.depth(),
        "dead_letters": len(await queue.dead_letters()),
        "events": await queue.event_counts(),
        "counts": await store.counts(),
        # Why /access and the access commands cannot answer, or None when they can.
        "access_unavailable": await store.access_problem(),
        "sweep": {
            "progress": num(SWEEP_PROGRESS, float),
            "last_cycle_seconds": num(SWEEP_CYCLE, float),
            "cycle_started_at": num(SWEEP_STARTED, float),
        },
        "subscriptions": await subscription_status(store),
    }


class Service:
    def __init__(self, app: App, *, leadership: Leadership | None = None) -> None:
        """Serve `app` (app.open_app builds it): the receiver, the poller, the probe and the
        outbound side are serve's own, built here around it. `leadership` says when this
        replica runs the leader's loops (AlwaysLeader: the one serve on a SQLite file)."""
        settings = app.settings
        settings.require("webhook_secret")
        assert settings.webhook_secret is not None
        self.app = app
        self.settings = settings
        self.client = client = app.client
        self.store = store = app.store
        self.metrics = Metrics()
        self.notifier = Notifier.from_env()
        self.queue = app.queue
        self.reconciler = app.reconciler
        self.handlers = app.handlers
        self.dispatcher = app.dispatcher
        self.dispatcher.on_result = self._job_result
        self.probe = Probe(client, store, self.queue, app.apply)
        self.inbox = Inbox(self.queue, on_commit=self._committed)
        self.poller = AuditPoller(
            client,
            self.queue,
            interval=settings.poll_interval,
            on_events=self._audit_events,
            on_gap=lambda _reason: self.dispatcher.wake(),
        )
        self.receiver = WebhookReceiver(
            settings.webhook_secret.get_secret_value(),
            self.inbox,
            on_event=self._webhook_event,
            on_reject=self._webhook_rejected,
        )
        self.stop_event = asyncio.Event()
        self.synced = asyncio.Event()
        # Outbound: the live stream and the subscriptions, woken as the change feed grows.
        self.feed = FeedWatch(store)
        self.delivery = Delivery(
            store,
            self.feed,
            self.metrics,
            allow_private=settings.subscriptions_allow_private,
            timeout=settings.subscription_timeout,
            retry_max=settings.subscription_retry_max,
            pause_after=settings.subscription_pause_after,
            batch_size=settings.subscription_batch_size,
        )
        # One replica at a time (the leader) reads BookStack for what webhooks do not say: the
        # audit log and its probe, the diffs, the sweep, gaps. Every replica takes webhooks and
        # works the queue. SQLite's one serve always leads.
        self.leadership: Leadership = leadership or AlwaysLeader()
        self.leader_tasks = LeaderTasks(
            self.leadership,
            self.stop_event,
            {
                "initial sync": self._initial_sync,
                "audit poller": lambda: self.poller.run(self.stop_event, ready=self.synced),
                "periodic reconcile": lambda: self._resilient(self._periodic_reconcile),
                "silent-change probe": lambda: self._resilient(self._probe_loop),
                "housekeeping": self._housekeeping,
                "sweep": lambda: self._resilient(self._sweep),
            },
            # The poller commits what it has read; the rest is cancelled as before.
            graceful={"audit poller"},
        )
        self.port: int | None = None
        # Client counters already reported to Prometheus (its counters only go up by deltas).
        self._reported: Counter[Any] = Counter()
        self._tasks: list[asyncio.Task[Any]] = []
        self._accepted = self.metrics.webhooks_received_total.labels(outcome="accepted")
        self._event_counters: dict[tuple[str, str], Any] = {}
        self._runner: web.AppRunner | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        check_exposure(self.settings.listen_host, self.settings.read_token)
        # Jobs other replicas commit (PostgreSQL's NOTIFY) wake this one's workers too.
        self.store.on_jobs.append(self.dispatcher.wake)
        await self.store.listen()
        recovered = await self.queue.recover()
        if recovered:
            log.info("jobs of a stopped worker put back", jobs=recovered)
        # A refusal an earlier run saw says nothing about this run's token (it may be a new
        # one); this run's first refusal records it again.
        async with self.store.transaction() as tx:
            await tx.delete_state(TOKEN_REJECTED)
        if await self.store.get_state(AUDIT_ACCESS) == AUDIT_ABSENT:
            # Noticed (and logged) by an earlier run: this run says it once too.
            log.info(
                "running on webhooks and diff syncs: this BookStack has no audit-log API "
                "(it came in v23.08)"
            )
        self.inbox.start()
        self._runner = web.AppRunner(
            build_app(self),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=2.0,
            **RUNNER_OPTIONS,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.settings.listen_host,
            self.settings.listen_port,
        )
        try:
            await site.start()
        except OSError as exc:  # taken since serve checked it (cli: check_listen)
            raise ConfigError(
                f"setting EVENTSYNC_LISTEN is invalid: cannot listen on "
                f"{self.settings.listen}: {exc.strerror or exc}"
            ) from None
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.listen_port
        log.info("listening", address=f"{self.settings.listen_host}:{self.port}")
        self._spawn(self.leader_tasks.run(), "leader")
        self._spawn(self._await_sync_point(), "sync point")
        self._spawn(self.dispatcher.run(self.stop_event), "dispatcher")
        self._spawn(self._resilient(self._watch_token), "token watch")
        self._spawn(self._resilient(lambda: self.feed.run(self.stop_event)), "feed watch")
        self._spawn(self._resilient(lambda: self.delivery.run(self.stop_event)), "delivery")
        interval = self.notifier.watchdog_timeout
        if interval:
            self._spawn(watchdog_loop(self.notifier, self.healthy, interval / 2), "watchdog")
        self.notifier.ready(status=await self._status_line())

    async def _resilient(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop; if it fails (the database locked past its timeout, a disk
        full), log it and start it again after a back-off rather than stop the service."""
        failures = 0
        while not self.stop_event.is_set():
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                log.exception("background task failed; restarting it", failures=failures)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=backoff(failures) + 1)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_ended)
        self._tasks.append(task)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self.stop_event.is_set():
            return
        exc = task.exception()
        if exc is not None:
            log.error("a service task died; stopping", task=task.get_name(), error=repr(exc))
            self.exit_code = 1
            self.stop_event.set()

    exit_code = 0
    probe_runs = 0

    async def stop(self) -> None:
        """Stop accepting, let in-flight jobs finish (or put them back), close everything."""
        self.stop_event.set()
        self.notifier.stopping()
        if self._runner is not None:
            await self._runner.cleanup()  # no new webhooks from here on
        await self.inbox.close()
        for task in self._tasks:
            if task.get_name() in ("dispatcher", "leader"):  # the leader's: the audit poller
                try:
                    await asyncio.wait_for(asyncio.shield(task), timeout=12.0)
                except TimeoutError:
                    log.warning("task did not finish in time; cancelling it", task=task.get_name())
                except Exception:
                    pass  # reported with the others below
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for task, result in zip(self._tasks, results, strict=True):
            # _task_ended says nothing once stopping: a task that failed on the way out would
            # otherwise go unreported.
            if isinstance(result, Exception):
                log.error("task failed while stopping", task=task.get_name(), error=repr(result))
        log.info("stopped")

    async def run_until_stopped(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop_event.set)
        await self.start()
        await self.stop_event.wait()
        await self.stop()
        return self.exit_code

    # ---- background work --------------------------------------------------------------------

    async def _has_sync_point(self) -> bool:
        return await self.store.get_state(LAST_FULL_SYNC) is not None and (
            await self.store.get_state(AUDIT_CURSOR) is not None
            or await self.store.get_state(AUDIT_ACCESS) in NO_AUDIT_LOG
        )

    async def _await_sync_point(self) -> None:
        """Synced once there is a sync point, whichever replica made it: a follower runs no
        initial sync of its own, the leader's (here or in another process) is its sync."""
        while not self.synced.is_set() and not self.stop_event.is_set():
            if await self._has_sync_point():
                self.synced.set()
                return
            await wait_any(self.synced, self.stop_event, timeout=1.0)

    async def _initial_sync(self) -> None:
        """No sync point yet: a full sync first (webhooks are accepted and queued meanwhile)."""
        attempt = 0
        while not self.stop_event.is_set():
            if await self._has_sync_point():
                self.synced.set()
                return
            self.notifier.status("initial full sync")
            try:
                summary = await self.reconciler.full_sync(set_cursor=True)
            except AuthError:
                # Reported by the client and the token watch; a retry before the token works
                # would only be refused. Try again as soon as it does.
                await wait_any(self.client.token.working, self.stop_event)
                continue
            except Exception as exc:
                log.warning("initial sync failed; retrying", error=repr(exc))
            else:
                if summary.complete:
                    self.synced.set()
                    self.notifier.status(await self._status_line())
                    return
                log.warning("initial sync incomplete; retrying", problems=summary.problems[:5])
            attempt += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=backoff(attempt) + 1)

    async def _periodic_reconcile(self) -> None:
        """Catch what BookStack never reports (FACTS 2.5): a listing diff every interval, and
        one at start-up when the mirror predates this run (what happened while we were down
        and emitted no event: attachments, link rewrites, cascades)."""
        had_sync_point = await self.store.get_state(LAST_FULL_SYNC) is not None
        await self.synced.wait()
        if had_sync_point and not self.stop_event.is_set():
            await self.queue.enqueue(DIFF_KEY, [FETCH], reason="start-up diff")
            self.dispatcher.wake()
        while not self.stop_event.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self.stop_event.wait(), timeout=self.settings.reconcile_interval
                )
            if not self.stop_event.is_set():
                await self.queue.enqueue(DIFF_KEY, [FETCH], reason="periodic diff")
                self.dispatcher.wake()

    async def _probe_loop(self) -> None:
        """What moves no event (attachments, ownership migration, link rewrites) within one
        poll interval, for one request per probed kind (ingest/probe.py)."""
        if not self.settings.probe:
            return
        await self.synced.wait()
        while not self.stop_event.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=self.settings.poll_interval)
            if self.stop_event.is_set():
                return
            try:
                result = await self.probe.probe_once()
            except AuthError:
                continue  # the token is refused: reported elsewhere, probed again later
            finally:
                self.probe_runs += 1
            if result.reads or result.diffs:
                self.dispatcher.wake()

    async def _gap(self, reason: str) -> None:
        """A gap: something happened that no event told us about. Diff-sync and say so."""
        log.warning("gap detected: diff sync of everything", reason=reason)
        async with self.store.transaction() as tx:
            await record_gap(tx, reason)
            await self.queue.enqueue(DIFF_KEY, [FETCH], payload=THOROUGH, tx=tx, reason="gap")
        self.dispatcher.wake()

    async def _check_downtime(self) -> None:
        last_poll = await self.store.get_state(LAST_POLL)
        if last_poll is not None:
            down = time.time() - float(last_poll)
            if down > self.settings.max_downtime:
                await self._gap(f"down for {down:.0f} s, longer than EVENTSYNC_MAX_DOWNTIME")

    async def _check_webhooks_confirmed(self) -> None:
        """Every webhook's activity is in the audit log; one that never shows up means the
        log is not telling us everything (no audit access, or it is being cleared)."""
        cutoff = time.time() - self.settings.webhook_confirm_grace
        if await self.store.get_state(AUDIT_ACCESS) in NO_AUDIT_LOG:
            # Nothing to confirm them against. Marked as confirmed, so that an audit log
            # appearing later does not take them all for a gap.
            await self.queue.confirm_webhooks(cutoff)
            return
        last_poll = await self.store.get_state(LAST_POLL)
        if last_poll is None or float(last_poll) < cutoff:
            return  # the poller has not looked since; nothing to conclude yet
        missing = await self.queue.unconfirmed_webhooks(cutoff)
        if missing:
            await self.queue.confirm_webhooks(cutoff)
            await self._gap(f"{missing} webhook(s) never appeared in the audit log")

    async def _watch_token(self) -> None:
        """While BookStack rejects the API token: say so (readyz, `status`), probe it at a
        growing interval (the only task that does: everything else waits), and resume the
        moment it works. What happened meanwhile is still in the audit log after the cursor,
        and the jobs refused meanwhile are queued with their attempts unspent."""
        token = self.client.token
        while not self.stop_event.is_set():
            await wait_any(token.failing, self.stop_event)
            if self.stop_event.is_set():
                return
            async with self.store.transaction() as tx:
                await tx.set_state(TOKEN_REJECTED, f"{token.since_iso()} {token.rejected}")
            self.notifier.status(await self._status_line())
            if not await self.client.until_token_works(self.stop_event):
                return
            async with self.store.transaction() as tx:
                await tx.delete_state(TOKEN_REJECTED)
            self.dispatcher.wake()
            self.poller.trigger()
            self.notifier.status(await self._status_line())

    async def _housekeeping(self) -> None:
        try:
            await self._check_downtime()
        except Exception:
            log.exception("downtime check failed; carrying on")
        while not self.stop_event.is_set():
            try:
                cursor = await self.poller.cursor() or 0
                await self.queue.prune_events(
                    time.time() - EVENT_RETENTION, keep_activities_from=cursor - AUDIT_OVERLAP
                )
                await self._check_webhooks_confirmed()
                self.notifier.status(await self._status_line())
            except Exception:
                # The database (locked past its timeout, disk full): the next round retries.
                log.exception("housekeeping failed; retrying next round")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self.stop_event.wait(), timeout=min(60.0, self.settings.webhook_confirm_grace)
                )

    async def _sweep(self) -> None:
        """Re-read what changes without moving any timestamp (FACTS 2.5: permissions copied
        from a shelf, SSO group sync, shelf membership lost by cascades), one item at a time
        within EVENTSYNC_SWEEP_SHARE of the request budget, so every item is verified within
        one cycle. Work goes through the job queue: one in-flight job per entity still holds.
        """
        share = self.settings.sweep_share
        if share <= 0:
            return
        per_second = share * self.settings.requests_per_minute / 60.0
        await self.synced.wait()
        while not self.stop_event.is_set():
            saved = await self.store.get_state(SWEEP_POSITION)
            if saved is None and await self._sweep_wait():
                continue
            items = await self._sweep_items()
            start = 0
            if saved is not None:
                start = next((i for i, it in enumerate(items) if _sweep_key(it) > saved), 0)
            if start == 0:
                async with self.store.transaction() as tx:
                    await tx.set_state(SWEEP_STARTED, time.time())
            for i in range(start, len(items)):
                # Jobs queued while the token is rejected could not run: hold the sweep.
                await wait_any(self.client.token.working, self.stop_event)
                if self.stop_event.is_set():
                    return
                key, hints = items[i]
                await self.queue.enqueue(key, hints, reason="sweep")
                self.dispatcher.wake()
                cost = len(hints)  # one request per hint: a read, a permissions read
                async with self.store.transaction() as tx:
                    await tx.set_state(SWEEP_POSITION, _sweep_key(items[i]))
                    await tx.set_state(SWEEP_PROGRESS, round((i + 1) / len(items), 4))
                self.metrics.sweep_progress_ratio.set((i + 1) / len(items))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=cost / per_second)
            started = await self.store.get_state(SWEEP_STARTED)
            async with self.store.transaction() as tx:
                await tx.delete_state(SWEEP_POSITION)
                if started is not None:
                    cycle = time.time() - float(started)
                    await tx.set_state(SWEEP_CYCLE, round(cycle, 1))
                    self.metrics.sweep_cycle_seconds.set(cycle)
            if not items:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=60)

    async def _sweep_wait(self) -> bool:
        """Before a new cycle: wait until EVENTSYNC_SWEEP_INTERVAL has passed since the last
        one began, or since a full sync read the same (the cold sync, a thorough diff).
        True if it waited (the caller looks again)."""
        states = await self.store.states()
        last = max(
            (float(states[k]) for k in (SWEEP_STARTED, LAST_VERIFIED) if k in states),
            default=None,
        )
        if last is None:
            return False
        remaining = last + self.settings.sweep_interval - time.time()
        if remaining <= 0:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), timeout=min(remaining, 60.0))
        return True

    async def _sweep_items(self) -> list[tuple[str, list[str]]]:
        """One cycle's work. Content permissions are read for the items the {is_restricted}
        search finds and the items the mirror holds as restricted (what changed either way
        since the last read), not for every item: every other item has the default. Where
        the search fails or cannot be trusted, every item's permissions are read."""
        restricted = await self.reconciler.restricted_items()
        if restricted is not None:
            restricted |= await self.store.restricted_keys()

        def permissions(kind: str, entity_id: int) -> list[str]:
            wanted = restricted is None or (CONTENT_TYPES[kind], entity_id) in restricted
            return [PERMISSIONS] if wanted else []

        items: list[tuple[str, list[str]]] = []
        for role_id in sorted(await self.store.ids("role")):
            items.append((f"role:{role_id}", [FETCH]))
        for shelf_id in sorted(await self.store.ids("shelf")):
            items.append((f"shelf:{shelf_id}", [FETCH, *permissions("shelf", shelf_id)]))
        includers = set(await self.store.pages_with_includes())
        for kind in ("book", "chapter", "page"):
            for entity_id in sorted(await self.store.ids(kind)):
                # Pages with includes are re-read whole: their rendered html can go stale
                # through an included page in ways no event or timestamp shows.
                extra = [FETCH] if kind == "page" and entity_id in includers else []
                hints = [*permissions(kind, entity_id), *extra]
                if hints:
                    items.append((f"{kind}:{entity_id}", hints))
        return items

    # ---- callbacks --------------------------------------------------------------------------

    def _committed(self, events: list[Event], outcomes: list[str]) -> None:
        self.dispatcher.wake()

    def _webhook_event(self, event: Event, outcome: str) -> None:
        self._accepted.inc()
        self._count_event(event, outcome)
        self.poller.trigger()  # its audit row exists already: pair it soon

    def _webhook_rejected(self, reason: str) -> None:
        self.metrics.webhooks_received_total.labels(outcome="rejected").inc()
        self.metrics.webhooks_rejected_total.labels(reason=reason).inc()

    def _audit_events(self, events: list[Event], outcomes: list[str]) -> None:
        for event, outcome in zip(events, outcomes, strict=True):
            self._count_event(event, outcome)
        self.dispatcher.wake()

    def _count_event(self, event: Event, outcome: str) -> None:
        # Only types we know become label values: anyone holding the webhook secret could
        # otherwise mint unbounded metric series.
        known = event.type in ROUTES or event.type in IGNORED
        label = event.type if known else "other"
        counter = self._event_counters.get((label, event.source))
        if counter is None:  # labels() costs a lock and a lookup: once per series, not event
            counter = self.metrics.events_total.labels(type=label, source=event.source)
            self._event_counters[(label, event.source)] = counter
        counter.inc()
        if outcome in ("duplicate", "covered"):
            self.metrics.events_deduplicated_total.labels(source=event.source).inc()

    def _job_result(self, job: Job, outcome: str, seconds: float) -> None:
        label = {"settling": "retried"}.get(outcome, outcome)
        self.metrics.jobs_total.labels(outcome=label).inc()
        if outcome == "done":
            self.metrics.freshness_seconds.observe(max(0.0, time.time() - job.first_seen))

    # ---- status -----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        data = await status_data(self.store, self.queue)
        data["in_flight"] = self.dispatcher.in_flight
        data["api_requests"] = self.client.stats.requests
        data["synced"] = self.synced.is_set()
        data["replica"] = self.leadership.replica  # which one answered (behind a balancer)
        data["leader"] = await self.leadership.leader()
        return data

    async def _status_line(self) -> str:
        cursor = await self.store.get_state(AUDIT_CURSOR)
        phase = "caught up" if self.synced.is_set() else "syncing"
        if self.client.token.rejected is not None:
            phase = "BookStack rejects the API token"
        role = "" if self.leadership.is_leader else "; following the leader"
        return f"{phase}; cursor {cursor}; queue {await self.queue.depth()}{role}"

    async def healthy(self) -> bool:
        """For the watchdog: the loop runs (we are here) and the writer commits."""
        try:
            async with asyncio.timeout(5):
                async with self.store.transaction() as tx:
                    await tx.set_state("heartbeat_at", time.time())
        except Exception:
            log.exception("health check: the database does not commit")
            return False
        # Tasks that end by design (the initial sync; the sweep when its share is 0) may be
        # done; the rest run for as long as the service does.
        tasks = [*self._tasks, *self.leader_tasks.tasks.values()]
        return all(not t.done() for t in tasks if t.get_name() in LONG_LIVED)

    async def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        try:
            await self.store.ping()
        except Exception as exc:
            reasons.append(f"database: {exc}")
        if self.client.token.rejected is not None:
            reasons.append(
                f"BookStack rejects the API token since {self.client.token.since_iso()}: "
                f"{self.client.token.rejected}"
            )
        if not self.synced.is_set():
            reasons.append("initial sync in progress")
        elif await self.store.get_state(AUDIT_ACCESS) not in NO_AUDIT_LOG:
            last_poll = await self.store.get_state(LAST_POLL)
            limit = 3 * self.settings.poll_interval + 60
            if last_poll is None or time.time() - float(last_poll) > limit:
                reasons.append("BookStack's audit log not read successfully recently")
        else:
            # No audit log to poll: the periodic diff and the sweep are what talk to BookStack.
            limit = max(READY_API_AGE, self.settings.reconcile_interval + 60)
            if time.time() - self.client.stats.last_answer_at > limit:
                reasons.append("BookStack has not answered recently")
        return not reasons, reasons

    async def refresh_metrics(self) -> None:
        stats = self.client.stats
        for (route, status), count in list(stats.by_route.items()):
            key = ("route", route, status)
            if count > self._reported[key]:
                self.metrics.api_requests_total.labels(endpoint=route, status=str(status)).inc(
                    count - self._reported[key]
                )
                self._reported[key] = count
        for name, metric in (
            ("retries", self.metrics.api_retries_total),
            ("limiter_waits", self.metrics.api_rate_limit_waits_total),
            ("limiter_waited_seconds", self.metrics.api_rate_limit_wait_seconds_total),
        ):
            value = float(getattr(stats, name, 0) or 0)
            if value > self._reported[name]:
                metric.inc(value - self._reported[name])
                self._reported[name] = value
        self.metrics.queue_depth.set(await self.queue.depth())
        self.metrics.dead_letters.set(len(await self.queue.dead_letters()))
        cursor = await self.store.get_state(AUDIT_CURSOR)
        if cursor is not None:
            self.metrics.audit_cursor.set(int(cursor))
        last_poll = await self.store.get_state(LAST_POLL)
        if last_poll is not None:
            self.metrics.audit_lag_seconds.set(max(0.0, time.time() - float(last_poll)))
        last_sync = await self.store.get_state(LAST_FULL_SYNC)
        if last_sync is not None:
            with contextlib.suppress(ValueError):
                self.metrics.last_full_sync_timestamp_seconds.set(
                    datetime.fromisoformat(last_sync.replace("Z", "+00:00")).timestamp()
                )
        counts = await self.store.counts()
        for kind in KINDS:
            self.metrics.mirror_entities.labels(kind=kind).set(counts[kind])
        self.metrics.changes_seq.set(await self.store.last_seq())
        await self.delivery.refresh_metrics()
