"""`GET /api/search` as BookStack's SearchApiController and SearchRunner answer it, for the
filters a sync uses: `{is_restricted}` (items with any entity_permissions row) and
`{type:a|b}`. Paging is per entity type: `count` (at most 100) rows of each type per page, so a
page holds up to four times `count`; `total` is the sum over the types (FACTS, first section).
Free-text terms are not modelled: a query with terms matches nothing here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from eventsync.testing.models import Book, Chapter, Entity, Page, Shelf, iso

if TYPE_CHECKING:
    from eventsync.testing.state import WikiState

# SearchRunner's entity order (the sample lists shelves first, then books).
TYPES = ("bookshelf", "book", "chapter", "page")
MAX_COUNT = 100
DEFAULT_COUNT = 100
_FILTER = re.compile(r"\{([a-z_]+)(?::([^}]*))?\}")


class SearchError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def parse(query: str) -> tuple[dict[str, str], str]:
    """`{is_restricted} {type:page|book} words` → filters and the remaining terms."""
    filters = {m.group(1): m.group(2) or "" for m in _FILTER.finditer(query)}
    return filters, _FILTER.sub(" ", query).strip()


def _table(state: WikiState, entity_type: str) -> dict[int, Any]:
    return {
        "bookshelf": state.shelves,
        "book": state.books,
        "chapter": state.chapters,
        "page": state.pages,
    }[entity_type]


def matches(state: WikiState, user_id: int, query: str) -> dict[str, list[Entity]]:
    """Per type, in id order (MySQL's order without ORDER BY), what the query finds among
    what `user_id` may view (binned items and others' drafts are never found)."""
    filters, terms = parse(query)
    wanted = set(TYPES)
    if "type" in filters:
        wanted &= set(filters["type"].split("|"))
    found: dict[str, list[Entity]] = {}
    for entity_type in TYPES:
        if entity_type not in wanted:
            continue
        table = _table(state, entity_type)
        items = [] if terms else list(state.visible(user_id, (table[i] for i in sorted(table))))
        if "is_restricted" in filters:
            items = [e for e in items if state.entity_permissions.get((e.TYPE, e.id))]
        found[entity_type] = items
    return found


def result(state: WikiState, entity: Entity) -> dict[str, Any]:
    """One search result, shaped like the real sample (api/search-is-restricted.json)."""
    row: dict[str, Any] = {
        "id": entity.id,
        "name": entity.name,
        "slug": entity.slug,
    }
    if isinstance(entity, Page | Chapter):
        row["book_id"] = entity.book_id
    if isinstance(entity, Page):
        row["chapter_id"] = entity.chapter_id
        row["draft"] = entity.draft
        row["template"] = entity.template
    row.update(
        {
            "created_at": iso(entity.created_at),
            "updated_at": iso(entity.updated_at),
            "url": state.url_of(entity),
            "type": entity.TYPE,
            "tags": [{"name": n, "value": v, "order": 0} for n, v in entity.tags],
            "preview_html": {"name": entity.name, "content": _preview(entity)},
        }
    )
    return row


def _preview(entity: Entity) -> str:
    if isinstance(entity, Shelf | Book | Chapter):
        return entity.description[:260]
    return re.sub(r"<[^>]+>", "", getattr(entity, "html", "") or "")[:260]


def page_of(state: WikiState, user_id: int, query: str, page: int, count: int) -> dict[str, Any]:
    found = matches(state, user_id, query)
    start = (page - 1) * count
    data = [result(state, e) for items in found.values() for e in items[start : start + count]]
    return {"data": data, "total": sum(len(items) for items in found.values())}


def validated(query: Any) -> tuple[str, int, int]:
    """(query, page, count) from request parameters, or SearchError as BookStack's
    validation answers it."""
    text = query.get("query", "")
    if not text:
        raise SearchError("query", "The query field is required.")
    values = {}
    for name, default in (("page", 1), ("count", DEFAULT_COUNT)):
        raw = query.get(name)
        if raw is None or raw == "":
            values[name] = default
            continue
        if not str(raw).lstrip("-").isdigit():
            raise SearchError(name, f"The {name} field must be an integer.")
        values[name] = int(raw)
    if values["count"] > MAX_COUNT:
        raise SearchError("count", f"The count field must not be greater than {MAX_COUNT}.")
    return text, max(1, values["page"]), max(1, values["count"])


def response(state: WikiState, user_id: int, query: Any, *, lose_one: bool = False) -> web.Response:
    """`lose_one`: a page that lost a result, as an unstable order without ORDER BY can."""
    try:
        text, page, count = validated(query)
    except SearchError as exc:
        body = {
            "error": {
                "message": "The given data was invalid.",
                "validation": {exc.field: [exc.message]},
                "code": 422,
            }
        }
        return web.json_response(body, status=422)
    body = page_of(state, user_id, text, page, count)
    if lose_one and body["data"]:
        body["data"] = body["data"][:-1]
    return web.json_response(body)
