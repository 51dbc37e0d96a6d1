"""Outbound delivery: every change-feed row, POSTed to each subscription, signed with the
Standard Webhooks scheme, at least once, in feed order, retried with back-off until a 2xx.

Each subscription has one task and at most one delivery in flight; a delivery (its rows and
its webhook-id) is recorded before its first attempt and sent again unchanged until a 2xx
moves the cursor past it, across restarts and crashes too. So the same webhook-id always
carries the same rows and different ones never share a row: a receiver that dedups by
webhook-id sees every change exactly once, whatever failed in between."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import random
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from standardwebhooks import Webhook
from yarl import URL

from eventsync import __version__
from eventsync.aio import wait_any
from eventsync.errors import AddressRefused, UsageError
from eventsync.feed import FeedWatch
from eventsync.logging import get_logger
from eventsync.metrics import Metrics
from eventsync.store.base import Store
from eventsync.store.states import FEED_ENTITIES
from eventsync.store.subscriptions import PAUSED_FAILING, Subscription, Subscriptions

log = get_logger("eventsync.delivery")

SECRET_PREFIX = "whsec_"
# Standard Webhooks: a signing key of 24 to 64 bytes.
SECRET_BYTES = (24, 64)
GENERATED_SECRET_BYTES = 32
# A delivery's body at most (one change bigger than this goes alone): many receivers and
# proxies refuse bigger requests.
MAX_BODY = 1024 * 1024
# Of the receiver's answer only this much is read: only the status counts, and the start of
# the body goes into `last_error`; a receiver cannot make us hold or wait for more.
ANSWER_CAP = 16 * 1024
ERROR_TEXT = 300  # characters of a receiver's answer kept in last_error
# The first retry comes after about this long; each failure doubles it up to
# EVENTSYNC_SUBSCRIPTION_RETRY_MAX.
RETRY_BASE = 1.0
# How often a waiting task looks at its subscription again: a `pause`, `resume`, `replay`
# or `remove` from the command line (another process) takes effect within this.
REFRESH = 1.0


# ---- secrets and signatures -------------------------------------------------------------------


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: whsec_ and base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(GENERATED_SECRET_BYTES)).decode()


def parse_secret(text: str) -> str:
    """A secret given by the operator (`--secret`), checked; the message never quotes it."""
    if not text.startswith(SECRET_PREFIX):
        raise UsageError(
            "--secret must be in the Standard Webhooks form: whsec_ followed by base64"
        )
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("--secret is not valid base64 after whsec_") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise UsageError(
            f"--secret must hold {low} to {high} bytes (Standard Webhooks); it holds {len(key)}"
        )
    return text


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """The webhook-signature header, by the reference implementation (standardwebhooks)."""
    return Webhook(secret).sign(message_id, datetime.fromtimestamp(timestamp, tz=UTC), body)


# ---- where we send ------------------------------------------------------------------------------


def refusal(address: str) -> str | None:
    """Why `address` (an IP address) is not one to send to, or None if it is public."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for what, flag in (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return what
    if not ip.is_global:  # shared (100.64/10), documentation, 6to4 of private, and the like
        return "not globally routable"
    return None


def _refused_message(host: str, address: str, why: str) -> str:
    shown = host if host == address else f"{host} ({address})"
    return (
        f"{shown} is a {why} address: refused (set EVENTSYNC_SUBSCRIPTIONS_ALLOW_PRIVATE=true "
        "to deliver to loopback and private addresses)"
    )


def check_url(url: str) -> URL:
    """The subscription URL's syntax: absolute http(s) with a host. Returns it parsed."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"not a URL: {url!r} ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise UsageError(f"only http and https URLs can be subscribed (got {parsed.scheme!r})")
    if not parsed.host:
        raise UsageError("the URL has no host")
    if parsed.port == 0:
        raise UsageError("the URL's port must be between 1 and 65535")
    if parsed.fragment:
        raise UsageError("the URL has a fragment (#…), which is never sent: leave it out")
    return parsed


def shown_url(url: str) -> str:
    """The URL with any password masked, for lists, status and logs."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


async def check_destination(url: URL, allow_private: bool) -> None:
    """At `add`: the host resolves, and to at least one address we may send to."""
    host = url.host or ""
    if _is_ip(host):
        _literal(host, allow_private)
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, url.port, type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"cannot resolve {host}: {reason}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if allow_private:
        return
    refused = [(a, refusal(a)) for a in addresses]
    if all(why for _, why in refused):
        address, why = refused[0]
        raise AddressRefused(_refused_message(host, address, str(why)))


class _Refused(OSError):
    """Raised inside aiohttp's connector (which wraps OSErrors of its resolver)."""


class GuardedResolver(AbstractResolver):
    """Resolves at connection time and drops the addresses we may not send to, so a name that
    resolved to a public address at `add` cannot be turned towards this host or its network
    later (DNS rebinding). IP literals never reach a resolver: `_literal` checks those."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self.allow_private:
            return results
        allowed = [r for r in results if refusal(r["host"]) is None]
        if not allowed:
            first = results[0]["host"] if results else host
            raise _Refused(_refused_message(host, first, refusal(first) or "refused"))
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _literal(host: str, allow_private: bool) -> None:
    """An IP address as the URL's host: aiohttp connects to it without asking a resolver."""
    why = refusal(host) if _is_ip(host) else None
    if why and not allow_private:
        raise AddressRefused(_refused_message(host, host, why))


def backoff(attempts: int, cap: float, floor: float = 0.0) -> float:
    """Seconds before the next attempt after `attempts` failures in a row: doubling, with
    jitter (half to all of it: a receiver coming back is not hit by every sender at once),
    at most `cap`, at least `floor` (a Retry-After), within the cap."""
    delay = min(cap, RETRY_BASE * 2.0 ** min(attempts - 1, 32))
    return min(cap, max(floor, delay * random.uniform(0.5, 1.0)))


# ---- what we send -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    id: str  # the webhook-id
    rows: list[dict[str, Any]]
    through: int
    body: str


def encode_row(row: dict[str, Any]) -> str:
    """One change as deliveries and the stream carry it: the row as `GET /changes` gives it,
    with its `state` (stored as JSON text) in it."""
    item = dict(row)
    raw = item.pop("state", None)
    item["state"] = json.loads(raw) if raw else None
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"))


def _body(encoded: list[str]) -> str:
    return '{"changes":[' + ",".join(encoded) + "]}"


def _describe_answer(status: int, answer: bytes, location: str | None) -> str:
    if 300 <= status < 400:
        where = f" to {location[:200]}" if location else ""
        return f"HTTP {status}: a redirect{where}, not followed"
    text = answer.decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return f"HTTP {status}: {text[:ERROR_TEXT]}" if text else f"HTTP {status}"


def _retry_after(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0  # an HTTP date: rare from webhook receivers, and the back-off covers it


# ---- the tasks ----------------------------------------------------------------------------------


class Delivery:
    """One task per active subscription, started and stopped as the table says; none of
    them touches the mirror's own work beyond a read and a one-row write per delivery."""

    def __init__(
        self,
        store: Store,
        feed: FeedWatch,
        metrics: Metrics,
        *,
        allow_private: bool = False,
        timeout: float = 10.0,
        retry_max: float = 60.0,
        pause_after: float = 86400.0,
        batch_size: int = 50,
    ) -> None:
        self.store = store
        self.subscriptions = Subscriptions(store)
        self.feed = feed
        self.metrics = metrics
        self.allow_private = allow_private
        self.timeout = timeout
        self.retry_max = retry_max
        self.pause_after = pause_after
        self.batch_size = batch_size
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._series: set[str] = set()

    @property
    def active(self) -> int:
        return sum(not t.done() for t in self._tasks.values())

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow_private), limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,  # no proxy from the environment: it would see past our checks
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": f"eventsync/{__version__}"},
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        try:
            while not stop.is_set():
                try:
                    self._start_tasks(await self.subscriptions.all())
                except Exception:
                    log.exception("reading the subscriptions failed; trying again")
                await wait_any(stop, timeout=REFRESH)
        finally:
            try:
                tasks = list(self._tasks.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                # Closed even when a second cancellation (the service stopping with a
                # deadline) cuts the wait for the subscriptions short.
                await self._session.close()

    def _start_tasks(self, subs: list[Subscription]) -> None:
        for sub in subs:
            task = self._tasks.get(sub.id)
            if sub.paused is None and (task is None or task.done()):
                self._tasks[sub.id] = asyncio.create_task(
                    self._deliver(sub.id), name=f"subscription {sub.id}"
                )
        for sub_id in [i for i, t in self._tasks.items() if t.done()]:
            del self._tasks[sub_id]

    async def _deliver(self, sub_id: int) -> None:
        errors = 0
        while not self._stop.is_set():
            try:
                if not await self._step(sub_id):
                    return  # paused or removed: the manager starts it again on resume
                errors = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                # Ours, not the receiver's (the database locked past its timeout, a disk
                # full): the delivery stays recorded; try again after a while.
                errors += 1
                log.exception("subscription task failed; retrying", subscription=sub_id)
                await wait_any(self._stop, timeout=backoff(errors, 60.0))

    async def _step(self, sub_id: int) -> bool:
        sub = await self.subscriptions.get(sub_id)
        if sub is None or sub.paused is not None:
            return False
        wait = (sub.next_attempt_at or 0.0) - time.time()
        if wait > 0:
            await wait_any(self._stop, timeout=min(wait, REFRESH))
            return True
        mark = self.feed.mark()
        batch = await self._batch(sub)
        if batch is None:
            await self.feed.wait(mark, self._stop, timeout=REFRESH)
            return True
        await self._attempt(sub, batch)
        return True

    async def _batch(self, sub: Subscription) -> Batch | None:
        """The delivery under way, or the next one (recorded before it is sent)."""
        subs = self.subscriptions
        if sub.batch_id is not None and sub.batch_through is not None:
            # The same rows as before: the feed's rows never change, and the range and the
            # kinds are what they were.
            rows = await subs.rows(sub.cursor, sub.kinds, through=sub.batch_through)
            encoded = [encode_row(r) for r in rows]
            return Batch(sub.batch_id, rows, sub.batch_through, _body(encoded))
        head = await self.store.last_seq()
        if head <= sub.cursor:
            return None
        rows = await subs.rows(sub.cursor, sub.kinds, through=head, limit=self.batch_size)
        if not rows:
            await subs.skip(sub.id, sub.cursor, head)
            return None
        encoded, size = [], 0
        for row in rows:
            text = encode_row(row)
            if encoded and size + len(text.encode()) > MAX_BODY:
                break
            encoded.append(text)
            size += len(text.encode())
        whole = len(encoded) == len(rows) < self.batch_size
        rows = rows[: len(encoded)]
        # Every row of its kinds up to the head is in it (fewer than asked for, none left out
        # for size): acknowledged, the cursor moves to the head, past rows of other kinds.
        through = head if whole else rows[-1]["seq"]
        batch_id = new_message_id()
        if not await subs.begin(sub.id, sub.cursor, batch_id, through):
            return None  # replayed, paused or removed meanwhile: look again
        return Batch(batch_id, rows, through, _body(encoded))

    async def _attempt(self, sub: Subscription, batch: Batch) -> None:
        label = str(sub.id)
        started = time.monotonic()
        status, error, retry_after = await self._post(sub, batch)
        self.metrics.delivery_seconds.observe(time.monotonic() - started)
        if status is not None and 200 <= status < 300:
            self.metrics.deliveries_total.labels(subscription=label, outcome="delivered").inc()
            if await self.subscriptions.acknowledged(sub.id, batch.id, len(batch.rows), status):
                self.metrics.delivered_changes_total.labels(subscription=label).inc(len(batch.rows))
            if sub.attempts:
                log.info(
                    "subscription delivering again",
                    subscription=sub.id,
                    failed_attempts=sub.attempts,
                )
            return
        self.metrics.deliveries_total.labels(subscription=label, outcome="failed").inc()
        retry_in = backoff(sub.attempts + 1, self.retry_max, floor=retry_after)
        after = await self.subscriptions.failed(
            sub.id,
            batch.id,
            status=status,
            error=error,
            retry_in=retry_in,
            pause_after=self.pause_after,
        )
        if after is None:
            return
        host = URL(sub.url).host
        if after.paused == PAUSED_FAILING:
            failing = time.time() - (after.failing_since or time.time())
            self.metrics.subscription_pauses_total.inc()
            log.error(
                "subscription paused: it kept failing (resume it with `eventsync "
                "subscriptions resume`)",
                subscription=sub.id,
                host=host,
                failing_seconds=round(failing),
                attempts=after.attempts,
                error=error,
            )
        elif sub.attempts == 0:
            log.warning(
                "subscription failing; retrying with back-off",
                subscription=sub.id,
                host=host,
                error=error,
            )
        else:
            log.debug(
                "subscription still failing",
                subscription=sub.id,
                attempts=after.attempts,
                retry_in=round(retry_in, 2),
                error=error,
            )

    async def _post(self, sub: Subscription, batch: Batch) -> tuple[int | None, str, float]:
        """One attempt: (HTTP status or None, what went wrong, Retry-After seconds)."""
        assert self._session is not None
        url = URL(sub.url)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": batch.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(sub.secret, batch.id, timestamp, batch.body),
        }
        try:
            _literal(url.host or "", self.allow_private)
            async with (
                asyncio.timeout(self.timeout),
                self._session.post(
                    url, data=batch.body.encode(), headers=headers, allow_redirects=False
                ) as resp,
            ):
                answer = await resp.content.read(ANSWER_CAP)
                status = resp.status
                if 200 <= status < 300:
                    return status, "", 0.0
                return (
                    status,
                    _describe_answer(status, answer, resp.headers.get("Location")),
                    _retry_after(resp.headers.get("Retry-After")),
                )
        except AddressRefused as exc:
            return None, str(exc), 0.0
        except TimeoutError:
            return None, f"no answer within {self.timeout:g} s", 0.0
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, _Refused):
                return None, str(exc.os_error), 0.0
            return None, f"cannot resolve {url.host}: {exc.os_error.strerror or exc}", 0.0
        except aiohttp.ClientConnectorError as exc:
            return None, f"cannot connect to {url.host}: {exc.os_error.strerror or exc}", 0.0
        except aiohttp.ClientError as exc:
            # Some of aiohttp's messages quote the URL: never with its password.
            text = str(exc).replace(sub.url, shown_url(sub.url))
            return None, f"{type(exc).__name__}: {text}", 0.0

    # ---- reporting ----------------------------------------------------------------------------

    async def refresh_metrics(self) -> None:
        head = await self.store.last_seq()
        subs = await self.subscriptions.all()
        now = time.time()
        seen = set()
        for sub in subs:
            label = str(sub.id)
            seen.add(label)
            self.metrics.subscription_lag_changes.labels(subscription=label).set(
                max(0, head - sub.cursor)
            )
            self.metrics.subscription_paused.labels(subscription=label).set(1 if sub.paused else 0)
            failing = now - sub.failing_since if sub.failing_since else 0.0
            self.metrics.subscription_failing_seconds.labels(subscription=label).set(failing)
        for label in self._series - seen:  # removed: its series go too
            for gauge in (
                self.metrics.subscription_lag_changes,
                self.metrics.subscription_paused,
                self.metrics.subscription_failing_seconds,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(label)
        self._series = seen


def describe(sub: Subscription, head: int) -> dict[str, Any]:
    """A subscription for `status` and `subscriptions list`: everything but its secret."""
    state = "active"
    if sub.paused:
        state = "paused (failing)" if sub.paused == PAUSED_FAILING else "paused"
    elif sub.failing_since is not None:
        state = "failing"
    return {
        "id": sub.id,
        "url": shown_url(sub.url),
        "kinds": list(sub.kinds) if sub.kinds else None,
        "state": state,
        "paused": sub.paused,
        "paused_at": sub.paused_at,
        "cursor": sub.cursor,
        "behind": max(0, head - sub.cursor),
        "delivered": sub.delivered,
        "failing_since": sub.failing_since,
        "attempts": sub.attempts,
        "next_attempt_at": sub.next_attempt_at,
        "last_status": sub.last_status,
        "last_error": sub.last_error,
        "last_success_at": sub.last_success_at,
    }


async def subscription_status(store: Store) -> list[dict[str, Any]]:
    head = await store.last_seq()
    return [describe(s, head) for s in await Subscriptions(store).all()]


def parse_kinds(text: str | None) -> tuple[str, ...] | None:
    """`page,book`: feed entities; None (every change) for nothing given."""
    if text is None or not text.strip():
        return None
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in FEED_ENTITIES]
    if unknown:
        raise UsageError(
            f"unknown kind {unknown[0]!r}: the change feed's kinds are {', '.join(FEED_ENTITIES)}"
        )
    return kinds or None
