"""BookStack activity types → what eventsync must do; webhook bodies and audit rows → Events.

The routing table is documented for humans in EVENTS.md next to this file; keep them in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Hints say what a job must do besides reading the entity's current state.
FETCH = "fetch"  # read the entity, write it (404: remove it with what BookStack hides with it)
PERMISSIONS = "permissions"  # read its content permissions
# A new item has no permission rows of its own: BookStack's creates (API, web and copies;
# Cloner copies no permissions) set none, so they are written, not read. Only conversions
# copy permissions, and their *_create_from_* events ask for a real read (FACTS 2.3).
DEFAULT_PERMISSIONS = "default_permissions"
MOVE = "move"  # a chapter moved: its pages moved silently with it
SORT = "sort"  # a book was sorted: pages/chapters may have moved in or out silently
SUBTREE = "subtree"  # restored or converted: children reappeared or moved in silently
EXPECT_PRESENT = "expect_present"  # webhook sent before commit: a 404 may be too early
EXPECT_GONE = "expect_gone"  # webhook sent before the delete: a 200 may be too early
ROLES_REFRESH = "roles_refresh"  # a role delete migrated its members silently
RESOLVE_RESTORE = "resolve_restore"  # deletion:N → find the entity, then restore it
RESOLVE_DESTROY = "resolve_destroy"  # deletion:N → find the entity, confirm it is gone

# The job that diff-syncs everything from listings (gaps, conversions, periodic checks).
DIFF_KEY = "diff:0"
# Its payload after a gap: events were lost, and a listing diff cannot see what they said
# about content permissions or role membership, so those are re-read for every item too.
THOROUGH = {"thorough": True}
# Jobs that diff attachments against their listing: of one page, or of every page (0).
# Attachments emit no events (FACTS 2.5); restores bring them back silently.
ATTACHMENTS_KIND = "attachments"
ALL_ATTACHMENTS_KEY = "attachments:0"

# A book's contents re-read (its priorities): BookStack re-sorts a book with a sort rule
# after every change inside it, and every book of a rule when the rule changes, moving no
# updated_at (FACTS, first section). The key is a kind of its own so that it never merges
# into an earlier book job: it must run after RESORT_DELAY, because the webhook that caused
# it is sent before the re-sort.
CONTENTS_KIND = "contents"
RESORT_DELAY = 2.0
# owners:N jobs: a deleted user's content was handed to another user; the listings of what
# changed since show to whom (payload "since": the delete's time).
OWNERS_KIND = "owners"
# sort_rule:N jobs: the rule changed (update: re-read its books' contents) or went away
# (delete: its books lose the rule and their updated_at moves, with no book event).
SORT_RULE_KIND = "sort_rule"

# Entity kinds as the mirror names them, from BookStack's morph types / event prefixes.
KIND_OF = {"page": "page", "chapter": "chapter", "book": "book", "bookshelf": "shelf"}


@dataclass(frozen=True)
class Route:
    kind: str | None  # the key's kind; None = ignored on purpose
    hints: frozenset[str] = frozenset()
    why: str = ""


def _r(kind: str | None, *hints: str, why: str = "") -> Route:
    return Route(kind, frozenset(hints), why)


ROUTES: dict[str, Route] = {
    "page_create": _r("page", FETCH, DEFAULT_PERMISSIONS),
    "page_update": _r("page", FETCH),
    "page_delete": _r("page", FETCH),
    "page_restore": _r("page", FETCH, why="a revision restore, not a recycle-bin restore"),
    "page_move": _r("page", FETCH),
    "revision_restore": _r("page", FETCH),
    "chapter_create": _r("chapter", FETCH, DEFAULT_PERMISSIONS),
    "chapter_update": _r("chapter", FETCH),
    "chapter_delete": _r("chapter", FETCH),
    "chapter_move": _r("chapter", FETCH, MOVE),
    "book_create": _r("book", FETCH, DEFAULT_PERMISSIONS),
    "book_create_from_chapter": _r("book", FETCH, PERMISSIONS, SUBTREE),
    "book_update": _r("book", FETCH),
    "book_delete": _r("book", FETCH),
    "book_sort": _r("book", FETCH, SORT),
    "bookshelf_create": _r("shelf", FETCH, DEFAULT_PERMISSIONS),
    "bookshelf_create_from_book": _r("shelf", FETCH, PERMISSIONS, SUBTREE),
    "bookshelf_update": _r("shelf", FETCH),
    "bookshelf_delete": _r("shelf", FETCH),
    "permissions_update": _r(None, PERMISSIONS),  # kind comes from the payload
    "user_create": _r("user", FETCH, EXPECT_PRESENT),
    "user_update": _r("user", FETCH),
    "user_delete": _r("user", FETCH),
    "auth_register": _r("user", FETCH, EXPECT_PRESENT),
    "role_create": _r("role", FETCH, EXPECT_PRESENT),
    "role_update": _r("role", FETCH),
    "role_delete": _r("role", FETCH, EXPECT_GONE, ROLES_REFRESH),
    "sort_rule_update": _r(SORT_RULE_KIND, SORT, why="its books are re-sorted silently"),
    "sort_rule_delete": _r(SORT_RULE_KIND, FETCH, why="its books lose it silently"),
    "recycle_bin_restore": _r("deletion", RESOLVE_RESTORE),
    "recycle_bin_destroy": _r("deletion", RESOLVE_DESTROY),
}

# Activity types that change nothing eventsync mirrors: counted, never fetched.
IGNORED = frozenset(
    {
        "auth_login",
        "auth_password_reset_request",
        "auth_password_reset_update",
        "mfa_setup_method",
        "mfa_remove_method",
        "api_token_create",
        "api_token_update",
        "api_token_delete",
        "webhook_create",
        "webhook_update",
        "webhook_delete",
        "settings_update",
        "maintenance_action_run",
        "comment_create",
        "comment_update",
        "comment_delete",
        "commented_on",
        "revision_delete",  # removes a stored revision; the page itself is unchanged
        "recycle_bin_empty",  # only destroys what is already out of the mirror
        "sort_rule_create",  # no book uses a new rule yet
    }
)


@dataclass(frozen=True)
class Event:
    """One activity, from a webhook or the audit log, reduced to what the queue needs."""

    source: str  # webhook | audit | reconcile
    type: str
    key: str | None  # "page:12", "user:3", "deletion:7"; None when nothing is to be synced
    hints: frozenset[str] = frozenset()
    at: float | None = None  # BookStack's clock, unix seconds (1 s resolution)
    activity_id: int | None = None
    payload: dict[str, Any] = field(default_factory=dict, compare=False)
    raw: str | None = field(default=None, compare=False)  # the body as received, if any

    @property
    def ignored(self) -> bool:
        return self.key is None


class WebhookUser(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int | None = None
    name: str | None = None
    slug: str | None = None


class WebhookBody(BaseModel):
    """BookStack's webhook body (FACTS §1.4). Only `event` is required: the rest varies."""

    model_config = ConfigDict(extra="allow")
    event: str = Field(min_length=1, max_length=100)
    text: str | None = None
    triggered_at: str | None = None
    triggered_by: WebhookUser | None = None
    webhook_id: int | None = None
    webhook_name: str | None = None
    url: str | None = None
    related_item: dict[str, Any] | None = None


class BadEvent(ValueError):
    """The body is not a BookStack webhook."""


# JSON's \uXXXX escapes can spell half of a UTF-16 surrogate pair, which json.loads turns into
# a lone surrogate: a Python str, but no text, and SQLite (UTF-8) cannot store it. Decoded
# strictly from UTF-8, a body holds none unless it spells one this way, so only a body that
# contains such an escape is searched.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(raw: Any, text: str | None = None) -> str | None:
    """Where in a parsed JSON value a string (key or value) holds a lone surrogate, as a
    dotted path ("related_item.name"), or None. `text`, the strictly decoded body `raw` was
    parsed from, lets a body without surrogate escapes skip the search."""
    if text is not None and not _SURROGATE_ESCAPE.search(text):
        return None
    # An explicit stack: the parser accepts nesting deeper than a recursive walk could go.
    stack: list[tuple[str, Any]] = [("", raw)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and _SURROGATE.search(key):
                    return path
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None


def parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


_URL_KIND = [
    (re.compile(r"/books/[^/]+/page/[^/]+$"), "page"),
    (re.compile(r"/books/[^/]+/draft/\d+$"), "page"),
    (re.compile(r"/books/[^/]+/chapter/[^/]+$"), "chapter"),
    (re.compile(r"/books/[^/]+$"), "book"),
    (re.compile(r"/shelves/[^/]+$"), "shelf"),
]
_DELETION_URL = re.compile(r"/settings/recycle-bin/(\d+)(?:/|$)")
_SORT_RULE_URL = re.compile(r"/settings/sorting/rules/(\d+)(?:/|$)")
_ID_DETAIL = re.compile(r"^\((\d+)\)")
# auth_register's detail is the new User, or for a social login its SocialAccount, whose
# descriptor is "{driver}; ({user id}) {user name}" (FACTS 1.2).
_SOCIAL_DETAIL = re.compile(r"^[\w-]+; \((\d+)\)")
_DELETION_DETAIL = re.compile(r"^Deletion \((\d+)\)(?: for (\w+) \((\d+)\))?")
_REVISION_DETAIL = re.compile(r"for page ID (\d+)")

# SQLite's INTEGER is 64-bit signed; BookStack's ids are unsigned INT auto-increments.
MAX_ID = 2**63 - 1


def as_id(value: Any) -> int | None:
    """An item id from untrusted JSON: a positive integer that fits SQLite, else None.
    `True` is an int to Python and "12" is no id in BookStack's JSON: neither counts."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 < value <= MAX_ID else None


def _digits_id(text: str | None) -> int | None:
    """An id parsed out of a URL or an audit `detail` string."""
    if text is None or not text.isdigit() or len(text) > 19:
        return None
    return as_id(int(text))


def _entity_kind_from_item(item: dict[str, Any], url: str | None) -> str | None:
    """Which content kind a related_item is: the URL says it; the shape is the fallback."""
    if url:
        path = url.split("?", 1)[0].split("#", 1)[0].rstrip("/")
        for pattern, kind in _URL_KIND:
            if pattern.search(path):
                return kind
    if "chapter_id" in item and "book_id" in item:
        return "page"
    if "book_id" in item:
        return "chapter"
    if "default_template_id" in item:
        return "book"
    if "slug" in item and "name" in item:
        return "shelf"
    return None


_BODY_TYPES: dict[str, tuple[type, ...]] = {
    "text": (str,),
    "triggered_at": (str,),
    "triggered_by": (dict,),
    "webhook_name": (str,),
    "url": (str,),
    "related_item": (dict,),
}


class _PlainBody:
    """A body of exactly BookStack's types, as WebhookBody would read it."""

    __slots__ = ("event", "related_item", "triggered_at", "url")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.event: str = raw["event"]
        self.triggered_at: str | None = raw.get("triggered_at")
        self.url: str | None = raw.get("url")
        self.related_item: dict[str, Any] | None = raw.get("related_item")


def _plain_body(raw: dict[str, Any]) -> _PlainBody | None:
    """The hot path of webhook intake: a body whose fields have exactly the types BookStack
    sends needs no validation model (WebhookBody would accept it unchanged). Anything else
    goes through WebhookBody, for its coercions and its error messages."""
    event = raw.get("event")
    if not isinstance(event, str) or not 1 <= len(event) <= 100:
        return None
    for name, types in _BODY_TYPES.items():
        value = raw.get(name)
        if value is not None and not isinstance(value, types):
            return None
    webhook_id = raw.get("webhook_id")
    if webhook_id is not None and (isinstance(webhook_id, bool) or not isinstance(webhook_id, int)):
        return None
    by = raw.get("triggered_by")
    if by is not None and not all(
        v is None or (isinstance(v, t) and not isinstance(v, bool))
        for v, t in ((by.get("id"), int), (by.get("name"), str), (by.get("slug"), str))
    ):
        return None
    return _PlainBody(raw)


def _printable(path: str) -> str:
    """A JSON path for an error message: surrogates escaped, long keys cut."""
    path = path.encode("utf-8", "backslashreplace").decode("utf-8")
    return path if len(path) <= 200 else path[:200] + "…"


def from_webhook(raw: Any, text: str | None = None) -> Event:
    """A webhook body → Event; raises BadEvent when it is not shaped like one. `text` is the
    body as received (strictly decoded UTF-8): it is what gets stored."""
    if not isinstance(raw, dict):
        raise BadEvent("the body must be a JSON object")
    surrogate = lone_surrogate_at(raw, text)
    if surrogate is not None:
        raise BadEvent(
            f"{_printable(surrogate)}: a lone UTF-16 surrogate (\\uD800-\\uDFFF) is not text"
        )
    body: Any = _plain_body(raw)
    if body is None:
        try:
            body = WebhookBody.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise BadEvent(f"{where}: {first['msg']}") from None
    at = parse_time(body.triggered_at)
    route = ROUTES.get(body.event)
    if route is None:
        return Event("webhook", body.event, None, at=at, payload=raw, raw=text)
    item = body.related_item or {}
    item_id = as_id(item.get("id"))
    key: str | None = None
    if body.event == "revision_restore":
        page_id = as_id(item.get("page_id"))
        key = f"page:{page_id}" if page_id is not None else None
    elif body.event == "permissions_update":
        kind = _entity_kind_from_item(item, body.url)
        key = f"{kind}:{item_id}" if kind and item_id is not None else None
    elif route.kind == "deletion":
        match = _DELETION_URL.search(body.url or "")
        deletion_id = _digits_id(match.group(1)) if match else None
        key = f"deletion:{deletion_id}" if deletion_id is not None else None
    elif route.kind == SORT_RULE_KIND:
        # No related_item: the rule is named by its settings URL only.
        match = _SORT_RULE_URL.search(body.url or "")
        rule_id = _digits_id(match.group(1)) if match else None
        key = f"{SORT_RULE_KIND}:{rule_id}" if rule_id is not None else None
    elif body.event == "auth_register" and "driver" in item:
        # A SocialAccount: its own id is not the user's.
        user_id = as_id(item.get("user_id"))
        key = f"user:{user_id}" if user_id is not None else None
    elif item_id is not None and route.kind is not None:
        key = f"{route.kind}:{item_id}"
    if key is None:
        raise BadEvent(f"a {body.event} webhook must name its item (related_item.id or url)")
    return Event("webhook", body.event, key, route.hints, at=at, payload=raw, raw=text)


def from_audit(row: dict[str, Any]) -> Event:
    """An audit-log row → Event. Rows of destroyed items (loggable_id null, detail a bare name)
    name nothing we can fetch: their item is already gone from the mirror or will be found
    gone by the next diff sync."""
    activity_type = str(row.get("type") or "")
    activity_id = as_id(row.get("id"))
    at = parse_time(row.get("created_at"))
    detail = str(row.get("detail") or "")
    route = ROUTES.get(activity_type)
    key: str | None = None
    hints = route.hints if route else frozenset()
    payload: dict[str, Any] = {"detail": detail}
    if route is not None:
        loggable_kind = KIND_OF.get(str(row.get("loggable_type") or ""))
        loggable_id = as_id(row.get("loggable_id"))
        if activity_type == "revision_restore":
            match = _REVISION_DETAIL.search(detail)
            page_id = _digits_id(match.group(1)) if match else None
            key = f"page:{page_id}" if page_id else None
        elif loggable_kind and loggable_id is not None:
            key = f"{loggable_kind}:{loggable_id}"
        elif route.kind == "deletion":
            match = _DELETION_DETAIL.match(detail)
            deletion_id = _digits_id(match.group(1)) if match else None
            if match and deletion_id is not None:
                key = f"deletion:{deletion_id}"
                entity_kind = KIND_OF.get(match.group(2) or "")
                entity_id = _digits_id(match.group(3))
                if entity_kind and entity_id is not None:
                    payload["entity"] = f"{entity_kind}:{entity_id}"
        elif route.kind in ("user", "role", SORT_RULE_KIND):
            match = _ID_DETAIL.match(detail) or (
                _SOCIAL_DETAIL.match(detail) if activity_type == "auth_register" else None
            )
            entity_id = _digits_id(match.group(1)) if match else None
            key = f"{route.kind}:{entity_id}" if entity_id is not None else None
    return Event(
        "audit",
        activity_type,
        key,
        hints if key else frozenset(),
        at=at,
        activity_id=activity_id,
        payload=payload,
    )
