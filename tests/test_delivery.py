"""Outbound delivery (DESIGN: Outbound delivery; issue 12): an in-process Service against the
fake BookStack, real webhook receivers on 127.0.0.1 (tests/receivers.py), every request's
signature checked with the Standard Webhooks reference implementation. What a receiver that
dedups by webhook-id processed must be exactly the mirror's change feed, whatever failed."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import client_for, eventually, service_settings
from receivers import (
    BUSY,
    DROP,
    ENDLESS,
    FAIL,
    HANG,
    HUGE,
    OK,
    REDIRECT,
    SLOW,
    Receiver,
    wait_for_requests,
    without_state,
)
from structlog.testing import capture_logs

from eventsync.app import open_app
from eventsync.config import Settings
from eventsync.consumer import verify
from eventsync.delivery import RETRY_BASE, backoff, encode_row, new_secret
from eventsync.service import Service
from eventsync.store.subscriptions import Subscription, Subscriptions
from eventsync.testing import FakeBookStack

SECRET = "delivery-test-webhook-secret-0123456789"
RPM = 100_000
NO_VIEW = {"view": False, "create": False, "update": False, "delete": False}

pytestmark = pytest.mark.timeout(90)


def settings_for(fake: FakeBookStack, db: Path, **extra: Any) -> Settings:
    defaults: dict[str, Any] = {
        "probe": False,
        # The receivers are on 127.0.0.1: these tests allow it, explicitly.
        "subscriptions_allow_private": True,
        "subscription_timeout": 1.0,
        "subscription_retry_max": 0.2,
    }
    return service_settings(fake, db, SECRET, **{**defaults, **extra})


@asynccontextmanager
async def running(settings: Settings, fake: FakeBookStack) -> AsyncIterator[Service]:
    async with open_app(settings, client=client_for(fake)) as app:
        svc = Service(app)
        await svc.start()
        try:
            await asyncio.wait_for(svc.synced.wait(), 30)
            fake.add_webhook(f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}")
            yield svc
        finally:
            fake.state.webhooks.clear()
            await svc.stop()


async def feed(svc: Service, kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The change feed with states, as deliveries carry it."""
    rows = await Subscriptions(svc.store).rows(0, kinds)
    return [json.loads(encode_row(r)) for r in rows]


async def subscription(svc: Service, sub_id: int) -> Subscription:
    sub = await Subscriptions(svc.store).get(sub_id)
    assert sub is not None
    return sub


async def caught_up(svc: Service, sub_id: int) -> None:
    async def done() -> bool:
        sub = await subscription(svc, sub_id)
        return sub.batch_id is None and sub.cursor == await svc.store.last_seq()

    await eventually(done, timeout=30, what=f"subscription {sub_id} caught up")


async def settled(svc: Service, fake: FakeBookStack) -> None:
    async def same() -> bool:
        return await svc.store.export() == fake.truth()

    await eventually(same, timeout=20, what="the mirror equals BookStack")


async def test_every_change_arrives_signed_and_replays_to_the_change_feed(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=12, books=2, shelves=2, seed=5)
        secret = new_secret()
        settings = settings_for(fake, tmp_path / "m.db")
        async with Receiver(secret=secret) as receiver, running(settings, fake) as svc:
            # From seq 1: the initial sync's rows too.
            sub = await Subscriptions(svc.store).add(receiver.url, None, secret, 0)
            await fake.update_page(1, html="<p>signed</p>")
            created = await fake.create_page(book_id=1, name="Delivered")
            await fake.delete_page(2)
            await fake.set_permissions("page", 3, fallback=NO_VIEW)
            await fake.update_user(5, roles=[1, 2])
            await fake.update_shelf(1, books=[2, 1])
            await settled(svc, fake)
            await caught_up(svc, sub.id)
            expected = await feed(svc)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{svc.port}/changes?after=0&limit=1000") as r,
            ):
                listed = (await r.json())["changes"]

        assert receiver.received and all(r.verified for r in receiver.received), [
            r.error for r in receiver.received if not r.verified
        ]
        # eventsync.consumer.verify accepts them too (it wraps the same implementation).
        assert all(
            verify(r.headers, r.body, secret) == json.loads(r.body) for r in receiver.received
        )
        assert all(r.headers["content-type"] == "application/json" for r in receiver.received)
        assert all(r.webhook_id.startswith("msg_") for r in receiver.received)
        assert all(abs(int(r.headers["webhook-timestamp"]) - r.at) < 5 for r in receiver.received)
        assert all(set(json.loads(r.body)) == {"changes"} for r in receiver.received)
        delivered = receiver.deduped()
        assert delivered == expected
        # Each row exactly as GET /changes gives it, plus its state.
        assert without_state(delivered) == listed
        assert all(
            set(row) == set(listed[0]) | {"state"} for row in delivered if "content_type" not in row
        )

        def last(entity: str, entity_id: int) -> dict[str, Any]:
            rows = [r for r in delivered if (r["entity"], r["entity_id"]) == (entity, entity_id)]
            return rows[-1]

        assert last("page", 1)["state"]["raw_html"] == "<p>signed</p>"
        assert "fetched_at" not in last("page", 1)["state"]
        assert last("page", created)["state"]["name"] == "Delivered"
        assert last("page", 2)["op"] == "delete" and last("page", 2)["state"] is None
        permissions = last("permissions", 3)
        assert permissions["content_type"] == "page"
        assert permissions["state"]["inheriting"] is False
        assert permissions["state"]["fallback"] == NO_VIEW
        memberships = [r for r in delivered if r["entity"] == "user_role" and r["entity_id"] == 5]
        assert memberships and all(
            r["state"]
            == ({"user_id": 5, "role_id": r["data"]["role_id"]} if r["op"] == "upsert" else None)
            for r in memberships
        )
        assert last("shelf_books", 1)["state"] == {"shelf_id": 1, "books": [2, 1]}


async def test_state_is_the_row_as_that_change_left_it(tmp_path: Path) -> None:
    """Delivered late (the subscription paused), two edits of one page still carry their own
    content each, not the page as it is at delivery time."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=8, books=1, shelves=1, seed=2)
        settings = settings_for(fake, tmp_path / "m.db")
        async with Receiver() as receiver, running(settings, fake) as svc:
            subs = Subscriptions(svc.store)
            sub = await subs.add(receiver.url, ("page",), new_secret(), await svc.store.last_seq())
            await subs.pause(sub.id)
            await fake.update_page(4, html="<p>first edit</p>")
            await settled(svc, fake)
            await fake.update_page(4, html="<p>second edit</p>")
            await settled(svc, fake)
            await fake.delete_page(4)
            await settled(svc, fake)
            await asyncio.sleep(0.3)
            assert receiver.received == []  # paused: nothing sent
            await subs.resume(sub.id)
            await caught_up(svc, sub.id)
        rows = [r for r in receiver.deduped() if r["entity_id"] == 4]
        assert [(r["op"], r["state"] and r["state"]["raw_html"]) for r in rows] == [
            ("upsert", "<p>first edit</p>"),
            ("upsert", "<p>second edit</p>"),
            ("delete", None),
        ]


async def test_failures_timeouts_and_500s_then_recovery_give_every_change_once(
    tmp_path: Path,
) -> None:
    """The receiver fails, answers 500, hangs past the timeout after taking the body (it may
    have processed it), drops the connection, then recovers. Deduped by webhook-id, it has
    every change exactly once and in order; every retry carried the same rows."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=2, seed=9)
        settings = settings_for(
            fake, tmp_path / "m.db", subscription_timeout=0.4, subscription_batch_size=3
        )
        secret = new_secret()
        rng = random.Random(12)
        async with Receiver(secret=secret, hang=0.8) as receiver, running(settings, fake) as svc:
            sub = await Subscriptions(svc.store).add(
                receiver.url, None, secret, await svc.store.last_seq()
            )
            # Each failure kind at least twice, then a random mix with successes.
            receiver.plan = [FAIL, HANG, DROP, FAIL, HANG, DROP] + [
                rng.choice([OK, FAIL, HANG, DROP, OK]) for _ in range(30)
            ]
            for page_id in range(1, 16):
                await fake.update_page(page_id, html=f"<p>flaky {page_id}</p>")
                await asyncio.sleep(0.05)
            await settled(svc, fake)
            await caught_up(svc, sub.id)
            expected = [r for r in await feed(svc) if r["seq"] > sub.cursor]
        behaviours = receiver.behaviours()
        assert {FAIL, HANG, DROP} <= set(behaviours[:6])
        assert all(r.verified for r in receiver.received)
        # Retries happened, and each carried the id (and rows) of the delivery it repeated.
        ids = [r.webhook_id for r in receiver.received]
        assert len(ids) > len(set(ids))
        assert receiver.deduped() == expected  # by_id() also checks one id, one set of rows
        assert [r["seq"] for r in expected] == sorted(r["seq"] for r in expected)
        assert len({r["seq"] for r in receiver.deduped()}) == len(expected)


async def test_a_paused_subscription_resumes_where_it_stopped(tmp_path: Path) -> None:
    """Failing for EVENTSYNC_SUBSCRIPTION_PAUSE_AFTER pauses it: one log line, `status`,
    metrics. Nothing is sent while paused. Resumed, it carries on from its cursor: first the
    delivery that kept failing, with its webhook-id, then what came since."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=10, books=1, seed=3)
        settings = settings_for(fake, tmp_path / "m.db", subscription_pause_after=1.0)
        async with Receiver(default=FAIL) as receiver, running(settings, fake) as svc:
            subs = Subscriptions(svc.store)
            start = await svc.store.last_seq()
            sub = await subs.add(receiver.url, None, new_secret(), start)
            with capture_logs() as logs:
                await fake.update_page(1, html="<p>before the pause</p>")

                async def paused() -> bool:
                    return (await subscription(svc, sub.id)).paused is not None

                await eventually(paused, timeout=15, what="paused")
            stuck = await subscription(svc, sub.id)
            assert stuck.paused == "failing" and stuck.cursor == start
            assert stuck.attempts >= 2 and stuck.last_status == 500
            said = [e for e in logs if e["event"].startswith("subscription paused")]
            assert len(said) == 1 and said[0]["subscription"] == sub.id, said
            assert said[0]["log_level"] == "error"
            status = (await svc.status())["subscriptions"]
            assert status[0]["state"] == "paused (failing)"
            assert status[0]["last_error"].startswith("HTTP 500")
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{svc.port}/metrics") as r,
            ):
                metrics = await r.text()
            assert f'eventsync_subscription_paused{{subscription="{sub.id}"}} 1.0' in metrics
            assert "eventsync_subscription_pauses_total 1.0" in metrics
            assert f'eventsync_deliveries_total{{outcome="failed",subscription="{sub.id}"}}' in (
                metrics
            )

            # Paused: nothing more is sent, however much happens.
            sent = len(receiver.received)
            await fake.update_page(2, html="<p>while paused</p>")
            await fake.create_page(book_id=1, name="Created while paused")
            await settled(svc, fake)
            await asyncio.sleep(1.5)
            assert len(receiver.received) == sent

            receiver.default = OK
            await subs.resume(sub.id)
            await caught_up(svc, sub.id)
            expected = [r for r in await feed(svc) if r["seq"] > start]
        after = receiver.received[sent:]
        assert after[0].webhook_id == stuck.batch_id  # the same delivery, the same id
        assert receiver.deduped() == expected


async def test_back_off_doubles_with_jitter_and_honours_retry_after(tmp_path: Path) -> None:
    for attempts in range(1, 8):
        nominal = RETRY_BASE * 2 ** (attempts - 1)
        delays = [backoff(attempts, cap=600) for _ in range(50)]
        assert all(nominal / 2 <= delay <= nominal for delay in delays)
        # Jittered: senders that failed together do not all come back at once.
        assert len(set(delays)) > 40 and min(delays) < 0.75 * nominal < max(delays)
    assert backoff(30, cap=600) <= 600
    assert backoff(1, cap=600, floor=7.0) == 7.0
    assert backoff(1, cap=5, floor=7.0) == 5  # never past the cap

    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=4, books=1, seed=1)
        settings = settings_for(fake, tmp_path / "m.db", subscription_retry_max=30.0)
        async with (
            Receiver(default=FAIL, plan=[BUSY], retry_after="2.5") as receiver,
            running(settings, fake) as svc,
        ):
            await Subscriptions(svc.store).add(receiver.url, None, new_secret(), 0)
            await wait_for_requests(receiver, 4, timeout=20)
        gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
        # 503 with Retry-After 2.5, then 500s: about 2 s, then 2-4 s... (jittered) apart.
        assert 2.4 <= gaps[0] <= 3.5, gaps
        assert 0.9 <= gaps[1] <= 2.5, gaps  # attempts 2: 2 s, jittered to 1-2
        assert 1.9 <= gaps[2] <= 4.5, gaps  # attempts 3: 4 s, jittered to 2-4


async def test_slow_and_dead_subscribers_slow_neither_the_mirror_nor_each_other(
    tmp_path: Path,
) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=10, books=1, seed=4)
        settings = settings_for(fake, tmp_path / "m.db", subscription_timeout=5.0)
        async with (
            Receiver(default=HANG, hang=30) as slow,
            Receiver() as healthy,
            running(settings, fake) as svc,
        ):
            subs = Subscriptions(svc.store)
            head = await svc.store.last_seq()
            await subs.add(slow.url, None, new_secret(), head)
            dead = await subs.add("http://127.0.0.1:9/nobody", None, new_secret(), head)
            good = await subs.add(healthy.url, None, new_secret(), head)
            for page_id in range(1, 6):
                changed = time.monotonic()
                await fake.update_page(page_id, html=f"<p>busy {page_id}</p>")

                async def in_feed(page_id: int = page_id) -> bool:
                    rows = await svc.store.changes(head, 1000)
                    return any(r["entity_id"] == page_id and r["entity"] == "page" for r in rows)

                await eventually(in_feed, timeout=5)
                mirrored = time.monotonic() - changed
                await caught_up(svc, good.id)
                delivered = time.monotonic() - changed
                # The hanging receiver holds its request for 5 s, the dead one is refused
                # and backing off: neither delays the mirror or the healthy subscriber. The
                # bound stays below that 5 s with room for a loaded machine.
                assert mirrored < 3.5 and delivered < 3.5, (page_id, mirrored, delivered)
            assert len(slow.received) <= 2  # one request in flight at a time
            assert (await subscription(svc, dead.id)).last_error.startswith("cannot connect")


async def test_private_addresses_are_refused_at_delivery_time(tmp_path: Path) -> None:
    """Subscriptions to loopback that passed `add` (the setting was on, or a name resolved
    to a public address then): with the setting off, nothing is sent, by IP literal or by a
    name that resolves to loopback now (DNS rebinding)."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=4, books=1, seed=1)
        settings = settings_for(fake, tmp_path / "m.db", subscriptions_allow_private=False)
        async with Receiver() as receiver, running(settings, fake) as svc:
            subs = Subscriptions(svc.store)
            port = receiver.url.split(":")[2].split("/")[0]
            literal = await subs.add(receiver.url, None, new_secret(), 0)
            named = await subs.add(f"http://localhost:{port}/hook", None, new_secret(), 0)
            mapped = await subs.add(f"http://[::ffff:127.0.0.1]:{port}/h", None, new_secret(), 0)

            async def refused(sub_id: int) -> bool:
                return (await subscription(svc, sub_id)).attempts >= 2

            for sub in (literal, named, mapped):
                await eventually(lambda s=sub: refused(s.id), timeout=10)
            errors = [
                (await subscription(svc, s.id)).last_error or "" for s in (literal, named, mapped)
            ]
        assert receiver.received == []
        for error in errors:
            assert "is a loopback address: refused" in error, error
            assert "EVENTSYNC_SUBSCRIPTIONS_ALLOW_PRIVATE=true" in error, error
        assert errors[1].startswith("localhost (127.0.0.1) is")
        assert errors[2].startswith("::ffff:7f00:1 is")  # as yarl writes ::ffff:127.0.0.1


async def test_redirects_are_not_followed(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=4, books=1, seed=1)
        settings = settings_for(fake, tmp_path / "m.db")
        async with Receiver() as target, Receiver(default=REDIRECT) as redirecting:
            redirecting.redirect_to = target.url
            async with running(settings, fake) as svc:
                sub = await Subscriptions(svc.store).add(redirecting.url, None, new_secret(), 0)
                await wait_for_requests(redirecting, 3)
                stuck = await subscription(svc, sub.id)
        assert target.received == []
        assert stuck.cursor == 0 and stuck.last_status == 307
        assert stuck.last_error is not None and "redirect" in stuck.last_error
        assert "not followed" in stuck.last_error


async def test_the_answer_is_read_with_a_cap(tmp_path: Path) -> None:
    """A 2xx with a body that never ends is acknowledged all the same, at once; a 500's huge
    body leaves a short last_error."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=4, books=1, seed=1)
        settings = settings_for(fake, tmp_path / "m.db", subscription_timeout=5.0)
        async with (
            Receiver(default=ENDLESS) as receiver,
            Receiver(default=HUGE) as failing,
            running(settings, fake) as svc,
        ):
            head = await svc.store.last_seq()
            sub = await Subscriptions(svc.store).add(receiver.url, None, new_secret(), 0)
            bad = await Subscriptions(svc.store).add(failing.url, None, new_secret(), 0)
            started = time.monotonic()
            await caught_up(svc, sub.id)
            assert time.monotonic() - started < 3.0
            assert (await subscription(svc, sub.id)).cursor == head
            assert receiver.deduped() == await feed(svc)
            await wait_for_requests(failing, 1)
            await eventually(lambda: _failed(svc, bad.id), timeout=10)
            error = (await subscription(svc, bad.id)).last_error or ""
        assert error.startswith("HTTP 500: yyyy") and len(error) <= 320, error[:400]


async def _failed(svc: Service, sub_id: int) -> bool:
    return (await subscription(svc, sub_id)).attempts >= 1


async def test_kinds_filter_and_replay(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=6, books=2, seed=6)
        settings = settings_for(fake, tmp_path / "m.db")
        async with Receiver() as receiver, running(settings, fake) as svc:
            subs = Subscriptions(svc.store)
            sub = await subs.add(receiver.url, ("page", "book"), new_secret(), 0)
            await fake.update_page(1, html="<p>kinds</p>")
            await fake.update_book(1, name="Kinds book")
            await fake.update_user(3, name="Not delivered")
            await settled(svc, fake)
            await caught_up(svc, sub.id)  # the cursor passes the rows of other kinds too
            assert receiver.deduped() == await feed(svc, ("page", "book"))
            assert {r["entity"] for r in receiver.deduped()} == {"page", "book"}
            first_ids = set(receiver.by_id())

            # Replay from seq 1: every row again, under new webhook-ids (a receiver that
            # dedups by id must take them).
            await subs.replay(sub.id, 0)
            count = len(receiver.deduped())
            await eventually(lambda: _more(receiver, 2 * count), timeout=15)
            await caught_up(svc, sub.id)
            again = receiver.deduped()[count:]
            assert again == await feed(svc, ("page", "book"))
            assert not first_ids & set(list(receiver.by_id())[len(first_ids) :])


async def _more(receiver: Receiver, rows: int) -> bool:
    return len(receiver.deduped()) >= rows


async def test_removed_and_operator_paused_subscriptions_stop(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=6, books=1, seed=7)
        settings = settings_for(fake, tmp_path / "m.db")
        async with Receiver() as kept, Receiver() as removed, running(settings, fake) as svc:
            subs = Subscriptions(svc.store)
            head = await svc.store.last_seq()
            a = await subs.add(kept.url, None, new_secret(), head)
            b = await subs.add(removed.url, None, new_secret(), head)
            await fake.update_page(1, html="<p>both</p>")
            await settled(svc, fake)
            await caught_up(svc, a.id)
            await caught_up(svc, b.id)
            await subs.remove(b.id)
            await subs.pause(a.id)
            before = (len(kept.received), len(removed.received))
            await asyncio.sleep(1.2)  # the tasks see it within delivery.REFRESH
            await fake.update_page(2, html="<p>neither</p>")
            await settled(svc, fake)
            await asyncio.sleep(1.2)
            assert (len(kept.received), len(removed.received)) == before
            await subs.resume(a.id)
            await caught_up(svc, a.id)
            assert kept.seqs() == [r["seq"] for r in await feed(svc) if r["seq"] > head]


async def test_a_replay_during_a_delivery_is_not_undone_by_its_answer(tmp_path: Path) -> None:
    """`replay` (from another process, as the CLI does) while a delivery is in flight: the
    2xx that comes afterwards must not move the cursor past the replayed rows."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=6, books=1, seed=8)
        settings = settings_for(fake, tmp_path / "m.db", subscription_timeout=5.0)
        async with (
            Receiver(plan=[SLOW], slow=1.0) as receiver,
            running(settings, fake) as svc,
        ):
            subs = Subscriptions(svc.store)
            head = await svc.store.last_seq()
            sub = await subs.add(receiver.url, None, new_secret(), head)
            with capture_logs() as logs:
                await fake.update_page(1, html="<p>in flight</p>")
                await eventually(lambda: _holding(receiver), timeout=10)
                await subs.replay(sub.id, 0)
                await eventually(lambda: _more(receiver, 1 + head), timeout=15)
                await caught_up(svc, sub.id)
            everything = await feed(svc)
        assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
        first = receiver.received[0].changes
        assert first[0]["seq"] > head
        assert receiver.received[1].changes[0]["seq"] == 1
        assert receiver.deduped() == first + everything


async def _holding(receiver: Receiver) -> bool:
    return receiver.in_flight > 0


async def test_a_receiver_outage_and_lossy_webhooks_lose_nothing(tmp_path: Path) -> None:
    """The receiver's process is gone for a while (connections refused) while BookStack's
    webhooks are dropped half the time (the audit log fills in): once it is back, deduped,
    it has exactly the change feed."""
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=2, seed=10)
        fake.faults.webhook_drop = 0.5
        fake.faults.seed = 10
        settings = settings_for(fake, tmp_path / "m.db", subscription_batch_size=4)
        secret = new_secret()
        receiver = await Receiver(secret=secret).start()
        try:
            async with running(settings, fake) as svc:
                sub = await Subscriptions(svc.store).add(receiver.url, None, secret, 0)
                for page_id in range(1, 6):
                    await fake.update_page(page_id, html=f"<p>before the outage {page_id}</p>")
                await settled(svc, fake)
                await receiver.stop()  # the receiver goes away
                for page_id in range(6, 16):
                    await fake.update_page(page_id, html=f"<p>during the outage {page_id}</p>")
                await fake.delete_page(16)
                await settled(svc, fake)
                await eventually(lambda: _failed(svc, sub.id), timeout=10)
                failing = await subscription(svc, sub.id)
                assert failing.cursor < await svc.store.last_seq()
                assert (failing.last_error or "").startswith("cannot connect")
                await receiver.start()  # back, on the same port
                await caught_up(svc, sub.id)
                expected = await feed(svc)
        finally:
            await receiver.stop()
        assert all(r.verified for r in receiver.received)
        assert receiver.deduped() == expected
        during = [r for r in expected if r["entity"] == "page" and r["entity_id"] >= 6]
        assert {r["entity_id"] for r in during} >= set(range(6, 17))
        assert ("delete", None) in [(r["op"], r["state"]) for r in during if r["entity_id"] == 16]
