"""`eventsync serve` and the other commands as real subprocesses (DESIGN guarantees 1, 3, 4,
11, 12; the command line): kill -9 after accept, SIGTERM, secrets in logs, the change feed,
dead letters, the database file mode, reconcile while serve runs.

The fake BookStack runs in the test's event loop, so every child process is started with
asyncio.create_subprocess_exec: a blocking wait would stop the fake from answering."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import database_value, eventually, first_difference

from eventsync.app import open_store
from eventsync.testing import FakeBookStack
from eventsync.testing.models import ALL_PERMISSIONS

# Long and unique, so finding it anywhere in the output is unambiguous.
WEBHOOK_SECRET = "whsec-test-serve-7f3a9c21e8b64d05a1c2e3f4"
RPM = 100_000
READY_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(90)


# ---- helpers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(database: Path | str) -> dict[str, str]:
    # No EVENTSYNC_* from the developer's shell, no systemd socket: only what the test sets.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EVENTSYNC_") and k != "NOTIFY_SOCKET"
    }
    env["EVENTSYNC_DATABASE"] = database_value(database)
    env["EVENTSYNC_LOG_FORMAT"] = "json"
    return env


def serve_env(
    fake: FakeBookStack,
    database: Path | str,
    port: int,
    *,
    token: tuple[str, str] | None = None,
    **extra: str,
) -> dict[str, str]:
    token_id, token_secret = token or (fake.token_id, fake.token_secret)
    env = base_env(database)
    env.update(
        {
            "EVENTSYNC_BOOKSTACK_URL": fake.url,
            "EVENTSYNC_BOOKSTACK_TOKEN_ID": token_id,
            "EVENTSYNC_BOOKSTACK_TOKEN_SECRET": token_secret,
            "EVENTSYNC_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "EVENTSYNC_LISTEN": f"127.0.0.1:{port}",
            "EVENTSYNC_POLL_INTERVAL": "0.3",
            "EVENTSYNC_REQUESTS_PER_MINUTE": str(RPM),
            # The sweep re-reads permissions continuously; it would blur request counts and
            # (in the crash test) fill in what the webhooks are supposed to deliver.
            "EVENTSYNC_SWEEP_SHARE": "0",
        }
    )
    env.update(extra)
    return env


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


async def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 30.0) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventsync",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@dataclass
class Serve:
    proc: asyncio.subprocess.Process
    port: int
    stdout: Path
    stderr: Path
    env: dict[str, str]
    _files: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/webhooks/bookstack/{WEBHOOK_SECRET}"

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.url}/status") as r:
            assert r.status == 200
            data: dict[str, Any] = await r.json()
            return data

    async def wait_ready(self) -> None:
        """/healthz answers, then /status says the initial sync is done."""
        deadline = time.monotonic() + READY_TIMEOUT
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.output()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"serve not ready in time:\n{self.output()[-3000:]}")
                try:
                    async with session.get(f"{self.url}/healthz") as r:
                        healthy = r.status == 200
                    if healthy and (await self.status(session)).get("synced") is True:
                        return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    async def wait_idle(self, timeout: float = 20.0) -> None:
        """Nothing queued and nothing in flight."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                data = await self.status(session)
                if data["queue_depth"] == 0 and data["in_flight"] == 0:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"serve did not go idle: {data}")
                await asyncio.sleep(0.05)

    async def terminate(self, timeout: float = 5.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    def close_files(self) -> None:
        for f in self._files:
            f.close()


async def start_serve(env: dict[str, str], cwd: Path, name: str = "serve") -> Serve:
    port = int(env["EVENTSYNC_LISTEN"].rpartition(":")[2])
    stdout, stderr = cwd / f"{name}.out", cwd / f"{name}.err"
    # Files, not pipes: nobody has to keep reading them, and they survive the process.
    out_f, err_f = stdout.open("ab"), stderr.open("ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eventsync", "serve", env=env, cwd=cwd, stdout=out_f, stderr=err_f
    )
    return Serve(proc, port, stdout, stderr, env, [out_f, err_f])


@asynccontextmanager
async def serving(env: dict[str, str], cwd: Path, name: str = "serve") -> AsyncIterator[Serve]:
    serve = await start_serve(env, cwd, name)
    try:
        await serve.wait_ready()
        yield serve
    finally:
        await serve.kill()
        serve.close_files()


async def export(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    result = await run_cli("export", env=env, cwd=cwd)
    assert result.code == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


async def converges(env: dict[str, str], cwd: Path, fake: FakeBookStack) -> None:
    last: dict[str, Any] = {}

    async def equal() -> bool:
        nonlocal last
        last = await export(env, cwd)
        return last == fake.truth()

    try:
        await eventually(equal, timeout=20.0)
    except AssertionError:
        raise AssertionError(first_difference(last, fake.truth())) from None


def file_modes(folder: Path, pattern: str) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.glob(pattern)}


def sql_one(database: Path, query: str, params: tuple[Any, ...] = ()) -> Any:
    """Read the file directly, as an operator would after a crash."""
    with sqlite3.connect(database) as db:
        return db.execute(query, params).fetchone()


def sql_all(database: Path, query: str) -> list[Any]:
    with sqlite3.connect(database) as db:
        return db.execute(query).fetchall()


async def post_json(
    session: aiohttp.ClientSession, url: str, body: Any, **headers: str
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    hdrs = {"Content-Type": "application/json", **headers}
    async with session.post(url, data=data, headers=hdrs) as r:
        try:
            payload = await r.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            payload = {}
        return r.status, payload if isinstance(payload, dict) else {}


def included_pages(fake: FakeBookStack) -> set[int]:
    """Pages some other page includes with {{@id}}."""
    found: set[int] = set()
    for page in fake.state.pages.values():
        found.update(int(m) for m in re.findall(r"\{\{@(\d+)", page.html))
    return found


def nowhere_url() -> str:
    """A loopback port nobody listens on: the fake records each delivery's body and fails
    to send it at once (connection refused), so tests get BookStack's real webhook bodies
    without eventsync seeing them."""
    return f"http://127.0.0.1:{free_port()}/captured"


async def sync_token_without_audit_access(fake: FakeBookStack) -> tuple[str, str]:
    """A token whose role has everything but 'Manage app settings', which BookStack requires
    (with 'Manage users') to read the audit log (api.py: list_audit_log). Content
    permissions need only 'restrictions-manage-all', users and roles their own permissions,
    and with *-view-all and no entity restrictions the user sees what the admin sees."""
    permissions = [p for p in ALL_PERMISSIONS if p != "settings-manage"]
    role_id = await fake.create_role("Sync without audit", permissions=permissions)
    user_id = await fake.create_user("Sync bot", "sync-bot@example.com", roles=[role_id])
    token = ("sync-no-audit-id", "sync-no-audit-secret-5d8e1f2a9b")
    fake.add_token(user_id, *token)
    return token


# ---- 1. kill -9 right after the last 2xx --------------------------------------------------------


@pytest.mark.parametrize("no_audit_log", ["no access", "no audit-log API"])
async def test_kill_after_accept_loses_no_accepted_webhook(
    tmp_path: Path, no_audit_log: str
) -> None:
    db = tmp_path / "mirror.db"
    # "no audit-log API": a BookStack before v23.08, which has none at all.
    async with FakeBookStack(
        requests_per_minute=RPM, audit_log=no_audit_log == "no access"
    ) as fake:
        # No entity restrictions: the sync user below must see exactly what the admin sees.
        fake.seed(pages=40, books=4, shelves=2, permission_share=0.0, seed=11)
        # "Nothing lost" must mean the webhooks were kept, not that the audit log filled in
        # afterwards: serve gets a token that cannot read the audit log (or a BookStack that
        # has none), so the accepted webhooks are the only record of these changes (the
        # periodic diff sync is an hour away and the sweep is off). Clearing the audit log
        # instead would look like a gap, and the diff sync it triggers would repair the
        # mirror whatever the inbox kept.
        token = None
        if no_audit_log == "no access":
            token = await sync_token_without_audit_access(fake)
        env = serve_env(fake, db, free_port(), token=token)

        async with serving(env, tmp_path, "serve-1") as serve:
            async with aiohttp.ClientSession() as session:
                status = await serve.status(session)
                assert (status["audit_access"], status["audit_log"]) == (False, no_audit_log)
            # Real bodies, captured from the fake without eventsync seeing them.
            fake.add_webhook(nowhere_url())
            plain = [p for p in sorted(fake.state.pages) if p not in included_pages(fake)]
            for page_id in plain[:25]:
                await fake.update_page(page_id, html=f"<p>crash test edit {page_id}</p>")
            # Only changes whose webhook tells the whole story: a rename or a move would also
            # rewrite links in other pages silently, and an edit of an included page changes
            # the rendered html of the pages including it (FACTS 2.5).
            await fake.update_book(2, description="Described before the crash")
            new_page = await fake.create_page(book_id=1, name="Born before the crash")
            await fake.update_page(new_page, html="<p>and edited</p>")
            await fake.delete_page(plain[-1])
            chapter = await fake.create_chapter(4, "Chapter before the crash")
            await fake.create_page(chapter_id=chapter, name="In the new chapter")
            bodies = [d.body for d in fake.webhook_deliveries]
            assert len(bodies) == 31 and all(d.error for d in fake.webhook_deliveries)
            # Each change twice, as BookStack does with two webhooks configured (the bodies
            # differ in webhook_id and webhook_name only): 2 events, 1 job per entity
            # (guarantee 3).
            second = [{**b, "webhook_id": 99, "webhook_name": "second hook"} for b in bodies]
            burst = bodies + second
            # Slow BookStack reads: at the kill most jobs are still queued or leased.
            fake.faults.latency = 0.5
            async with aiohttp.ClientSession() as session:
                results = await asyncio.gather(
                    *(post_json(session, serve.webhook_url, b) for b in burst)
                )
                serve.proc.kill()  # SIGKILL right after the last 2xx: no grace at all
            await serve.proc.wait()

        statuses = [status for status, _ in results]
        assert statuses == [202] * len(burst), statuses
        # Said once (by the first sync), not once per poll; and no gap from it.
        lines = serve.output().splitlines()
        said = [line for line in lines if "running on webhooks and periodic diff syncs" in line]
        assert len(said) == 1, said
        assert not [line for line in lines if "gap" in line.lower()]
        assert not [line for line in lines if '"level": "error"' in line]
        outcomes = [payload.get("outcome") for _, payload in results]
        assert "duplicate" not in outcomes
        # Every accepted event is in the inbox, and the jobs are one per entity.
        (stored,) = sql_one(db, "SELECT count(*) FROM events WHERE source = 'webhook'")
        assert stored == len(burst)
        keys = {
            k
            for (k,) in sql_all(db, "SELECT DISTINCT entity_key FROM events WHERE source='webhook'")
        }
        jobs = [k for (k,) in sql_all(db, "SELECT key FROM jobs")]
        assert len(jobs) == len(set(jobs))
        assert set(jobs) <= keys | {"diff:0"}
        assert jobs, "every job finished before the kill: the test proves nothing"
        assert f"chapter:{chapter}" in keys and f"page:{new_page}" in keys

        fake.faults.latency = 0.0
        assert await export(env, tmp_path) != fake.truth()
        # Restart on the same file: leases of the dead process are released, the jobs run.
        async with serving(env, tmp_path, "serve-2") as serve:
            await serve.wait_idle()
            await converges(env, tmp_path, fake)
            assert await serve.terminate() == 0


# ---- 2. SIGTERM --------------------------------------------------------------------------------


async def test_sigterm_exits_promptly_and_leaves_no_lease(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=40, books=4, seed=5)
        env = serve_env(fake, db, free_port())
        serve = await start_serve(env, tmp_path)
        try:
            await serve.wait_ready()
            fake.add_webhook(serve.webhook_url)
            # Each read takes a while, so jobs are in flight when the signal arrives.
            # (The fake's webhook POSTs are not API calls: they are not slowed down.)
            fake.faults.latency = 0.8
            for page_id in range(1, 13):
                await fake.update_page(page_id, html=f"<p>sigterm {page_id}</p>")

            async def busy() -> bool:
                async with aiohttp.ClientSession() as session:
                    return int((await serve.status(session))["in_flight"]) > 0

            await eventually(busy, timeout=10.0)
            started = time.monotonic()
            serve.proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(serve.proc.wait(), 5.0)
            took = time.monotonic() - started
        finally:
            await serve.kill()
            serve.close_files()
        assert code == 0, serve.output()[-3000:]
        assert took < 5.0
        with pytest.raises(aiohttp.ClientConnectorError):
            async with aiohttp.ClientSession() as session:
                await post_json(session, serve.webhook_url, {"event": "page_update"})
        # Finished or put back: no row is left leased by the dead process.
        assert sql_all(db, "SELECT key, leased_by FROM jobs WHERE leased_by IS NOT NULL") == []
        # And what was put back is done by the next run.
        fake.faults.latency = 0.0
        async with serving(env, tmp_path, "serve-2") as again:
            await again.wait_idle()
            await converges(env, tmp_path, fake)
            assert await again.terminate() == 0


# ---- 3. secrets --------------------------------------------------------------------------------


async def test_secrets_never_in_logs_status_or_errors(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=30, books=3, seed=2)
        env = serve_env(fake, db, free_port(), EVENTSYNC_LOG_LEVEL="debug")
        secrets = [WEBHOOK_SECRET, fake.token_secret]
        async with serving(env, tmp_path) as serve:
            fake.add_webhook(serve.webhook_url)
            # Retries and failures get logged: make some happen while real webhooks arrive.
            fake.faults.error_rate = 0.3
            for page_id in range(1, 6):
                await fake.update_page(page_id, html=f"<p>secret test {page_id}</p>")
            await fake.update_book(1, name="Book renamed")
            base = f"{serve.url}/webhooks/bookstack"
            async with aiohttp.ClientSession() as session:
                bad = [
                    # wrong secrets, one of them a prefix of the real one
                    await post_json(session, f"{base}/wrong-secret-0000000000", {"event": "x"}),
                    await post_json(session, f"{base}/{WEBHOOK_SECRET[:-1]}", {"event": "x"}),
                    # bad requests on the right URL, the secret echoed in the query and body
                    await post_json(session, f"{serve.webhook_url}?s={WEBHOOK_SECRET}", b"{nope"),
                    await post_json(session, serve.webhook_url, {"text": "no event"}),
                    await post_json(session, serve.webhook_url, "[]"),
                ]
                async with session.post(
                    serve.webhook_url, data=b"x", headers={"Content-Type": "text/plain"}
                ) as r:
                    bad.append((r.status, {}))
                async with session.get(serve.webhook_url) as r:
                    bad.append((r.status, {}))
                # Unknown but well-formed: accepted and ignored (guarantee 11).
                unknown = await post_json(
                    session,
                    serve.webhook_url,
                    {"event": "some_future_event", "text": "x", "triggered_at": "2024-01-01"},
                )
                fake.faults.error_rate = 0.0
                await serve.wait_idle()
                async with session.get(f"{serve.url}/status") as r:
                    status_body = await r.text()
                async with session.get(f"{serve.url}/metrics") as r:
                    metrics_body = await r.text()
                async with session.get(f"{serve.url}/readyz") as r:
                    readyz_body = await r.text()
            cli_status = await run_cli("status", "--json", env=env, cwd=tmp_path)
            cli_status_text = await run_cli("status", env=env, cwd=tmp_path)
            check = await run_cli("check", env=env, cwd=tmp_path)
            assert await serve.terminate() == 0
        codes = [code for code, _ in bad]
        assert codes[:2] == [404, 404]
        assert all(400 <= c < 500 for c in codes), codes
        assert unknown[0] == 202, unknown
        assert cli_status.code == 0 and json.loads(cli_status.stdout)["database"] == str(db)
        assert json.loads(status_body)["synced"] is True
        log = serve.output()
        assert '"route": "/webhooks/bookstack/{secret}"' in log  # the webhooks were logged
        # Every line is one whole JSON object (nothing interleaved by another thread), and
        # each unit of work is one line naming its entity, event (`activity`: the BookStack
        # event type), source, attempt and outcome.
        lines = [
            json.loads(line)
            for part in (serve.stdout, serve.stderr)
            for line in part.read_text(errors="replace").splitlines()
            if line.startswith("{")
        ]
        jobs = [line for line in lines if line.get("event") == "job done"]
        page_jobs = [j for j in jobs if j.get("entity") == "page:1"]
        assert page_jobs, "no job line for page 1"
        first = page_jobs[0]
        assert first["attempt"] >= 1 and first["outcome"] and first["activity"]
        assert first["source"] in ("webhook", "audit", "audit,webhook", "eventsync")
        texts = {
            "serve output": log,
            "GET /status": status_body,
            "GET /metrics": metrics_body,
            "GET /readyz": readyz_body,
            "status --json": cli_status.stdout + cli_status.stderr,
            "status": cli_status_text.stdout + cli_status_text.stderr,
            "check": check.stdout + check.stderr,
        }
        for where, text in texts.items():
            for secret in secrets:
                assert secret not in text, f"a secret appears in {where}"


# ---- 4. change feed ----------------------------------------------------------------------------


async def test_changes_command_prints_ndjson_and_follows(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=20, books=2, seed=4)
        env = serve_env(fake, db, free_port())
        async with serving(env, tmp_path) as serve:
            fake.add_webhook(serve.webhook_url)
            listed = await run_cli("changes", "--after", "0", env=env, cwd=tmp_path)
            assert listed.code == 0, listed.stderr
            rows = [json.loads(line) for line in listed.stdout.splitlines()]
            assert len(rows) > 20  # the initial sync wrote every entity
            seqs = [r["seq"] for r in rows]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            later = await run_cli("changes", "--after", str(seqs[-5]), env=env, cwd=tmp_path)
            assert [json.loads(x)["seq"] for x in later.stdout.splitlines()] == seqs[-4:]

            follow = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "eventsync",
                "changes",
                "--after",
                str(seqs[-1]),
                "--follow",
                "--interval",
                "0.1",
                env=env,
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                await asyncio.sleep(1.0)  # it is running and has printed nothing yet
                assert follow.returncode is None
                await fake.update_page(3, name="Followed rename")
                assert follow.stdout is not None
                line = await asyncio.wait_for(follow.stdout.readline(), 15.0)
                change = json.loads(line)
                assert change["seq"] > seqs[-1]
                assert (change["entity"], change["entity_id"]) == ("page", 3), change
            finally:
                follow.kill()
                await follow.wait()
            assert await serve.terminate() == 0


# ---- 5. dead letters ---------------------------------------------------------------------------


async def test_dead_letters_commands_on_an_empty_database(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    async with await open_store(db):
        pass
    env = base_env(db)  # no BookStack settings: these commands need only the database
    listed = await run_cli("dead-letters", "list", env=env, cwd=tmp_path)
    assert (listed.code, listed.stdout.strip()) == (0, "no dead letters"), listed
    missing = await run_cli("dead-letters", "retry", "999", env=env, cwd=tmp_path)
    assert missing.code == 2
    assert "999" in missing.stderr and "no dead letter" in missing.stderr
    assert "Traceback" not in missing.stderr
    bare = await run_cli("dead-letters", "retry", env=env, cwd=tmp_path)
    assert bare.code == 2
    assert "ID or --all" in bare.stderr and "Traceback" not in bare.stderr
    retry_all = await run_cli("dead-letters", "retry", "--all", env=env, cwd=tmp_path)
    assert retry_all.code == 0 and retry_all.stdout.startswith("0 dead letter")


# ---- 6. database file mode ---------------------------------------------------------------------


async def test_database_file_is_private(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=10, books=1, seed=1)
        async with serving(serve_env(fake, db, free_port()), tmp_path) as serve:
            assert stat.S_IMODE(db.stat().st_mode) == 0o600
            # The WAL and shared-memory files hold the same data; SQLite gives them the
            # database file's mode.
            assert file_modes(tmp_path, "mirror.db*") == {
                p: 0o600 for p in file_modes(tmp_path, "mirror.db*")
            }
            assert await serve.terminate() == 0
        assert stat.S_IMODE(db.stat().st_mode) == 0o600


# ---- 7. reconcile while serve runs -------------------------------------------------------------


async def test_reconcile_while_serve_runs(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"

    # BookStack's clock an hour behind: reconcile's closing listing diff then has no row
    # "changed within the second of its read" to re-read (the same-second guard), so every
    # page read below is a read of a change.
    def an_hour_behind() -> datetime:
        return datetime.now(UTC) - timedelta(hours=1)

    async with FakeBookStack(requests_per_minute=RPM, clock=an_hour_behind) as fake:
        fake.seed(pages=40, books=4, seed=8)
        # A long poll interval: the changes below reach serve only through reconcile.
        env = serve_env(fake, db, free_port(), EVENTSYNC_POLL_INTERVAL="3600")
        async with serving(env, tmp_path) as serve:
            fake.add_webhook(nowhere_url())  # BookStack sends, nobody receives
            await fake.update_page(2, html="<p>missed by serve</p>")
            await fake.update_book(3, name="Renamed while nobody listened")
            await fake.delete_page(7)
            await fake.create_page(book_id=2, name="Created while nobody listened")
            fake.state.webhooks.clear()
            fake.add_webhook(serve.webhook_url)
            fake.reset_requests()
            await fake.update_page(4, html="<p>seen by serve</p>")  # serve works meanwhile
            result = await run_cli("reconcile", env=env, cwd=tmp_path, timeout=60.0)
            assert result.code == 0, result.stdout + result.stderr
            assert "mirror is consistent" in result.stdout
            await serve.wait_idle()
            # No double work: the change serve got by webhook and reconcile then found in the
            # audit log was read once; every other page (the missed ones and pages including
            # them) once, by whichever process got to it first.
            page_reads = Counter(r.path for r in fake.requests if r.route == "/api/pages/{id}")
            assert page_reads["/api/pages/4"] == 1, page_reads
            assert all(n == 1 for n in page_reads.values()), page_reads
            full = await run_cli("reconcile", "--full", env=env, cwd=tmp_path, timeout=60.0)
            assert full.code == 0, full.stdout + full.stderr
            await serve.wait_idle()
            await converges(env, tmp_path, fake)
            assert await serve.terminate() == 0


# ---- rendered includes: a silent change (FACTS 2.5) ---------------------------------------------


async def test_edit_of_an_included_page_refreshes_the_including_page(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=40, books=4, shelves=2, seed=11)
        target = min(included_pages(fake))
        env = serve_env(fake, db, free_port())
        async with serving(env, tmp_path) as serve:
            fake.add_webhook(serve.webhook_url)
            await fake.update_page(target, html="<p>new text of an included page</p>")
            await serve.wait_idle()
            # The including pages are refreshed by the job of the included page itself.
            mirror = await export(env, tmp_path)
            assert mirror == fake.truth(), first_difference(mirror, fake.truth())
            assert await serve.terminate() == 0


# ---- one serve per SQLite file ------------------------------------------------------------------


async def test_a_second_serve_on_the_same_file_is_refused_and_kill_9_blocks_no_restart(
    tmp_path: Path,
) -> None:
    db = tmp_path / "mirror.db"
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=10, books=2, seed=5)
        env = serve_env(fake, db, free_port())
        first = await start_serve(env, tmp_path, "first")
        try:
            await first.wait_ready()
            # The same file on another port: refused at once, in one line naming the first.
            second = await run_cli(
                "serve", env={**env, "EVENTSYNC_LISTEN": f"127.0.0.1:{free_port()}"}, cwd=tmp_path
            )
            assert second.code == 2, second.stdout + second.stderr
            assert second.stdout == ""
            lines = second.stderr.splitlines()
            assert len(lines) == 1, second.stderr
            assert str(db) in lines[0]
            assert f"pid {first.proc.pid} on host {socket.gethostname()} since " in lines[0]
            # With the same settings (the same port too) it is still the serve it names, not
            # the port.
            again = await run_cli("serve", env=env, cwd=tmp_path)
            assert again.code == 2 and f"pid {first.proc.pid}" in again.stderr, again.stderr
            # Every other command works beside it, and `status` names it as the leader, as
            # serve's own /status does.
            status = await run_cli("status", "--json", env=env, cwd=tmp_path)
            assert status.code == 0, status.stderr
            leader = json.loads(status.stdout)["leader"]
            assert leader["replica"] == f"{socket.gethostname()}:{first.proc.pid}"
            assert leader["alive"] and leader["since"] in lines[0]
            async with aiohttp.ClientSession() as session:
                served = await first.status(session)
            assert served["leader"] == leader and served["replica"] == leader["replica"]
            text = await run_cli("status", env=env, cwd=tmp_path)
            assert f"leader:          {leader['replica']} since {leader['since']}" in text.stdout
            assert (await export(env, tmp_path)) == fake.truth()
            changes = await run_cli("changes", env=env, cwd=tmp_path)
            assert changes.code == 0 and changes.stdout, changes.stderr
            # The first one never noticed.
            assert first.proc.returncode is None
            # kill -9: no clean-up at all, and a restart on the same file starts at once.
            await first.kill()
            status = await run_cli("status", "--json", env=env, cwd=tmp_path)
            assert json.loads(status.stdout)["leader"] is None
            restarted = await start_serve(env, tmp_path, "restarted")
            try:
                began = time.monotonic()
                await restarted.wait_ready()
                assert time.monotonic() - began < 15, "the restart waited for something"
                assert "in use by another eventsync serve" not in restarted.output()
                assert await restarted.terminate() == 0
            finally:
                await restarted.kill()
                restarted.close_files()
        finally:
            await first.kill()
            first.close_files()
