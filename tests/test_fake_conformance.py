"""The fake BookStack answers in the shapes a real BookStack v25.02.4 does.

One scenario drives the fake through every kind of change the samples captured from a real
v25.02.4 hold (../shared/bookstack/real-v25.02.4/, see its README): it catches the webhook
bodies the fake POSTs with a real receiver on 127.0.0.1 and reads the fake's audit log and API
over HTTP. Each answer is then compared with the sample of its kind, recursively: the same keys
in every object and the same JSON types. Values (ids, names, times) are data and differ, except
in the error bodies, which the same request answers with the same text.

Where a sample cannot say what an answer must look like, a table below says so, with the
reason: NULL_OR_VALUE (a null that is data), BORROWED (an empty list whose element shape
another sample shows), UNSAMPLED_KINDS (list elements of a kind no sample shows), DERIVED
(expectations built from samples for answers the capture lacks) and EXCLUDED (samples the fake
cannot produce yet).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import helpers
import pytest

from eventsync.testing import FakeBookStack

Json = Any

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "bookstack" / "real-v25.02.4"
if not SAMPLES.is_dir():
    # Not a skip: without the samples nothing here would check anything.
    raise FileNotFoundError(
        f"The real BookStack samples are missing: expected {SAMPLES} "
        "(../shared/bookstack/real-v25.02.4 beside the repository, as CI checks it out)."
    )

HTML_404 = "api/error-unknown-api-route-404.html.head"
UNCOMPARED = "not compared"  # a receiver variant whose webhooks the test leaves out


def load(name: str) -> Json:
    return json.loads((SAMPLES / name).read_text())


def sample_files() -> list[str]:
    return sorted(p.relative_to(SAMPLES).as_posix() for p in SAMPLES.glob("*/*") if p.is_file())


# ------------------------------------------------------------- the allowances
@dataclass(frozen=True)
class NullOrValue:
    """At `path` (list indices written `[]`) of answers compared with `samples` (a glob over
    expectation names), null and a value are both right: which one is a matter of data."""

    samples: str
    path: str
    reason: str
    when: Callable[[Json], bool] | None = None  # on the whole answer; None: always


_RULE = "the captured books had no sort rule; a book with one holds its id (FACTS, sort rules)"
_DESCRIPTOR = re.compile(r"^\(\d+\) ")


def _anonymised(row: Json) -> bool:
    detail = row.get("detail")
    return isinstance(detail, str) and not _DESCRIPTOR.match(detail)


NULL_OR_VALUE: tuple[NullOrValue, ...] = (
    NullOrValue("api/read-book.json", "sort_rule_id", _RULE),
    NullOrValue("api/read-shelf.json", "books[].sort_rule_id", _RULE),
    NullOrValue("webhooks/book_*", "related_item.sort_rule_id", _RULE),
    # ActivityLogger::removeEntity: a permanent delete leaves the item's rows with the bare
    # name and no loggable (FACTS: "Permanent deletes rewrite old rows").
    NullOrValue("audit/*", "loggable_id", "permanently deleted item", _anonymised),
    NullOrValue("audit/*", "loggable_type", "permanently deleted item", _anonymised),
)

# (expectation glob, list path) -> (sample, list path there, reason): an empty list in the
# sample says nothing about its elements; these samples show the same elements.
BORROWED: dict[tuple[str, str], tuple[str, str, str]] = {
    ("api/read-page.json", "tags"): (
        "api/read-book.json",
        "tags",
        "every entity's tags are the same TagRepo rows",
    ),
    ("api/read-chapter.json", "pages"): (
        "api/list-pages.json",
        "data",
        "ChapterApiController::read lists its pages with the page listing's query and columns",
    ),
    ("api/read-content-permissions-page.json", "role_permissions"): (
        "api/read-content-permissions-book.json",
        "role_permissions",
        "the same endpoint and formatter for every content type",
    ),
}

# (expectation glob, list path, kind) -> reason: list elements no sample shows; not compared.
UNSAMPLED_KINDS: dict[tuple[str, str, str], str] = {
    ("api/read-book.json", "contents[]", "chapter"): (
        "the captured book held pages only: no sample shows a chapter's entry in `contents`"
    ),
    ("api/search-is-restricted.json", "data[]", "chapter"): (
        "the captured search found shelves and books only"
    ),
    ("api/search-is-restricted.json", "data[]", "page"): (
        "the captured search found shelves and books only"
    ),
}


def _book_sort_of_an_assignment() -> Json:
    body = load("webhooks/book_sort.json")
    body["related_item"] = load("webhooks/book_update.json")["related_item"]
    return body


def _permissions_update_of(event: str) -> Callable[[], Json]:
    def build() -> Json:
        body = load("webhooks/permissions_update.json")
        body["related_item"] = load(f"webhooks/{event}.json")["related_item"]
        return body

    return build


_SORT_RULE_EVENTS = (
    "FACTS: every sort-rule activity has detail '(id) name', no loggable, and a webhook with "
    "url /settings/sorting/rules/{id} and no related_item; the capture holds the create's "
    "webhook and the create's and update's audit rows only"
)

# Expectations built from samples, for answers the capture has no sample of: name -> (build,
# reason). Names start like the sample they lean on, so the allowances above apply to them.
DERIVED: dict[str, tuple[Callable[[], Json], str]] = {
    "webhooks/sort_rule_update.json": (
        lambda: load("webhooks/sort_rule_create.json"),
        _SORT_RULE_EVENTS,
    ),
    "webhooks/sort_rule_delete.json": (
        lambda: load("webhooks/sort_rule_create.json"),
        _SORT_RULE_EVENTS,
    ),
    "audit/sort_rule_delete.json": (lambda: load("audit/sort_rule_create.json"), _SORT_RULE_EVENTS),
    "webhooks/book_sort.json (rule assignment)": (
        _book_sort_of_an_assignment,
        "FACTS: the book_sort a rule assignment logs carries the whole book, sort_rule_id "
        "included, as book events do; the captured book_sort is a manual sort's short model",
    ),
    "webhooks/permissions_update.json (book)": (
        _permissions_update_of("book_update"),
        "related_item is the item's model, as in the item's own events; the capture's is a page",
    ),
}

# Samples the fake cannot produce, and why.
EXCLUDED: dict[str, str] = {}


# ------------------------------------------------------------ the comparison
def json_type(value: Json) -> str:
    if value is None:
        return "null"
    for kind, name in (
        (bool, "boolean"),  # before int: True is an int to Python, not to JSON
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    raise TypeError(f"not a JSON value: {value!r}")


def describe(value: Json) -> str:
    if isinstance(value, dict | list):
        return f"an {json_type(value)}"
    return f"{json_type(value)} {value!r}"[:80]


def kind_of(element: Json) -> str:
    """What tells list elements of different shapes apart: the entity type of a contents or
    search entry, a deletion's type and the type of its deletable's parent."""
    if not isinstance(element, dict):
        return ""
    parts = [element[k] for k in ("type", "deletable_type") if isinstance(element.get(k), str)]
    deletable = element.get("deletable")
    if isinstance(deletable, dict) and isinstance(deletable.get("parent"), dict):
        parts.append(f"in {deletable['parent'].get('type')}")
    return " ".join(parts)


def pattern(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass
class Comparison:
    """One expectation's comparisons; remembers what was exercised across its answers."""

    expect: str
    root: Json = None
    exercised: set[tuple[str, str]] = field(default_factory=set)  # (list path, kind)
    null_allowed: set[str] = field(default_factory=set)  # paths where an allowed null stood
    valued: set[str] = field(default_factory=set)  # paths where a value stood for a value

    def allows_null(self, path: str) -> bool:
        return any(
            fnmatch.fnmatchcase(self.expect, a.samples)
            and a.path == pattern(path)
            and (a.when is None or a.when(self.root))
            for a in NULL_OR_VALUE
        )

    def borrowed(self, path: str) -> list[Json]:
        for (glob, list_path), (sample, there, _) in BORROWED.items():
            if fnmatch.fnmatchcase(self.expect, glob) and list_path == pattern(path):
                return list(load(sample)[there])
        return []

    def unsampled(self, list_path: str, kind: str) -> bool:
        return any(
            fnmatch.fnmatchcase(self.expect, glob) and (p, k) == (list_path, kind)
            for glob, p, k in UNSAMPLED_KINDS
        )

    def first_difference(self, got: Json, want: Json) -> str | None:
        self.root = got
        return self._difference(got, want, "")

    def _difference(self, got: Json, want: Json, path: str) -> str | None:
        where = path or "(top level)"
        if (got is None) != (want is None):
            if self.allows_null(path):
                if got is None:
                    self.null_allowed.add(pattern(path))
                return None
            return f"{where}: {describe(got)} where the sample has {describe(want)}"
        if want is not None:
            self.valued.add(pattern(path))
        if json_type(got) != json_type(want):
            return f"{where}: {describe(got)} where the sample has {describe(want)}"
        if isinstance(want, dict):
            missing = [k for k in want if k not in got]
            extra = [k for k in got if k not in want]
            if missing or extra:
                return f"{where}: keys differ from the sample: missing {missing}, extra {extra}"
            for key in want:
                found = self._difference(got[key], want[key], join(path, key))
                if found:
                    return found
        if isinstance(want, list):
            return self._list_difference(got, want, path)
        return None

    def _list_difference(self, got: list[Json], want: list[Json], path: str) -> str | None:
        list_path = pattern(path) + "[]"
        shapes = want or self.borrowed(path)
        if got and not shapes:
            return (
                f"{path}: the sample's list is empty, so the {len(got)} element(s) here cannot "
                "be checked (name a sample that shows them in BORROWED)"
            )
        by_kind: dict[str, list[Json]] = {}
        for element in shapes:
            by_kind.setdefault(kind_of(element), []).append(element)
        for index, element in enumerate(got):
            kind = kind_of(element)
            here = f"{path}[{index}]"
            if kind not in by_kind:
                if self.unsampled(list_path, kind):
                    continue
                return (
                    f"{here}: a {kind or 'plain'} element; the sample's list shows only "
                    f"{sorted(by_kind)} (list it in UNSAMPLED_KINDS with the reason?)"
                )
            self.exercised.add((list_path, kind))
            # An element may match any sample element of its kind (one user has a
            # last_activity_at, another has null): report the difference from the first.
            found = [self._difference(element, shape, here) for shape in by_kind[kind]]
            if all(found):
                return found[0]
        return None


def list_kinds(expect: str, sample: Json) -> set[tuple[str, str]]:
    """The (list path, kind) of every list element the sample (or a borrowed one) shows."""
    found: set[tuple[str, str]] = set()
    probe = Comparison(expect)

    def walk(value: Json, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, join(path, key))
        elif isinstance(value, list):
            for element in value or probe.borrowed(path):
                found.add((path + "[]", kind_of(element)))
                walk(element, path + "[]")

    walk(sample, "")
    return found


# ------------------------------------------------------------------ capturing
@dataclass
class Answer:
    expect: str  # the sample file (or DERIVED name) it must look like
    label: str  # what produced it, for the failure message
    body: Json
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Captured:
    answers: list[Answer]
    webhook_headers: list[dict[str, str]]


class Receiver(helpers.Receiver):
    """Tags each body with the variant the scenario names."""

    def __init__(self) -> None:
        super().__init__()
        self.variant: str | None = None

    def keep(self, body: Json) -> tuple[Json, str | None]:
        return body, self.variant


async def drive(fake: FakeBookStack, receiver: Receiver) -> None:
    """Every kind of change the samples hold, on items shaped like the captured ones."""
    role = await fake.create_role("Role one", ["page-view-all"], "a role")
    await fake.update_role(role, display_name="Role one renamed")
    user = await fake.create_user("User one", "one@example.com", [role])
    await fake.update_user(user, name="User one renamed")
    await fake.log_ignored_activity("auth_login", "standard; (1) Admin")

    book = await fake.create_book("Book one", "about one", [("topic", "x1"), ("team", "")])
    other = await fake.create_book("Book two", "about two")
    chapter = await fake.create_chapter(book, "Chapter one", "about it", [("lang", "")])
    moving = await fake.create_chapter(book, "Chapter moving", "it moves")
    page = await fake.create_page(
        book_id=book, name="Page one", html="<p>one</p>", tags=[("kind", "x")]
    )
    marked = await fake.create_page(chapter_id=chapter, name="Page two", markdown="# two\n\nit")
    wandering = await fake.create_page(chapter_id=chapter, name="Page three", html="<p>3</p>")
    shelf = await fake.create_shelf("Shelf one", [book, other], "a shelf", [("topic", "ops")])
    await fake.create_attachment(page, "File one", content=b"one,two\n", extension="csv")
    await fake.create_attachment(page, "Link one", link="https://example.com/one")

    await fake.update_book(book, name="Book one renamed")
    await fake.update_chapter(chapter, description="about it, again")
    await fake.update_page(page, html="<p>one, again</p>")
    await fake.update_page(page, tags=[("kind", "y")])  # no new revision
    await fake.update_shelf(shelf, description="a shelf, again")
    await fake.move_page(wandering, book_id=other)
    await fake.move_chapter(moving, other)
    await fake.set_permissions("page", marked, role_permissions=[{"role_id": role, "view": True}])
    receiver.variant = "book"
    await fake.set_permissions(
        "book",
        other,
        fallback={"inheriting": False, "view": False},
        role_permissions=[{"role_id": 3, "view": True, "update": True}],
    )
    # A restricted shelf (with tags), for the {is_restricted} search's shelf entries; its
    # permissions_update webhook has no sample of a shelf's and is not compared.
    receiver.variant = UNCOMPARED
    await fake.set_permissions("bookshelf", shelf, fallback={"inheriting": False, "view": True})
    receiver.variant = None
    await fake.sort_book([("page", page, book, None, 7)])
    await fake.restore_revision(page)

    rule = await fake.create_sort_rule("Name asc", "name_asc")
    await fake.update_sort_rule(rule, name="Name asc, renamed")
    receiver.variant = "rule assignment"
    await fake.set_book_sort_rule(book, rule)
    receiver.variant = None
    await fake.update_book(book, description="sorted by name now")
    doomed = await fake.create_sort_rule("Doomed", "name_desc")
    await fake.delete_sort_rule(doomed)

    convertible = await fake.create_chapter(other, "Chapter to book", "becomes a book")
    await fake.create_page(chapter_id=convertible, name="Along", html="<p>along</p>")
    await fake.convert_chapter_to_book(convertible)
    to_shelf = await fake.create_book("Book to shelf", "becomes a shelf")
    inner = await fake.create_chapter(to_shelf, "Inner chapter", "becomes a book too")
    await fake.create_page(chapter_id=inner, name="Inner page", html="<p>in</p>")
    await fake.create_page(book_id=to_shelf, name="Direct page", html="<p>direct</p>")
    await fake.convert_book_to_shelf(to_shelf)

    # The bin ends with what the captured one shows: a page of a chapter and a shelf.
    binned = await fake.create_page(chapter_id=chapter, name="Binned", html="<p>bin</p>")
    restored = await fake.create_page(chapter_id=chapter, name="Restored", html="<p>r</p>")
    await fake.delete_page(binned)
    await fake.delete_page(restored)
    for _ in range(2):  # one destroyed, one restored: a live row of each delete type stays
        await fake.delete_chapter(await fake.create_chapter(other, "Doomed chapter", "gone"))
        await fake.delete_book(await fake.create_book("Doomed book", "gone"))
    await fake.delete_shelf(await fake.create_shelf("Doomed shelf", [], "gone"))
    bin_ids = {(d.deletable_type, d.deletable_id): d.id for d in fake.state.deletions.values()}
    doomed_chapters = sorted(i for t, i in bin_ids if t == "chapter")
    doomed_books = sorted(i for t, i in bin_ids if t == "book")
    await fake.recycle_bin_restore(bin_ids[("page", restored)])
    await fake.recycle_bin_destroy(bin_ids[("chapter", doomed_chapters[0])])
    await fake.recycle_bin_restore(bin_ids[("chapter", doomed_chapters[1])])
    await fake.recycle_bin_destroy(bin_ids[("book", doomed_books[0])])
    await fake.recycle_bin_restore(bin_ids[("book", doomed_books[1])])

    await fake.delete_user(await fake.create_user("Leaving", "leaving@example.com", [3]))
    await fake.delete_role(await fake.create_role("Leaving role", ["page-view-all"]))


async def capture() -> Captured:
    receiver = Receiver()
    await receiver.start()
    fake = FakeBookStack(requests_per_minute=100_000)
    await fake.start()
    try:
        fake.add_webhook(receiver.url, name="test receiver")
        await drive(fake, receiver)
        async with aiohttp.ClientSession() as http:
            answers = await read_api(fake, http)
    finally:
        await fake.stop()
        await receiver.stop()
    for index, (body, variant) in enumerate(receiver.bodies):
        if variant == UNCOMPARED:
            continue
        event = body.get("event")
        expect = f"webhooks/{event}.json" + (f" ({variant})" if variant else "")
        answers.append(Answer(expect, f"webhook #{index} {event}", body))
    return Captured(answers, receiver.headers)


async def _get(
    fake: FakeBookStack,
    http: aiohttp.ClientSession,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: Json = None,
) -> Answer:
    if headers is None:
        headers = {"Authorization": f"Token {fake.token_id}:{fake.token_secret}"}
    async with http.request(method, fake.url + path, headers=headers, json=body) as response:
        text = await response.text()
        parsed = json.loads(text) if response.content_type == "application/json" else text
        return Answer("", f"{method} {path}", parsed, response.status, dict(response.headers))


async def read_api(fake: FakeBookStack, http: aiohttp.ClientSession) -> list[Answer]:
    answers: list[Answer] = []

    async def read(expect: str, path: str, **kwargs: Any) -> Json:
        answer = await _get(fake, http, path, **kwargs)
        answer.expect = expect
        answers.append(answer)
        return answer.body

    ids: dict[str, list[int]] = {}
    for name, one in (
        ("books", "book"),
        ("chapters", "chapter"),
        ("pages", "page"),
        ("shelves", "shelf"),
        ("users", "user"),
        ("roles", "role"),
        ("attachments", "attachment"),
    ):
        listing = await read(f"api/list-{name}.json", f"/api/{name}?count=500")
        ids[name] = [row["id"] for row in listing["data"]]
        for item_id in ids[name]:
            await read(f"api/read-{one}.json", f"/api/{name}/{item_id}")
    await read("api/list-recycle-bin.json", "/api/recycle-bin?count=500")
    await read("api/search-is-restricted.json", "/api/search?query={is_restricted}")
    offset = 0
    while True:
        page = await _get(fake, http, f"/api/audit-log?count=500&offset={offset}")
        for row in page.body["data"]:
            label = f"audit row {row.get('id')}"
            answers.append(Answer(f"audit/{row.get('type')}.json", label, row))
        offset += 500
        if offset >= page.body["total"]:
            break
    for name, content_type in (
        ("books", "book"),
        ("chapters", "chapter"),
        ("pages", "page"),
        ("shelves", "bookshelf"),
    ):
        for item_id in ids[name]:
            path = f"/api/content-permissions/{content_type}/{item_id}"
            answer = await _get(fake, http, path)
            # The two samples differ by the data: the page's inherits, the book's does not.
            inheriting = answer.body.get("fallback_permissions", {}).get("inheriting", True)
            answer.expect = f"api/read-content-permissions-{'page' if inheriting else 'book'}.json"
            answers.append(answer)

    await read("api/error-401-no-token.json", "/api/books", headers={})
    wrong = {"Authorization": f"Token {fake.token_id}:not-the-secret"}
    await read("api/error-401-wrong-secret.json", "/api/books", headers=wrong)
    await read("api/error-404.json", "/api/pages/999999")
    await read("api/error-422.json", "/api/pages", method="POST", body={})
    await read(HTML_404, "/api/system")
    await read(HTML_404, "/api/system", headers={})
    return answers


@pytest.fixture(scope="module")
def captured() -> Captured:
    return asyncio.run(capture())


def expected(name: str) -> Json:
    if name in DERIVED:
        return DERIVED[name][0]()
    return load(name)


# ----------------------------------------------------------------------- tests
COMPARED = [name for name in sample_files() if name not in EXCLUDED] + sorted(DERIVED)


@pytest.mark.parametrize("expect", COMPARED)
def test_fake_answers_like_the_real_sample(captured: Captured, expect: str) -> None:
    answers = [a for a in captured.answers if a.expect == expect]
    assert answers, (
        f"{expect}: the scenario produced nothing to compare with it; drive the fake to "
        "produce it, or list it in EXCLUDED with the reason"
    )
    if expect == HTML_404:
        check_html_404(answers)
        return
    want = expected(expect)
    if expect.startswith("api/error-"):
        # The same request gets the same error: the text is compared too.
        for answer in answers:
            assert (answer.status, answer.body) == (want["error"]["code"], want), (
                f"{expect}: {answer.label}: status {answer.status}, body {answer.body!r}"
            )
        return
    comparison = Comparison(expect)
    for answer in answers:
        difference = comparison.first_difference(answer.body, want)
        assert difference is None, f"{expect}: {answer.label}: {difference}"
    unexercised = list_kinds(expect, want) - comparison.exercised
    assert not unexercised, (
        f"{expect}: no answer held a list element of these (path, kind), which the sample "
        f"shows: {sorted(unexercised)}; drive the fake to produce one"
    )
    # An allowed null must not hide the type: somewhere a value has to stand for it.
    unchecked = comparison.null_allowed - comparison.valued
    assert not unchecked, f"{expect}: only nulls at {sorted(unchecked)}, never a value"


def check_html_404(answers: list[Answer]) -> None:
    """The head of BookStack's HTML 404 page; only the app URL differs (the fake's own)."""
    head = (SAMPLES / HTML_404).read_text()
    lines = head.rstrip("\n").split("\n")
    for answer in answers:
        what = f"{HTML_404}: {answer.label}"
        content_type = answer.headers.get("Content-Type", "")
        assert (answer.status, content_type.split(";")[0]) == (404, "text/html"), (
            f"{what}: status {answer.status}, Content-Type {content_type!r}, "
            f"body {str(answer.body)[:120]!r}"
        )
        limits = [h for h in answer.headers if h.lower().startswith(("x-ratelimit", "retry-"))]
        assert not limits, f"{what}: rate-limit headers {limits} on the HTML 404"
        base = re.search(r'name="base-url" content="([^"]*)"', answer.body)
        assert base, f"{what}: no base-url meta in {answer.body[:200]!r}"
        want = [line.replace("http://127.0.0.1:8880", base.group(1)) for line in lines]
        got = answer.body.split("\n")[: len(want)]
        # The sample stops mid-line: its last line is only the start of the fake's.
        assert got[:-1] == want[:-1] and got[-1].startswith(want[-1]), (
            f"{what}: the page starts {got!r}, the sample {want!r}"
        )


def test_every_answer_has_a_sample(captured: Captured) -> None:
    """An answer kind the samples lack (a new event type, say) must be noticed, not skipped."""
    known = set(COMPARED)
    unknown = sorted({a.expect for a in captured.answers} - known)
    assert not unknown, (
        f"the fake produced answers no sample covers: {unknown}; add a DERIVED expectation "
        "(with the reason) or a captured sample"
    )


def test_every_sample_is_compared_or_excluded() -> None:
    files = set(sample_files())
    assert len(files) == 30 + 31 + 23, sorted(files)
    assert set(EXCLUDED) <= files, "an EXCLUDED sample that does not exist"
    assert not set(DERIVED) & files, "a DERIVED expectation that now has a real sample"
    assert files - set(EXCLUDED) <= set(COMPARED)


def test_webhooks_are_posted_like_bookstack_posts_them(captured: Captured) -> None:
    # README of the samples: Content-Type: application/json, User-Agent: GuzzleHttp/7.
    assert captured.webhook_headers
    for headers in captured.webhook_headers:
        sent = (headers.get("Content-Type"), headers.get("User-Agent"))
        assert sent == ("application/json", "GuzzleHttp/7"), f"a webhook POST with {headers}"
