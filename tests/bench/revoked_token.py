"""A revoked token (DESIGN guarantee 15): an in-process Service against the fake BookStack,
with webhooks and the audit log and the production probe schedule (5 s, doubling to 120 s).
The sync token is revoked for `--seconds` while `--changes` changes happen (their webhooks
arrive, their audit rows pile up behind the cursor), then restored.

Reports the API requests sent during the revocation, by route and status (goal: a handful,
bounded by the probe schedule, not the request budget), whether /readyz failed and `status`
named the refusal meanwhile, dead letters (goal: none), and how long after the restore the
mirror equalled `fake.truth()` (goal: within one probe interval plus a poll).

    .venv/bin/python tests/bench/revoked_token.py [--seconds 30] [--changes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from pathlib import Path

import aiohttp

from eventsync.app import open_app
from eventsync.config import Settings
from eventsync.logging import configure_logging
from eventsync.service import Service
from eventsync.testing import FakeBookStack

SECRET = "bench-revoked-secret-0123456789"
RPM = 100_000


async def run(args: argparse.Namespace) -> None:
    configure_logging("json", "error")
    db = Path(tempfile.mkdtemp(prefix="eventsync-revoked-")) / "revoked.db"
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=100, books=5, seed=args.seed)
        settings = Settings(
            bookstack_url=fake.url,
            bookstack_token_id=fake.token_id,
            bookstack_token_secret=fake.token_secret,
            webhook_secret=SECRET,
            database=db,
            listen="127.0.0.1:0",
            requests_per_minute=RPM,
            poll_interval=args.poll_interval,
            sweep_share=0.0,
        )
        async with (
            open_app(settings) as app,
            aiohttp.ClientSession() as http,
        ):
            svc = Service(app)
            await svc.start()
            try:
                await asyncio.wait_for(svc.synced.wait(), 60)
                fake.add_webhook(f"http://127.0.0.1:{svc.port}/webhooks/bookstack/{SECRET}")
                await svc.dispatcher.drain(30)
                before = len(fake.requests)
                fake.revoke_token()
                started = time.monotonic()
                pages = sorted(fake.state.pages)
                spacing = args.seconds / max(1, args.changes) / 2
                for i in range(args.changes):
                    await fake.update_page(pages[i % len(pages)], html=f"<p>revoked {i}</p>")
                    await asyncio.sleep(spacing)
                async with http.get(f"http://127.0.0.1:{svc.port}/readyz") as response:
                    readyz = response.status
                status = (await svc.status())["token_rejected"]
                await asyncio.sleep(max(0.0, args.seconds - (time.monotonic() - started)))
                during = fake.requests[before:]
                fake.restore_token()
                restored = time.monotonic()
                deadline = restored + 300
                while await svc.store.export() != fake.truth():
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                converged = await svc.store.export() == fake.truth()
                caught_up = time.monotonic() - restored
                dead = len(await svc.queue.dead_letters())
            finally:
                await svc.stop()

    by_route = collections.Counter(f"{r.route or r.path} {r.status}" for r in during)
    print(f"revoked for {args.seconds:.0f} s while {args.changes} pages changed")
    print(f"API requests during the revocation: {len(during)}")
    for route, n in by_route.most_common():
        print(f"  {n:5d}  {route}")
    print(f"/readyz during: {readyz}   status token_rejected: {'set' if status else 'NOT set'}")
    print(f"dead letters: {dead}")
    print(
        f"mirror {'converged' if converged else 'did NOT converge'} "
        f"{caught_up:.1f} s after the token was restored"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
