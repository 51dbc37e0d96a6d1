"""A seeded, time-bounded fuzz of the running `eventsync serve` on 127.0.0.1 (issue 13; DESIGN
guarantees 1, 11, 12): mutated real BookStack webhook bodies (JSON-level and byte-level),
content codings, sizes, content types, wrong secrets and methods, the other endpoints with
hostile parameters, and malformed request lines carrying the secret. Whatever arrives: no
5xx, every unmutated webhook 2xx, exactly one stored row per 2xx, the secret in no log line,
and the server still up.

EVENTSYNC_FUZZ_SEED, EVENTSYNC_FUZZ_SECONDS and EVENTSYNC_FUZZ_REQUESTS run it longer or
differently (e.g. before a release); the defaults keep the suite fast."""

from __future__ import annotations

import asyncio
import copy
import gzip
import io
import json
import os
import random
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from test_serve import WEBHOOK_SECRET, free_port, serve_env, serving, sql_one

from eventsync.testing import FakeBookStack

pytestmark = pytest.mark.timeout(120)

SEED = int(os.environ.get("EVENTSYNC_FUZZ_SEED", "13"))
SECONDS = float(os.environ.get("EVENTSYNC_FUZZ_SECONDS", "4"))
REQUESTS = int(os.environ.get("EVENTSYNC_FUZZ_REQUESTS", "3000"))
CONCURRENCY = 12
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "bookstack" / "real-v25.02.4"
MAX_BODY = 1024 * 1024
WEBHOOK_PATH = f"/webhooks/bookstack/{WEBHOOK_SECRET}"
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@dataclass
class Case:
    """One request: sent through aiohttp (a well-formed HTTP request of any body and
    headers), or as raw bytes on a socket (`raw`)."""

    kind: str
    method: str = "POST"
    path: str = WEBHOOK_PATH
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    good: bool = False  # an unmutated BookStack webhook: it must be accepted
    expected: int = 1  # how many webhooks it carries (pipelined requests: several)


@dataclass
class Outcome:
    statuses: list[int]  # one per response read (a raw request may read none)
    error: str | None = None


# ---- mutations ----------------------------------------------------------------------------------

ODD_STRINGS = [
    "",
    "\x00",
    "\\ud800",  # becomes a lone surrogate only through a JSON escape; see _escape_surrogates
    "\u202e\u0000\ufeff",
    "😀" * 50,
    "a" * 5000,
    "page_update",
    "../../etc/passwd",
    "%s%n%x",
    "<script>",
    "'; DROP TABLE events; --",
    "\r\nX-Injected: 1",
    "/webhooks/bookstack/" + WEBHOOK_SECRET,
]
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    2**63,
    2**64,
    10**30,
    -(10**30),
    1.5,
    1e308,
    float("nan"),
    float("inf"),
    [],
    {},
    [1, [2, [3]]],
    {"id": 1},
    "12",
    *ODD_STRINGS,
]
EVENT_NAMES = [
    "page_update",
    "page_create",
    "permissions_update",
    "recycle_bin_restore",
    "revision_restore",
    "auth_register",
    "some_future_event",
    "",
    "x" * 100,
    "x" * 101,
    "PAGE_UPDATE",
    "\\ud800",  # lone surrogates, by _escape_surrogates: the type is stored as text
    "page_update\\ud800",
]


def _odd(rng: random.Random) -> Any:
    value = rng.choice(ODD_VALUES)
    if value == "a" * 5000:
        return "a" * rng.randint(100, 20000)
    return copy.deepcopy(value)  # a shared list placed twice could end up inside itself


NEST_MARK = "__fuzz_nest__"


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if len(prefix) > 8:
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return doc


def _escape_surrogates(text: str, rng: random.Random) -> str:
    """Lone surrogate escapes where the odd value "\\\\ud800" was placed, in any case."""
    escape = rng.choice(["\\ud800", "\\uDFFF", "\\udbff", "\\uD83D", "\\ud800\\ud800"])
    return text.replace("\\\\ud800", escape)


def mutate_json(doc: Any, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        paths = _paths(doc)
        path = rng.choice(paths)
        action = rng.random()
        if action < 0.45:
            doc = _set(doc, path, _odd(rng))
        elif action < 0.6 and path:
            parent = doc
            for part in path[:-1]:
                parent = parent[part]
            del parent[path[-1]]
        elif action < 0.7 and isinstance(doc, dict):
            doc["event"] = rng.choice(EVENT_NAMES)
        elif action < 0.8:
            doc = _set(doc, path, NEST_MARK)  # deep nesting, spliced into the text below
        elif action < 0.9 and isinstance(doc, dict):
            doc[rng.choice(ODD_STRINGS)] = _odd(rng)
        else:
            doc = _odd(rng)  # the whole body: not an object
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
    depth = rng.choice([5, 50, 500, 5000])
    nested = (
        "[" * depth + "0" + "]" * depth
        if rng.random() < 0.5
        else '{"a":' * depth + "0" + "}" * depth
    )
    text = text.replace(json.dumps(NEST_MARK), nested)
    return _escape_surrogates(text, rng)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not buf:
            break
        i = rng.randrange(len(buf))
        action = rng.random()
        if action < 0.3:
            buf[i] = rng.randrange(256)
        elif action < 0.45:
            del buf[i:]
        elif action < 0.6:
            buf[i:i] = rng.choice(
                [b"\xed\xa0\x80", b"\x00", b"\xff\xfe", b"\xc0\xaf", b'"', b"\\", b"\\u", b"{"]
            )
        elif action < 0.75:
            buf[i:i] = rng.randbytes(rng.randint(1, 20))
        elif action < 0.9:
            j = rng.randrange(len(buf))
            buf[i:i] = buf[min(i, j) : max(i, j)][:1000]
        else:
            buf[0:0] = rng.choice([b"\xef\xbb\xbf", b"\xef\xbb"])  # a BOM, or a broken one
    return bytes(buf)


def encode(body: bytes, rng: random.Random) -> tuple[bytes, dict[str, str], bool]:
    """A body in some content coding; True when it is a faithful encoding of `body`."""
    choice = rng.random()
    if choice < 0.25:
        return (
            gzip.compress(body),
            {"Content-Encoding": rng.choice(["gzip", "GZIP", "x-gzip"])},
            True,
        )
    if choice < 0.4:
        c = zlib.compressobj(wbits=rng.choice([15, -15]))
        return c.compress(body) + c.flush(), {"Content-Encoding": "deflate"}, True
    if choice < 0.5:
        return gzip.compress(gzip.compress(body)), {"Content-Encoding": "gzip, gzip"}, True
    if choice < 0.6:
        return body, {"Content-Encoding": "identity"}, True
    if choice < 0.75:  # named but not applied, or broken
        data = gzip.compress(body)
        data = rng.choice([body, data[: len(data) // 2], data + b"junk", rng.randbytes(64)])
        return data, {"Content-Encoding": rng.choice(["gzip", "deflate"])}, False
    coding = rng.choice(["br", "zstd", "compress", "rot13", "gzip, x", ", ,", "gzip;q=1", "*"])
    return body, {"Content-Encoding": coding}, coding == ", ,"


def malformed_line(rng: random.Random, body: bytes) -> bytes:
    """A request line (and head) aiohttp must refuse, most of them carrying the secret."""
    target = rng.choice(
        [
            WEBHOOK_PATH,
            WEBHOOK_PATH + rng.choice(["\x00", "\t", "\x7f", " ", "\x1b[2J", "\xff"]),
            "/webhooks/bookstack/" + quote(WEBHOOK_SECRET, safe="").replace("-", "%2D"),
            "/webhooks/bookstack/%77" + WEBHOOK_SECRET[1:],
            "/x/" + WEBHOOK_SECRET,
            WEBHOOK_PATH[: rng.randint(1, len(WEBHOOK_PATH))],
            WEBHOOK_PATH + "/" + "a" * rng.choice([10, 9000]),
        ]
    )
    method = rng.choice(["POST", "POST", "P\x01ST", "post", "GET", "", "POST POST"])
    version = rng.choice(
        ["HTTP/1.1", "HTTP/9.9", "HTTP/1.1 x", "HTTP/", "http/1.1", "", "HTTP/1.1\x00"]
    )
    eol = rng.choice(["\r\n", "\n", "\r", "\n\r"])
    head = [
        f"{method} {target} {version}",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {rng.choice([len(body), len(body) + 10, -1, 'x', 10**20])}",
    ]
    if rng.random() < 0.3:
        head.append(
            rng.choice(["X\x00: 1", ": empty", "Transfer-Encoding: gzip, chunked", " folded"])
        )
    head.append("Connection: close")
    data = eol.join(head).encode("utf-8", "surrogateescape") + eol.encode() * 2 + body
    return data


def odd_target(rng: random.Random) -> bytes:
    """A well-formed request whose target is odd: what the router and yarl make of it."""
    target = rng.choice(
        [
            "/%",
            "/%zz",
            "/%00",
            "/changes?after=%",
            "/changes?%ff=%fe",
            "//webhooks//bookstack//" + WEBHOOK_SECRET,
            "/webhooks/bookstack/./" + WEBHOOK_SECRET,
            "/webhooks/bookstack/../bookstack/" + WEBHOOK_SECRET,
            "/webhooks/bookstack/" + WEBHOOK_SECRET + "?x=" + WEBHOOK_SECRET,
            "/webhooks/bookstack/" + WEBHOOK_SECRET + "#frag",
            "http://127.0.0.1" + WEBHOOK_PATH,
            "*",
            "/\xff\xfe",
            "/" + "%41" * 3000,
            "/status/" + "a" * 7000,
            "/metrics?" + "&".join(["a=1"] * 500),
        ]
    )
    method = rng.choice(["GET", "POST", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PRI"])
    body = b'{"event":"x"}'
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1", "replace") + body


def chunked(rng: random.Random, body: bytes) -> tuple[bytes, bool]:
    """A chunked request of `body`, faithful (True) or with broken framing."""
    pieces, i = [], 0
    while i < len(body):
        size = rng.randint(1, 400)
        pieces.append(b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]))
        i += size
    framing = b"".join(pieces) + b"0\r\n\r\n"
    faithful = rng.random() < 0.5
    if not faithful:
        broken = rng.choice([b"zz\r\n", b"ffffffffffffffffff\r\n", b"5\r\nab\r\n", b"-1\r\n"])
        framing = framing[: rng.randrange(len(framing))] + broken + b"0\r\n\r\n"
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + framing, faithful


def pipelined(body: bytes, count: int) -> bytes:
    """`count` webhooks on one connection, sent before any answer."""
    one = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    last = one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    return one * (count - 1) + last


def build_cases(rng: random.Random, n: int) -> list[Case]:
    bodies = [p.read_bytes() for p in sorted((REAL / "webhooks").glob("*.json"))]
    if not bodies:
        pytest.fail(f"no captured webhook bodies in {REAL / 'webhooks'}")
    json_headers = {"Content-Type": "application/json"}
    cases: list[Case] = []
    for i in range(n):
        body = rng.choice(bodies)
        roll = rng.random()
        if roll < 0.15:
            doc = json.loads(body)
            doc["text"] = f"{doc.get('text')} fuzz {i}"
            cases.append(
                Case("good", body=json.dumps(doc).encode(), headers=json_headers, good=True)
            )
        elif roll < 0.4:
            text = mutate_json(json.loads(body), rng).encode("utf-8", "surrogatepass")
            cases.append(Case("json", body=text, headers=json_headers))
        elif roll < 0.55:
            cases.append(Case("bytes", body=mutate_bytes(body, rng), headers=json_headers))
        elif roll < 0.68:
            data, coding, faithful = encode(body, rng)
            cases.append(
                Case("coding", body=data, headers={**json_headers, **coding}, good=faithful)
            )
        elif roll < 0.72:
            size = rng.choice([MAX_BODY - 200, MAX_BODY + 1, MAX_BODY * 2])
            doc = {"event": "some_future_event", "text": "z" * max(0, size - 40)}
            data = json.dumps(doc).encode()
            cases.append(Case("size", body=data, headers=json_headers, good=len(data) <= MAX_BODY))
        elif roll < 0.8:
            content_type = rng.choice(
                [
                    "application/json; charset=utf-8",
                    "Application/JSON",
                    "text/plain",
                    "application/x-www-form-urlencoded",
                    "",
                    "application/json, text/plain",
                    "multipart/form-data; boundary=x",
                ]
            )
            headers = {"Content-Type": content_type} if content_type else {}
            cases.append(Case("content-type", body=body, headers=headers))
        elif roll < 0.86:
            path = rng.choice(
                [
                    "/webhooks/bookstack/wrong-" + WEBHOOK_SECRET[6:],
                    WEBHOOK_PATH[:-1],
                    WEBHOOK_PATH + "x",
                    WEBHOOK_PATH + "/",
                    "/webhooks/bookstack/",
                    "/webhooks/bookstack/" + WEBHOOK_SECRET.upper(),
                ]
            )
            method = rng.choice(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
            cases.append(Case("route", method=method, path=path, body=body, headers=json_headers))
        elif roll < 0.92:
            query = rng.choice(
                [
                    "after=99999999999999999999999",
                    "after=-1",
                    "after=1e3",
                    "limit=0",
                    "limit=1000000",
                    "after=%00",
                    "after=\U0001f600",
                    "limit=1&limit=2",
                    "after=" + "9" * 5000,
                ]
            )
            path = rng.choice(["/changes", "/status", "/metrics", "/healthz", "/readyz", "/nope"])
            cases.append(Case("endpoint", method="GET", path=f"{path}?{quote(query, safe='=&')}"))
        elif roll < 0.95:
            cases.append(Case("request-line", raw=malformed_line(rng, body)))
        elif roll < 0.97:
            cases.append(Case("target", raw=odd_target(rng)))
        elif roll < 0.99:
            data, faithful = chunked(rng, body)
            cases.append(Case("chunked", raw=data, good=faithful, expected=1))
        else:
            count = rng.randint(2, 5)
            cases.append(Case("pipelined", raw=pipelined(body, count), good=True, expected=count))
    return cases


# ---- sending ------------------------------------------------------------------------------------


async def send_raw(port: int, data: bytes) -> Outcome:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError) as exc:
        return Outcome([], f"connect: {exc!r}")
    try:
        writer.write(data)
        await writer.drain()
        answer = b""
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), 1.0):
                answer += chunk
        except TimeoutError:
            pass
    except OSError as exc:
        return Outcome([], f"io: {exc!r}")
    finally:
        writer.close()
    # Pipelined answers follow each other without a line break between body and status line.
    return Outcome([int(m) for m in STATUS_LINE.findall(answer)])


async def send(session: aiohttp.ClientSession, base: str, port: int, case: Case) -> Outcome:
    if case.raw is not None:
        return await send_raw(port, case.raw)
    try:
        async with session.request(
            case.method,
            base + case.path,
            # aiohttp warns about big bytes bodies (they block the loop while written).
            data=None
            if case.method in ("GET", "HEAD")
            else io.BytesIO(case.body)
            if len(case.body) > 65536
            else case.body,
            headers=case.headers,
            skip_auto_headers=["Content-Type"] if "Content-Type" not in case.headers else [],
        ) as r:
            await r.read()
            return Outcome([r.status])
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome([], repr(exc))


async def run_fuzz(
    serve_url: str, port: int, cases: list[Case], deadline: float
) -> list[tuple[Case, Outcome]]:
    results: list[tuple[Case, Outcome]] = []
    queue = iter(cases)
    timeout = aiohttp.ClientTimeout(total=15)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, auto_decompress=False
    ) as session:

        async def worker() -> None:
            for case in queue:
                if time.monotonic() > deadline:
                    return
                results.append((case, await send(session, serve_url, port, case)))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def summary(failed: list[tuple[Case, Outcome]]) -> str:
    """The first few failed cases, readable (and without the secret in the test's output)."""
    shown = [
        (c.kind, c.method, c.path[:80], c.headers, (c.raw or c.body)[:300], o) for c, o in failed
    ]
    return "\n".join(repr(s).replace(WEBHOOK_SECRET, "<secret>") for s in shown[:10])


async def test_fuzz_the_running_server(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    cases = build_cases(rng, REQUESTS)
    db = tmp_path / "mirror.db"
    async with FakeBookStack(requests_per_minute=100_000) as fake:
        fake.seed(pages=5, books=1, seed=SEED)
        # No webhooks from the fake and no sweep: every stored webhook row is one sent here.
        env = serve_env(fake, db, free_port())
        async with serving(env, tmp_path) as serve:
            before = sql_one(db, "SELECT count(*) FROM events WHERE source = 'webhook'")[0]
            started = time.monotonic()
            results = await run_fuzz(serve.url, serve.port, cases, started + SECONDS)
            elapsed = time.monotonic() - started
            async with aiohttp.ClientSession() as session, session.get(f"{serve.url}/healthz") as r:
                alive = r.status
            stored = sql_one(db, "SELECT count(*) FROM events WHERE source = 'webhook'")[0]
            log = serve.output()
    kinds = Counter(c.kind for c, _ in results)
    statuses = Counter(s for _, o in results for s in o.statuses)
    print(f"fuzz seed {SEED}: {len(results)} requests in {elapsed:.1f} s")
    print(f"  kinds {dict(kinds)}\n  statuses {dict(statuses)}")
    assert len(results) >= min(REQUESTS, 1000), "too few requests sent to mean anything"
    assert alive == 200
    server_errors = [(c, o) for c, o in results if any(s >= 500 for s in o.statuses)]
    assert not server_errors, summary(server_errors)
    dropped = [(c, o) for c, o in results if c.good and o.statuses != [202] * c.expected]
    assert not dropped, summary(dropped)
    # Only the webhook route answers 202, and only once the event is committed.
    accepted = sum(o.statuses.count(202) for _, o in results)
    assert stored - before == accepted
    for spelling in (WEBHOOK_SECRET, quote(WEBHOOK_SECRET, safe=""), WEBHOOK_SECRET[1:]):
        assert spelling not in log
    assert WEBHOOK_SECRET[: len(WEBHOOK_SECRET) // 2] not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]
    # Bad input is the sender's: nothing of it is an error of ours (a failed request, an event
    # the database refused, aiohttp's own "Error handling request").
    errors = [line for line in log.splitlines() if '"level": "error"' in line]
    assert not errors, errors[:5]
