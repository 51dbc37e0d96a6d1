"""`eventsync subscriptions …` and `serve` delivering as real subprocesses: the commands and
their one-line errors, the secret shown once and nowhere else, addresses refused, and a
kill -9 of `serve` in the middle of a delivery that loses nothing.

The fake BookStack and the receivers run in the test's event loop, so every child process is
started with asyncio.create_subprocess_exec: a blocking wait would stop them answering."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import database_value, eventually
from receivers import SLOW, Receiver, without_state

from eventsync.app import open_store
from eventsync.delivery import encode_row, new_secret

pytestmark = pytest.mark.timeout(90)

WEBHOOK_SECRET = "whsec-test-subscriptions-5e1d7c3b9a"
GIVEN_SECRET = "whsec_" + base64.b64encode(b"receiver's own secret, 32 bytes").decode()
RPM = 100_000


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(database: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EVENTSYNC_") and k != "NOTIFY_SOCKET"
    }
    env.update(
        {"EVENTSYNC_DATABASE": database_value(database), "EVENTSYNC_LOG_FORMAT": "json", **extra}
    )
    return env


async def cli(*args: str, env: dict[str, str], cwd: Path) -> Result:
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
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def rows(database: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with sqlite3.connect(database) as db:
        return db.execute(sql, params).fetchall()


async def database_with_changes(path: Path, count: int) -> None:
    async with await open_store(path) as store, store.transaction() as tx:
        for i in range(count):
            await tx.change("upsert", "page", 1000 + i)


# ---- the commands --------------------------------------------------------------------------------


async def test_add_shows_a_generated_secret_once_and_the_commands_work(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    await database_with_changes(db, 5)
    env = clean_env(db, EVENTSYNC_SUBSCRIPTIONS_ALLOW_PRIVATE="true")

    added = await cli("subscriptions", "add", "http://127.0.0.1:9/a", env=env, cwd=tmp_path)
    assert added.code == 0, str(added)
    (secret_line,) = [line for line in added.stdout.splitlines() if line.startswith("secret:")]
    secret = secret_line.split()[1]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert "from seq 6" in added.stdout  # after the feed's head
    given = await cli(
        "subscriptions",
        "add",
        "http://127.0.0.1:9/b",
        "--kinds",
        "page,book",
        "--secret",
        GIVEN_SECRET,
        "--from",
        "3",
        env=env,
        cwd=tmp_path,
    )
    assert given.code == 0, str(given)
    assert GIVEN_SECRET not in given.stdout + given.stderr
    assert rows(db, "SELECT id, url, kinds, secret, cursor, paused FROM subscriptions") == [
        (1, "http://127.0.0.1:9/a", None, secret, 5, None),
        (2, "http://127.0.0.1:9/b", '["page", "book"]', GIVEN_SECRET, 2, None),
    ]

    listed = await cli("subscriptions", "list", env=env, cwd=tmp_path)
    as_json = await cli("subscriptions", "list", "--json", env=env, cwd=tmp_path)
    status = await cli("status", "--json", env=env, cwd=tmp_path)
    status_text = await cli("status", env=env, cwd=tmp_path)
    for shown in (listed, as_json, status, status_text):
        assert shown.code == 0, str(shown)
        assert secret not in shown.stdout and GIVEN_SECRET not in shown.stdout
    assert [s["id"] for s in json.loads(as_json.stdout)] == [1, 2]
    assert json.loads(status.stdout)["subscriptions"][1]["kinds"] == ["page", "book"]
    assert "page,book http://127.0.0.1:9/b" in listed.stdout
    assert "subscriptions:   1: active, 0 behind (cursor 5)" in status_text.stdout

    for action, expected in (
        ("pause", ("operator", 2)),
        ("resume", (None, 2)),
    ):
        done = await cli("subscriptions", action, "2", env=env, cwd=tmp_path)
        assert done.code == 0, str(done)
        assert rows(db, "SELECT paused, cursor FROM subscriptions WHERE id = 2") == [expected]
    replay = await cli("subscriptions", "replay", "1", "--from", "2", env=env, cwd=tmp_path)
    assert replay.code == 0 and "from seq 2" in replay.stdout, str(replay)
    assert rows(db, "SELECT cursor FROM subscriptions WHERE id = 1") == [(1,)]
    removed = await cli("subscriptions", "remove", "1", env=env, cwd=tmp_path)
    assert removed.code == 0, str(removed)
    assert rows(db, "SELECT id FROM subscriptions") == [(2,)]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["add", "ftp://example.com/x"], "only http and https"),
        (["add", "not a url"], "only http and https"),
        (["add", "http:///x"], "no host"),
        (["add", "http://127.0.0.1:99999/x"], "Port out of range"),
        (["add", "http://127.0.0.1:0/x"], "port must be between 1 and 65535"),
        (["add", "http://127.0.0.1:8080/h"], "127.0.0.1 is a loopback address: refused"),
        (["add", "http://localhost:8080/h"], "localhost (127.0.0.1) is a loopback address"),
        (["add", "http://[::1]:8080/h"], "::1 is a loopback address"),
        (["add", "http://10.1.2.3/h"], "10.1.2.3 is a private address"),
        (["add", "http://169.254.169.254/latest"], "link-local"),
        (["add", "http://[::ffff:192.168.0.1]/h"], "private"),
        (["add", "http://0.0.0.0:80/h"], "unspecified"),
        (["add", "http://2130706433/h"], "loopback"),  # 127.0.0.1 as one number
        (["add", "https://e.example/h", "--kinds", "page,pages"], "unknown kind 'pages'"),
        (["add", "https://e.example/h", "--secret", "no-prefix-but-long"], "whsec_"),
        (["add", "https://e.example/h", "--secret", "whsec_!!!!"], "base64"),
        (["add", "https://e.example/h", "--secret", "whsec_c2hvcnQ="], "24 to 64 bytes"),
        (["remove", "7"], "no subscription with id 7"),
        (["pause", "7"], "no subscription with id 7"),
        (["resume", "7"], "no subscription with id 7"),
        (["replay", "7", "--from", "1"], "no subscription with id 7"),
        (["replay", "1"], "--from"),
        (["pause", "0"], "not between 1"),
        (["remove", "x"], "not a whole number"),
        (["frobnicate"], "invalid choice"),
    ],
)
async def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], says: str) -> None:
    db = tmp_path / "m.db"
    await database_with_changes(db, 1)
    result = await cli("subscriptions", *args, env=clean_env(db), cwd=tmp_path)
    assert result.code == 2, str(result)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], str(result)
    assert "Traceback" not in result.stderr
    assert "whsec_!!!!" not in result.stderr and "no-prefix-but-long" not in result.stderr
    assert rows(db, "SELECT count(*) FROM subscriptions") == [(0,)]  # nothing changed


async def test_private_addresses_are_accepted_when_allowed_and_from_is_checked(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.db"
    await database_with_changes(db, 2)
    allowed = clean_env(db, EVENTSYNC_SUBSCRIPTIONS_ALLOW_PRIVATE="true")
    for url in ("http://127.0.0.1:9/h", "http://localhost:9/h", "http://[::1]:9/h"):
        result = await cli("subscriptions", "add", url, env=allowed, cwd=tmp_path)
        assert result.code == 0, str(result)
    past = await cli(
        "subscriptions", "add", "http://127.0.0.1:9/h", "--from", "4", env=allowed, cwd=tmp_path
    )
    assert past.code == 2 and "past the change feed's head (2)" in past.stderr, str(past)
    missing = await cli("subscriptions", "list", env=clean_env(tmp_path / "nope.db"), cwd=tmp_path)
    assert missing.code == 2 and "does not exist" in missing.stderr, str(missing)
    # Before the first sync: add creates the database, and the subscription starts at seq 1
    # (it will get the whole first sync).
    fresh = tmp_path / "fresh.db"
    env = clean_env(fresh, EVENTSYNC_SUBSCRIPTIONS_ALLOW_PRIVATE="true")
    first = await cli("subscriptions", "add", "http://127.0.0.1:9/h", env=env, cwd=tmp_path)
    assert first.code == 0 and f"from seq 1, in {fresh}" in first.stdout, str(first)
    assert rows(fresh, "SELECT cursor FROM subscriptions") == [(0,)]


# ---- serve: kill -9 in the middle of a delivery -------------------------------------------------


async def test_kill_9_of_serve_mid_delivery_loses_nothing(tmp_path: Path) -> None:
    from eventsync.testing import FakeBookStack

    db = tmp_path / "m.db"
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=30, books=3, seed=21)
        async with Receiver(default=SLOW, slow=0.4) as receiver:
            port = free_port()
            env = clean_env(
                db,
                EVENTSYNC_BOOKSTACK_URL=fake.url,
                EVENTSYNC_BOOKSTACK_TOKEN_ID=fake.token_id,
                EVENTSYNC_BOOKSTACK_TOKEN_SECRET=fake.token_secret,
                EVENTSYNC_WEBHOOK_SECRET=WEBHOOK_SECRET,
                EVENTSYNC_LISTEN=f"127.0.0.1:{port}",
                EVENTSYNC_POLL_INTERVAL="0.3",
                EVENTSYNC_REQUESTS_PER_MINUTE=str(RPM),
                EVENTSYNC_SWEEP_SHARE="0",
                EVENTSYNC_LOG_LEVEL="debug",
                EVENTSYNC_SUBSCRIPTIONS_ALLOW_PRIVATE="true",
                EVENTSYNC_SUBSCRIPTION_BATCH_SIZE="2",
                EVENTSYNC_SUBSCRIPTION_RETRY_MAX="0.3",
            )
            first = await start_serve(env, tmp_path, "serve-1")
            try:
                await first.ready()
                # Added while serve runs, from another process: serve picks it up.
                secret = receiver.secret = new_secret()
                added = await cli(
                    "subscriptions",
                    "add",
                    receiver.url,
                    "--from",
                    "1",
                    "--secret",
                    secret,
                    env=env,
                    cwd=tmp_path,
                )
                assert added.code == 0, str(added)
                fake.add_webhook(f"http://127.0.0.1:{port}/webhooks/bookstack/{WEBHOOK_SECRET}")
                for page_id in range(1, 11):
                    await fake.update_page(page_id, html=f"<p>before the kill {page_id}</p>")

                async def mid_delivery() -> bool:
                    return len(receiver.received) >= 4 and receiver.in_flight > 0

                await eventually(mid_delivery, timeout=20)
                in_flight = receiver.received[-1].webhook_id
                first.proc.kill()  # SIGKILL while the receiver holds a delivery
                await first.proc.wait()
            finally:
                await first.stop()
            fake.state.webhooks.clear()
            for page_id in range(11, 14):  # while serve is down: from the audit log
                await fake.update_page(page_id, html=f"<p>while down {page_id}</p>")
            receiver.default = "ok"
            second = await start_serve(env, tmp_path, "serve-2")
            try:
                await second.ready()

                async def delivered_all() -> bool:
                    head = rows(db, "SELECT max(seq) FROM changes")[0][0]
                    sub = rows(db, "SELECT cursor, batch_id FROM subscriptions")[0]
                    done = sub == (head, None)
                    return done and any(
                        r["entity_id"] == 13 and r["entity"] == "page" for r in receiver.deduped()
                    )

                await eventually(delivered_all, timeout=30)
            finally:
                await second.stop()
            output = first.output() + second.output()
        feed = [json.loads(encode_row(r)) for r in await feed_rows(db)]
    assert all(r.verified for r in receiver.received)
    # The delivery the kill cut off was sent again, with the same webhook-id.
    assert [r.webhook_id for r in receiver.received].count(in_flight) >= 2
    assert receiver.deduped() == feed
    assert without_state(receiver.deduped())[-1]["entity_id"] == 13
    assert secret not in output and WEBHOOK_SECRET not in output


async def feed_rows(db: Path) -> list[dict[str, Any]]:
    from eventsync.store.subscriptions import Subscriptions

    async with await open_store(db) as store:
        return await Subscriptions(store).rows(0, None)


@dataclass
class Serve:
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    handle: Any

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def ready(self) -> None:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"serve exited:\n{self.output()[-3000:]}")
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/status") as r:
                        if r.status == 200 and (await r.json())["synced"]:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"serve not ready:\n{self.output()[-3000:]}")
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        self.handle.close()


async def start_serve(env: dict[str, str], cwd: Path, name: str) -> Serve:
    log = cwd / f"{name}.log"
    handle = log.open("ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eventsync", "serve", env=env, cwd=cwd, stdout=handle, stderr=handle
    )
    port = int(env["EVENTSYNC_LISTEN"].rpartition(":")[2])
    return Serve(proc, port, log, handle)
