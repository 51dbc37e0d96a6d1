"""`GET /changes/stream` (server-sent events) and the consumer library (`eventsync.consumer`):
ids are seqs, a reconnect with Last-Event-ID resumes exactly, commits wake the stream at once
(and other processes' commits within the fallback poll), kinds filter, heartbeats; `changes()`
follows the feed across a restart of serve; `verify()` accepts what eventsync signs and
nothing else."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import client_for, eventually, service_settings

from eventsync.app import open_app, open_store
from eventsync.config import Settings
from eventsync.consumer import FeedError, SignatureError, changes, verify
from eventsync.delivery import encode_row, new_secret, sign
from eventsync.service import Service
from eventsync.store.mirror import Store
from eventsync.store.subscriptions import Subscriptions
from eventsync.testing import FakeBookStack

SECRET = "stream-test-webhook-secret-0123456789"
RPM = 100_000

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_for(fake: FakeBookStack, db: Path, **extra: Any) -> Settings:
    defaults: dict[str, Any] = {
        "probe": False,
    }
    return service_settings(fake, db, SECRET, **{**defaults, **extra})


@asynccontextmanager
async def running(
    settings: Settings, fake: FakeBookStack, prepare: Callable[[Service], None] | None = None
) -> AsyncIterator[Service]:
    async with open_app(settings, client=client_for(fake)) as app:
        svc = Service(app)
        if prepare is not None:
            prepare(svc)
        await svc.start()
        try:
            await asyncio.wait_for(svc.synced.wait(), 30)
            fake.add_webhook(f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}")
            yield svc
        finally:
            fake.state.webhooks.clear()
            await svc.stop()


async def feed(store: Store, kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    return [json.loads(encode_row(r)) for r in await Subscriptions(store).rows(0, kinds)]


class Events:
    """A raw reader of one event stream (independent of eventsync.consumer): the lines as
    they come, grouped into events as the HTML standard does."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.lines: list[str] = []

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next block: {"id": ..., "data": ..., "comments": [...], "retry": ...}."""
        block: dict[str, Any] = {"comments": []}
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if line == "":
                    return block
                if line.startswith(":"):
                    block["comments"].append(line[1:].strip())
                    continue
                field, _, value = line.partition(": ")
                block[field] = value

    async def data(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next event with data (comments and id-only blocks skipped)."""
        while True:
            block = await self.next(timeout)
            if "data" in block:
                return block


@asynccontextmanager
async def stream(
    svc: Service, query: str = "", headers: dict[str, str] | None = None
) -> AsyncIterator[Events]:
    async with (
        aiohttp.ClientSession(read_bufsize=2**22) as http,
        http.get(
            f"http://127.0.0.1:{svc.port}/changes/stream{query}", headers=headers or {}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        yield Events(response)


async def settled(svc: Service, fake: FakeBookStack) -> None:
    async def same() -> bool:
        return await svc.store.export() == fake.truth()

    await eventually(same, timeout=20, what="the mirror equals BookStack")


# ---- the stream ---------------------------------------------------------------------------------


async def test_ids_are_seqs_and_last_event_id_resumes_exactly(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=10, books=2, seed=1)
        async with running(settings_for(fake, tmp_path / "m.db"), fake) as svc:
            head = await svc.store.last_seq()
            everything = await feed(svc.store)
            async with stream(svc, "?after=0") as events:
                opening = await events.next()
                assert opening["retry"] == "2000"
                got = []
                while len(got) < head:
                    block = await events.data()
                    got.append(block)
            assert [int(b["id"]) for b in got] == list(range(1, head + 1))
            assert [json.loads(b["data"]) for b in got] == everything

            # Meanwhile (disconnected): three changes. A reconnect with Last-Event-ID gets
            # exactly those, even with ?after= saying otherwise (EventSource keeps the URL).
            for page_id in (1, 2, 3):
                await fake.update_page(page_id, html=f"<p>while away {page_id}</p>")
            await settled(svc, fake)
            new_head = await svc.store.last_seq()
            async with stream(svc, "?after=0", {"Last-Event-ID": str(head)}) as events:
                resumed = [await events.data() for _ in range(new_head - head)]
            later = [r for r in await feed(svc.store) if r["seq"] > head]
            assert [json.loads(b["data"]) for b in resumed] == later
            assert [r["entity_id"] for r in later if r["entity"] == "page"] == [1, 2, 3]
            assert later[0]["state"]["raw_html"] == "<p>while away 1</p>"


async def test_commits_wake_the_stream_at_once_and_other_writers_within_the_poll(
    tmp_path: Path,
) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=6, books=1, seed=2)

        def no_fallback(svc: Service) -> None:
            svc.feed.poll = 60.0  # only this process's commit notifications can wake it

        async with (
            running(settings_for(fake, tmp_path / "m.db"), fake, no_fallback) as svc,
            stream(svc) as events,  # no after: from now on
        ):
            await events.next()
            changed = time.monotonic()
            await fake.update_page(2, html="<p>woken</p>")
            block = await events.data(timeout=5)
            woke = time.monotonic() - changed
            row = json.loads(block["data"])
            assert (row["entity"], row["entity_id"]) == ("page", 2)
            assert woke < 5.0, woke  # webhook, job, commit, event: not the 60 s poll

        async with (
            running(settings_for(fake, tmp_path / "m.db"), fake) as svc,
            stream(svc) as events,
        ):
            await events.next()
            # Another connection (as `eventsync reconcile` in another process would):
            # its commit notifies nobody here; the fallback poll finds it.
            async with await open_store(svc.settings.database) as other:
                async with other.transaction() as tx:
                    await tx.change("upsert", "page", 4242)
                written = time.monotonic()
            block = await events.data(timeout=5)
            assert json.loads(block["data"])["entity_id"] == 4242
            assert time.monotonic() - written < 2.0


async def test_kinds_filter_heartbeats_and_ids_past_filtered_rows(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=6, books=2, seed=3)
        settings = settings_for(fake, tmp_path / "m.db", stream_heartbeat=0.3)
        async with running(settings, fake) as svc:
            async with stream(svc, "?kinds=book") as events:
                await events.next()
                await fake.update_page(1, html="<p>not for this stream</p>")
                await fake.update_book(2, name="For this stream")
                block = await events.data()
                assert json.loads(block["data"])["entity"] == "book"
                await fake.update_page(3, html="<p>filtered out</p>")
                await settled(svc, fake)
                head = await svc.store.last_seq()
                # Quiet now: heartbeats, and an id with no data that moves the client's
                # Last-Event-ID past the page rows it never saw.
                seen: list[dict[str, Any]] = []
                async with asyncio.timeout(5):
                    while not any(b.get("id") == str(head) for b in seen):
                        seen.append(await events.next(timeout=3))
                seen.append(await events.next(timeout=3))
                assert all("data" not in b for b in seen)
                assert any("keep-alive" in b["comments"] for b in seen)
            async with stream(svc, "?kinds=book", {"Last-Event-ID": str(head)}) as events:
                await events.next()
                await fake.update_book(1, name="Only this")
                row = json.loads((await events.data())["data"])
                assert (row["entity"], row["entity_id"], row["seq"] > head) == ("book", 1, True)


@pytest.mark.parametrize(
    ("query", "headers", "says"),
    [
        ("?kinds=pages", {}, "unknown kind 'pages'"),
        ("?after=-1", {}, "after must be between"),
        ("?after=x", {}, "after must be a change-feed seq"),
        ("", {"Last-Event-ID": "abc"}, "Last-Event-ID must be"),
        ("", {"Last-Event-ID": str(2**63)}, "Last-Event-ID must be between"),
    ],
)
async def test_bad_stream_parameters_are_400(
    tmp_path: Path, query: str, headers: dict[str, str], says: str
) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=2, books=1, seed=4)
        async with running(settings_for(fake, tmp_path / "m.db"), fake) as svc:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"http://127.0.0.1:{svc.port}/changes/stream{query}", headers=headers
                ) as r,
            ):
                assert r.status == 400
                body = await r.json()
            assert says in body["error"]["message"], body


# ---- the consumer library -----------------------------------------------------------------------


async def test_changes_follows_the_feed_across_a_restart_and_resumes_from_a_stored_seq(
    tmp_path: Path,
) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=8, books=1, seed=5)
        settings = settings_for(fake, tmp_path / "m.db", listen=f"127.0.0.1:{free_port()}")
        url = f"http://{settings.listen}"
        got: list[dict[str, Any]] = []
        stored = 0  # the seq an indexer would persist

        async def indexer() -> None:
            nonlocal stored
            async for change in changes(url, after=stored, reconnect_max=0.3):
                got.append(change)
                stored = change["seq"]

        consumer = None
        try:
            async with running(settings, fake) as svc:
                consumer = asyncio.create_task(indexer())
                head = await svc.store.last_seq()
                await eventually(lambda: _reached(got, head), timeout=15)
            # serve is down: the consumer keeps trying. Changes meanwhile reach the mirror
            # through the audit log once serve is back.
            await fake.update_page(1, html="<p>while serve was down</p>")
            await asyncio.sleep(0.8)
            async with running(settings, fake) as svc:
                await fake.update_page(2, html="<p>after the restart</p>")
                await settled(svc, fake)
                head = await svc.store.last_seq()
                await eventually(lambda: _reached(got, head), timeout=15)
                assert got == await feed(svc.store)

                # Stopped, and started again from the stored seq: exactly the rest.
                consumer.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await consumer
                consumer = None
                await fake.update_page(3, html="<p>after the indexer stopped</p>")
                await settled(svc, fake)
                rest = []
                async for change in changes(url, after=stored, kinds=["page"]):
                    rest.append(change)
                    if change["entity_id"] == 3:
                        break
                expected = [r for r in await feed(svc.store, ("page",)) if r["seq"] > stored]
                assert rest == expected and rest
        finally:
            if consumer is not None:
                consumer.cancel()


async def _reached(got: list[dict[str, Any]], seq: int) -> bool:
    return bool(got) and got[-1]["seq"] >= seq


async def test_changes_raises_feed_error_on_a_4xx(tmp_path: Path) -> None:
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=2, books=1, seed=6)
        async with running(settings_for(fake, tmp_path / "m.db"), fake) as svc:
            with pytest.raises(FeedError) as caught:
                async with asyncio.timeout(10):  # retrying it would never end
                    async for _ in changes(f"http://127.0.0.1:{svc.port}", kinds=["nope"]):
                        pass
            assert caught.value.status == 400 and "unknown kind" in str(caught.value)


def test_verify_accepts_what_eventsync_signs_and_nothing_else() -> None:
    secret = new_secret()
    body = json.dumps({"changes": [{"seq": 1, "entity": "page", "state": None}]})
    now = int(time.time())

    def headers(timestamp: int = now, key: str = secret, text: str = body) -> dict[str, str]:
        return {
            "Webhook-Id": "msg_1",  # any case: HTTP header names are case-insensitive
            "Webhook-Timestamp": str(timestamp),
            "Webhook-Signature": sign(key, "msg_1", timestamp, text),
        }

    assert verify(headers(), body.encode(), secret) == json.loads(body)
    assert verify(headers(), body, secret)["changes"][0]["seq"] == 1
    other = new_secret()
    tampered = body.replace('"seq": 1', '"seq": 2')
    bad: list[tuple[dict[str, str], str | bytes, str]] = [
        (headers(), tampered, secret),  # body changed
        (headers(key=other), body, secret),  # signed with another secret
        (headers(timestamp=now - 600), body, secret),  # replayed ten minutes later
        (headers(timestamp=now + 600), body, secret),
        ({**headers(), "Webhook-Id": "msg_2"}, body, secret),  # id changed
        ({k: v for k, v in headers().items() if k != "Webhook-Id"}, body, secret),
        ({**headers(), "Webhook-Signature": "garbage"}, body, secret),
        ({**headers(), "Webhook-Signature": "v1,@@@"}, body, secret),
        ({**headers(), "Webhook-Timestamp": "soon"}, body, secret),
        (headers(), b"\xff\xfe", secret),
        (headers(), body, "not-a-whsec-secret!"),
        (headers(), body, "whsec_"),
    ]
    for hdrs, text, key in bad:
        with pytest.raises(SignatureError):
            verify(hdrs, text, key)
    # A second signature (a secret being rotated) is accepted if one of them matches.
    rotated = {
        **headers(),
        "Webhook-Signature": f"{headers(key=other)['Webhook-Signature']} "
        f"{headers()['Webhook-Signature']}",
    }
    assert verify(rotated, body, secret) == json.loads(body)
    assert base64.b64decode(secret.removeprefix("whsec_"))
