"""`eventsync demo`: the bundled fake BookStack, `serve` against it, and a few live edits."""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from eventsync.app import open_app
from eventsync.config import Settings
from eventsync.events import DIFF_KEY, FETCH
from eventsync.service import Service
from eventsync.testing import FakeBookStack

RPM = 6000


async def run_demo(
    database: Path | None = None,
    *,
    listen: str = "127.0.0.1:0",
    out: TextIO = sys.stdout,
    pause: float = 0.6,
) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    workdir = None if database is not None else tempfile.TemporaryDirectory()
    db = database or Path(workdir.name) / "demo.db"  # type: ignore[union-attr]
    secret = secrets.token_urlsafe(24)
    try:
        async with FakeBookStack(requests_per_minute=RPM) as fake:
            fake.seed(pages=40, books=4, shelves=2, users=4, roles=2, attachments=6, seed=7)
            say(f"fake BookStack with sample content at {fake.url}")
            settings = Settings(
                bookstack_url=fake.url,
                bookstack_token_id=fake.token_id,
                bookstack_token_secret=fake.token_secret,
                webhook_secret=secret,
                database=db,
                listen=listen,
                requests_per_minute=RPM,
                poll_interval=2.0,
                sweep_share=0.0,
            )
            async with open_app(settings) as app:
                store = app.store
                service = Service(app)
                await service.start()
                say(f"eventsync serving on 127.0.0.1:{service.port}, mirror in {db}")
                await asyncio.wait_for(service.synced.wait(), 60)
                initial = await store.export()
                say(
                    "initial full sync done: "
                    + ", ".join(f"{len(v)} {k}" for k, v in initial.items())
                )
                fake.add_webhook(f"http://127.0.0.1:{service.port}/webhooks/bookstack/{secret}")
                seq = await store.last_seq()
                truth = fake.truth()
                page = truth["pages"][0]
                edits: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                    (
                        "update a page",
                        lambda: fake.update_page(page["id"], html="<p>Edited live</p>"),
                    ),
                    (
                        "create a page",
                        lambda: fake.create_page(
                            book_id=truth["books"][0]["id"],
                            name="Written during the demo",
                            html="<p>Hello from the demo</p>",
                        ),
                    ),
                    (
                        "rename a book",
                        lambda: fake.update_book(
                            truth["books"][1]["id"], name="Renamed in the demo"
                        ),
                    ),
                    (
                        "move a chapter",
                        lambda: fake.move_chapter(
                            truth["chapters"][0]["id"], truth["books"][2]["id"]
                        ),
                    ),
                    (
                        "restrict a page",
                        lambda: fake.set_permissions(
                            "page",
                            truth["pages"][1]["id"],
                            fallback={
                                "view": False,
                                "create": False,
                                "update": False,
                                "delete": False,
                            },
                        ),
                    ),
                    (
                        "create a user",
                        lambda: fake.create_user("Demo User", "demo@example.com", roles=[2]),
                    ),
                    ("delete a book", lambda: fake.delete_book(truth["books"][3]["id"])),
                ]
                for label, edit in edits:
                    started = time.monotonic()
                    await edit()
                    await asyncio.sleep(pause)
                    await service.dispatcher.drain(10)
                    rows = await store.changes(seq, 1000)
                    seq = rows[-1]["seq"] if rows else seq
                    summary = ", ".join(
                        sorted({f"{r['op']} {r['entity']} {r['entity_id']}" for r in rows})[:6]
                    )
                    more = "" if len(rows) <= 6 else f" (+{len(rows) - 6} more)"
                    say(
                        f"- {label}: {len(rows)} change(s) in "
                        f"{time.monotonic() - started:.2f} s: {summary}{more}"
                    )
                # What BookStack never announces (link rewrites after the move) is found by the
                # periodic diff sync (EVENTSYNC_RECONCILE_INTERVAL); run one now.
                before = await store.last_seq()
                await service.queue.enqueue(DIFF_KEY, [FETCH])
                await service.dispatcher.drain(30)
                say(
                    f"- periodic diff sync (catches silent changes such as link rewrites): "
                    f"{await store.last_seq() - before} change(s)"
                )
                mirror = await store.export()
                same = mirror == fake.truth()
                status = await service.status()
                say()
                say(
                    "the mirror now holds: " + ", ".join(f"{len(v)} {k}" for k, v in mirror.items())
                )
                say(f"API requests made: {status['api_requests']} (events: {status['events']})")
                say("mirror equals the fake BookStack's content: " + ("yes" if same else "NO"))
                say(
                    f"try: eventsync export / status / changes with EVENTSYNC_DATABASE={db}"
                    if database is not None
                    else ""
                )
                await service.stop()
                return 0 if same else 1
    finally:
        if workdir is not None:
            workdir.cleanup()
