"""Hostile input (issue 13; DESIGN guarantees 1, 11, 12): a poisoned webhook fails alone, an
undecodable body is the sender's 4xx, the secret reaches no log line whatever request line
carries it, and the command line answers bad arguments and settings with one line, never a
traceback. Real parts: `eventsync serve` and the CLI as subprocesses, a FakeBookStack and
real SQLite files, everything on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from test_cli import NOWHERE, Cli, assert_one_line_error, settings_for
from test_serve import WEBHOOK_SECRET, free_port, serve_env, serving, sql_all

from eventsync.app import open_store
from eventsync.errors import UnstorableEvent
from eventsync.events import FETCH, BadEvent, Event, from_webhook
from eventsync.ingest.inbox import Inbox
from eventsync.store.queue import JobQueue
from eventsync.testing import FakeBookStack

pytestmark = pytest.mark.timeout(90)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "bookstack" / "real-v25.02.4"
JSON = {"Content-Type": "application/json"}
GZIP = {"Content-Encoding": "gzip"}
RPM = 100_000


def real_bodies() -> dict[str, str]:
    """BookStack v25.02.4's webhook bodies, by event, as it sent them."""
    folder = REAL / "webhooks"
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing: the captured BookStack bodies sit beside the repo")
    return {p.stem: p.read_text() for p in sorted(folder.glob("*.json"))}


def distinct_bodies(n: int) -> list[str]:
    """n real bodies, each made unique by its text (so none is a duplicate of another)."""
    bodies = list(real_bodies().values())
    out = []
    for i in range(n):
        raw = json.loads(bodies[i % len(bodies)])
        raw["text"] = f"{raw.get('text')} #{i}"
        out.append(json.dumps(raw))
    return out


def stored_webhooks(database: Path) -> list[str]:
    return sorted(
        r[0] for r in sql_all(database, "SELECT payload FROM events WHERE source = 'webhook'")
    )


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes | str, headers: dict[str, str]
) -> tuple[int, str]:
    async with session.post(url, data=body, headers=headers) as r:
        return r.status, await r.text()


def env_for(fake: FakeBookStack, database: Path, **extra: str) -> dict[str, str]:
    # No webhooks from the fake itself: every stored webhook row is one this test sent.
    return serve_env(fake, database, free_port(), **extra)


# ---- 1. a poisoned request never fails another --------------------------------------------------

# Lone UTF-16 surrogates wherever a string is stored: escaped, as raw bytes (ED A0 80 is the
# UTF-8 spelling of U+D800, which is no UTF-8), in a nested value, in a key, in a list.
POISONED: dict[str, bytes] = {
    "escaped in event": b'{"event":"\\ud800"}',
    "raw bytes in event": b'{"event":"\xed\xa0\x80"}',
    "in related_item.name": (
        b'{"event":"page_update","related_item":{"id":7,"name":"a\\udfffb"},'
        b'"triggered_at":"2026-12-01T19:35:24.000000Z"}'
    ),
    "in a key": b'{"event":"page_update","related_item":{"id":7,"\\uDBFF":1}}',
    "in a list": b'{"event":"page_update","related_item":{"id":7,"tags":["ok","\\uD83D"]}}',
    "in text": b'{"event":"page_update","text":"\\ud800\\ud800","related_item":{"id":7}}',
}


async def test_a_poisoned_webhook_fails_alone_among_40_concurrent_valid_ones(
    tmp_path: Path,
) -> None:
    db = tmp_path / "mirror.db"
    valid = distinct_bodies(40)
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=5, books=1, seed=3)
        async with serving(env_for(fake, db), tmp_path) as serve:
            # Each poisoned body in the middle of the 40 valid ones, all sent at once: they
            # arrive together, so the valid ones share the poisoned one's group commit.
            for name, poisoned in POISONED.items():
                order: list[bytes | str] = [*valid[:20], poisoned, *valid[20:]]
                async with aiohttp.ClientSession() as session:
                    results = await asyncio.gather(
                        *(post(session, serve.webhook_url, body, JSON) for body in order)
                    )
                codes = [code for code, _ in results]
                bad_code, bad_text = results[20]
                assert codes[:20] + codes[21:] == [202] * 40, (name, codes)
                # Rejected by validation, saying why (not found unstorable by the database).
                assert bad_code in (400, 422), (name, bad_code, bad_text)
                assert "surrogate" in bad_text or "UTF-8" in bad_text, (name, bad_text)
            log = serve.output()
    assert "event not stored" not in log and "inbox commit failed" not in log
    # Every valid one stored once per time it was sent, the poisoned never.
    assert stored_webhooks(db) == sorted(valid * len(POISONED))


def test_lone_surrogates_are_bad_events_anywhere_in_the_body() -> None:
    for name, body in POISONED.items():
        if name == "raw bytes in event":
            continue  # no UTF-8: the receiver rejects it before it is parsed
        text = body.decode()
        with pytest.raises(BadEvent, match="surrogate"):
            from_webhook(json.loads(text), text)
        with pytest.raises(BadEvent, match="surrogate"):
            from_webhook(json.loads(text))  # no text to prefilter: the whole body is searched
    # A surrogate *pair* is one ordinary character; an escaped backslash before "ud800" is
    # text about an escape, not an escape.
    for fine in ('{"event":"\\ud83d\\ude00"}', '{"event":"\\\\ud800"}'):
        assert from_webhook(json.loads(fine), fine).type.encode("utf-8")


async def test_the_group_commit_stores_every_event_but_the_one_it_cannot(tmp_path: Path) -> None:
    """Values no validation foresaw reach the inbox: each fails alone, the rest of its group
    is committed, and nothing of a failed one stays (not even what it wrote first)."""
    valid = [from_webhook(json.loads(t), t) for t in distinct_bodies(40)]
    poisoned = [
        Event("webhook", "\ud800", None),  # a type SQLite cannot encode
        # an id SQLite cannot hold: fails at the first statement
        Event("webhook", "page_update", "page:5", frozenset({FETCH}), at=1.0, activity_id=2**64),
        # a job is merged before the unstorable body is inserted: both must go
        Event("webhook", "page_update", "page:999999", frozenset({FETCH}), raw="\udcff"),
    ]
    order = [*valid[:10], poisoned[0], *valid[10:25], poisoned[1], *valid[25:], poisoned[2]]
    commits: list[int] = []
    async with await open_store(tmp_path / "m.db") as store:
        inbox = Inbox(JobQueue(store), on_commit=lambda events, _: commits.append(len(events)))
        inbox.start()
        results = await asyncio.gather(*(inbox.submit(e) for e in order), return_exceptions=True)
        await inbox.close()
        rows = await store.fetchall("SELECT payload FROM events ORDER BY seq")
        jobs = {r[0] for r in await store.fetchall("SELECT key FROM jobs")}
    assert commits == [40], "the 43 events were not one group, or the group failed"
    for event, result in zip(order, results, strict=True):
        if any(event is p for p in poisoned):
            assert isinstance(result, UnstorableEvent), result
        else:
            assert result in ("queued", "merged", "ignored"), result
    assert [r[0] for r in rows] == [e.raw for e in valid]
    assert "page:999999" not in jobs
    assert {e.key for e in valid if e.key} <= jobs


async def test_a_failing_commit_callback_does_not_stop_the_inbox(tmp_path: Path) -> None:
    def callback(_events: list[Event], _outcomes: list[str]) -> None:
        raise RuntimeError("a bug in whatever listens")

    first, second = (from_webhook(json.loads(t), t) for t in distinct_bodies(2))
    async with await open_store(tmp_path / "m.db") as store:
        inbox = Inbox(JobQueue(store), on_commit=callback)
        inbox.start()
        assert await inbox.submit(first) == "ignored"  # auth_login
        # Had the writer died with the callback, this would raise (and the webhook be a 503).
        assert await inbox.submit(second) == "queued"
        await inbox.close()


async def test_a_webhook_cannot_choose_the_entity_a_deletion_job_resolves_to(
    tmp_path: Path,
) -> None:
    """The audit log's deletion rows name their entity, and that goes into the job; a
    webhook's body is the sender's, so an "entity" in it must not."""
    body = json.loads(real_bodies()["recycle_bin_restore"])
    body["entity"] = "role:1"
    async with await open_store(tmp_path / "m.db") as store:
        queue = JobQueue(store)
        await queue.submit([from_webhook(body)])
        rows = await store.fetchall("SELECT key, payload FROM jobs")
    assert [(r[0], r[1]) for r in rows] == [("deletion:4", None)]


# ---- 2. undecodable bodies are the sender's fault -----------------------------------------------


def _deflate(data: bytes, raw: bool = False) -> bytes:
    c = zlib.compressobj(wbits=-15 if raw else 15)
    return c.compress(data) + c.flush()


async def test_content_encodings_decode_or_get_a_4xx(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    good = distinct_bodies(8)
    noise = random.Random(13).randbytes(300)
    big = json.dumps({"event": "x", "text": "a" * (1024 * 1024)}).encode()
    cases: list[tuple[str, bytes, dict[str, str], int]] = [
        ("gzip", gzip.compress(good[0].encode()), {"Content-Encoding": "gzip"}, 202),
        ("x-gzip", gzip.compress(good[1].encode()), {"Content-Encoding": "x-gzip"}, 202),
        ("zlib deflate", _deflate(good[2].encode()), {"Content-Encoding": "deflate"}, 202),
        ("raw deflate", _deflate(good[3].encode(), raw=True), {"Content-Encoding": "Deflate"}, 202),
        ("identity", good[4].encode(), {"Content-Encoding": "identity"}, 202),
        (
            "gzip twice",
            gzip.compress(gzip.compress(good[5].encode())),
            {"Content-Encoding": "gzip, gzip"},
            202,
        ),
        (
            "two gzip members",
            gzip.compress(good[6][:100].encode()) + gzip.compress(good[6][100:].encode()),
            {"Content-Encoding": "gzip"},
            202,
        ),
        ("gzip named, plain sent", good[7].encode(), {"Content-Encoding": "gzip"}, 400),
        ("gzip of random bytes", noise, {"Content-Encoding": "gzip"}, 400),
        (
            "deflate of random bytes",
            b"\x78" + noise,
            {"Content-Encoding": "deflate"},
            400,
        ),
        (
            "truncated gzip",
            gzip.compress(good[0].encode())[:-12],
            {"Content-Encoding": "gzip"},
            400,
        ),
        ("empty gzip", b"", {"Content-Encoding": "gzip"}, 400),
        (
            "gzip with trailing junk",
            gzip.compress(good[0].encode()) + b"junk",
            {"Content-Encoding": "gzip"},
            400,
        ),
        ("gzip bomb", gzip.compress(big), {"Content-Encoding": "gzip"}, 413),
        ("brotli", good[0].encode(), {"Content-Encoding": "br"}, 415),
        ("zstd", good[0].encode(), {"Content-Encoding": "zstd"}, 415),
        ("compress", good[0].encode(), {"Content-Encoding": "compress"}, 415),
        ("unknown", good[0].encode(), {"Content-Encoding": "rot13"}, 415),
        ("unknown after gzip", good[0].encode(), {"Content-Encoding": "gzip, x-foo"}, 415),
        ("UTF-16 body", good[0].encode("utf-16"), {}, 400),
        ("latin-1 body", b'{"event":"caf\xe9"}', {}, 400),
    ]
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=5, books=1, seed=3)
        async with serving(env_for(fake, db), tmp_path) as serve:
            got = {}
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                for name, body, headers, _ in cases:
                    async with session.post(
                        serve.webhook_url, data=body, headers={**JSON, **headers}
                    ) as r:
                        got[name] = (r.status, r.headers.get("Accept-Encoding"), await r.text())
    wrong = {name: got[name] for name, _, _, want in cases if got[name][0] != want}
    assert not wrong, wrong
    # A 415 for a coding says which ones would do (RFC 9110 15.5.16).
    assert all(got[name][1] == "gzip, deflate" for name, *_, want in cases if want == 415)
    accepted = [good[i] for i in range(7)]
    assert stored_webhooks(db) == sorted(accepted)


# ---- 3. the secret reaches no log -------------------------------------------------------------


def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes as they are; the answer up to the server's close (a bad request closes it)
    or a pause of a second."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.settimeout(1.0)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def secret_spellings(secret: str) -> Iterator[str]:
    """The secret, and what of it a reader could still put together."""
    yield secret
    yield quote(secret, safe="")
    yield secret[1:]  # after a percent-encoded first character
    yield secret[: len(secret) // 2]


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_malformed_request_lines_never_put_the_secret_in_a_log(
    tmp_path: Path, log_format: str
) -> None:
    db = tmp_path / "mirror.db"
    path = f"/webhooks/bookstack/{WEBHOOK_SECRET}"
    body = b'{"event":"x"}'
    head = f"Host: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    requests = {
        "HTTP/9.9": f"POST {path} HTTP/9.9\r\n{head}".encode() + body,
        "NUL after the secret": f"POST {path}\x00 HTTP/1.1\r\n{head}".encode() + body,
        "tab after the secret": f"POST {path}\t HTTP/1.1\r\n{head}".encode() + body,
        "bare LF line ends": f"POST {path} HTTP/1.1\n{head.replace(chr(13), '')}".encode() + body,
        "percent-encoded": (
            f"POST /webhooks/bookstack/{quote(WEBHOOK_SECRET, safe='').replace('-', '%2D')} "
            f"HTTP/9.9\r\n{head}"
        ).encode(),
        "partly encoded, elsewhere": f"POST /x/%77{WEBHOOK_SECRET[1:]} HTTP/9.9\r\n{head}".encode(),
        "bad method": f"P\x01ST {path} HTTP/1.1\r\n{head}".encode(),
        # a near miss: half of the secret, which no literal match finds
        "half the secret": (
            f"POST /webhooks/bookstack/{WEBHOOK_SECRET[: len(WEBHOOK_SECRET) // 2]}\x00 "
            f"HTTP/1.1\r\n{head}"
        ).encode(),
        "a header with the secret": f"POST {path} HTTP/1.1\r\nX\x00: {WEBHOOK_SECRET}\r\n".encode(),
    }
    async with FakeBookStack(requests_per_minute=RPM) as fake:
        fake.seed(pages=5, books=1, seed=3)
        env = env_for(fake, db, EVENTSYNC_LOG_FORMAT=log_format, EVENTSYNC_LOG_LEVEL="debug")
        async with serving(env, tmp_path) as serve:
            answers = {
                name: await asyncio.to_thread(raw_request, serve.port, data)
                for name, data in requests.items()
            }
            # and one good request, so the log is known to hold the webhook route's lines
            async with aiohttp.ClientSession() as session:
                status, _ = await post(session, serve.webhook_url, distinct_bodies(1)[0], JSON)
            assert status == 202
            await asyncio.sleep(0.3)  # the last lines written
            log = serve.output()
    for name, answer in answers.items():
        assert answer.startswith(b"HTTP/1.") and answer.split()[1].startswith(b"4"), (name, answer)
    for spelling in secret_spellings(WEBHOOK_SECRET):
        assert spelling not in log, f"{spelling!r} in the {log_format} log"
    # aiohttp's lines went through the same handler: one warning each, no traceback.
    assert log.count("bad HTTP request") >= 6, log[-3000:]
    assert "Traceback" not in log and "Error handling request" not in log


LOGGING_SNIPPET = r"""
import logging, sys
from aiohttp.http_exceptions import BadStatusLine
from eventsync.logging import configure_logging, get_logger, redact
secret = sys.argv[1]
configure_logging(sys.argv[2], "debug", secrets=[secret], stream=sys.stdout)
try:
    raise RuntimeError(f"boom at /webhooks/bookstack/{secret}?x=1 and {secret}")
except RuntimeError:
    get_logger("eventsync.test").exception("ours", url=f"http://h/webhooks/bookstack/{secret}")
    logging.getLogger("asyncio").exception("theirs, %s", secret[1:] and "%77" + secret[1:])
logging.getLogger("aiohttp.server").error(
    "Error handling request from %s", "127.0.0.1",
    exc_info=BadStatusLine(f"POST /webhooks/bookstack/{secret}\x00 HTTP/1.1"),
)
get_logger("eventsync.test").info("route", route="/webhooks/bookstack/{secret}")
get_logger("eventsync.test").info("near", path=f"/webhooks/bookstack/{secret[:len(secret) // 2]}")
print("printed:", redact(f"cannot open {secret}"))
"""


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_redaction_covers_tracebacks_foreign_loggers_and_encodings(log_format: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", LOGGING_SNIPPET, WEBHOOK_SECRET, log_format],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for spelling in secret_spellings(WEBHOOK_SECRET):
        assert spelling not in out, f"{spelling!r} in:\n{out}"
    assert out.count("[redacted]") >= 5, out
    assert "boom at" in out and "theirs" in out  # the lines are there, only redacted
    assert "/webhooks/bookstack/{secret}" in out  # the route's template is no secret
    # aiohttp's parse error is one warning line, without the bytes or a traceback
    lines = [x for x in out.splitlines() if "bad HTTP request" in x]
    assert len(lines) == 1 and "warning" in lines[0].lower(), out
    assert "POST" not in lines[0] and "Traceback" not in out.split("bad HTTP request")[1]
    assert "printed: cannot open [redacted]" in out


# ---- 4. the command line never prints a traceback ------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return Cli(workdir)


def serve_settings(database: Path, listen: str) -> dict[str, str]:
    return settings_for(None, database, webhook_secret="whsec-hostile-cli-5e1f0a9b", listen=listen)


@pytest.mark.parametrize(
    "args",
    [
        ("changes", "--after", "99999999999999999999999"),
        ("changes", "--after", "-1"),
        ("changes", "--after", "ten"),
        ("dead-letters", "retry", "99999999999999999999999"),
        ("export", "--indent", "99999999999"),
        ("reconcile", "--timeout", "nan"),
    ],
)
async def test_bad_arguments_get_one_line(cli: Cli, tmp_path: Path, args: tuple[str, ...]) -> None:
    database = tmp_path / "mirror.db"
    async with await open_store(database):
        pass  # an existing, empty mirror: the argument is all that is wrong
    result = await cli(*args, env=settings_for(None, database))
    assert_one_line_error(result, args[1] if args[1].startswith("--") else "id")


async def test_serve_checks_the_listen_address_before_any_start_up_work(
    cli: Cli, tmp_path: Path
) -> None:
    database = tmp_path / "mirror.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            "port in use": f"127.0.0.1:{port}",
            "IPv6 without brackets": "::1",
            "IPv6 without brackets, with a port": "::1:8780",
            "no IPv4 address": "256.1.1.1:80",
            "no such host": "no-such-host.invalid:8780",
            "not an address of this machine": "192.0.2.1:8780",
            "bracket missing": "[::1:8780",
        }
        results = {
            name: await cli("serve", env=serve_settings(database, listen))
            for name, listen in cases.items()
        }
    for name, result in results.items():
        assert_one_line_error(result, "EVENTSYNC_LISTEN")
        assert result.stdout == "", name
    # Nothing was started: not even the database was created.
    assert not database.exists()


@pytest.fixture
def unwritable_database(tmp_path: Path) -> Iterator[Path]:
    """An existing mirror this process may not write: read-only for a user, immutable for
    root (whom file modes do not stop)."""
    database = tmp_path / "locked" / "mirror.db"
    database.parent.mkdir()

    async def create() -> None:
        async with await open_store(database):
            pass

    asyncio.run(create())
    if os.geteuid() != 0:
        database.chmod(0o400)
        database.parent.chmod(0o500)
        yield database
        database.parent.chmod(0o700)
        database.chmod(0o600)
        return
    locked = subprocess.run(["chattr", "+i", str(database)], capture_output=True, check=False)
    if locked.returncode != 0:
        pytest.skip("running as root without chattr +i: no file it cannot write")
    try:
        yield database
    finally:
        subprocess.run(["chattr", "-i", str(database)], check=False)


@pytest.mark.parametrize(
    "command",
    [("status",), ("export",), ("changes",), ("dead-letters", "list"), ("reconcile",), ("serve",)],
)
async def test_a_database_it_cannot_write_is_one_line_naming_it(
    cli: Cli, unwritable_database: Path, command: tuple[str, ...]
) -> None:
    env = serve_settings(unwritable_database, f"127.0.0.1:{free_port()}")
    result = await cli(*command, env=env)
    assert_one_line_error(result, str(unwritable_database))


async def test_a_database_path_through_a_file_is_one_line_naming_it(
    cli: Cli, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    database = blocker / "mirror.db"
    for command in (("reconcile",), ("serve",)):
        env = serve_settings(database, f"127.0.0.1:{free_port()}")
        assert_one_line_error(await cli(*command, env=env), str(database))


async def test_a_config_that_is_a_directory_says_so(cli: Cli, tmp_path: Path) -> None:
    result = await cli(
        "--config", str(tmp_path), "status", env={"EVENTSYNC_BOOKSTACK_URL": NOWHERE}
    )
    assert_one_line_error(result, str(tmp_path), "is a directory")
    assert "does not exist" not in result.stderr
