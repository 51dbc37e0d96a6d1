"""Effective access as eventsync answers it: the `/access` routes, the lines `who-can-see`
and `can-see` print, and the refusal when the sync token cannot see everything."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from eventsync import access as rules
from eventsync.errors import EventsyncError
from eventsync.store.base import Store

# KIND as the commands and routes take it (eventsync's kinds; BookStack's `bookshelf` too).
CONTENT_TYPE_OF_KIND = {
    "shelf": "bookshelf",
    "bookshelf": "bookshelf",
    "book": "book",
    "chapter": "chapter",
    "page": "page",
}
KIND_OF_CONTENT_TYPE = {"bookshelf": "shelf", "book": "book", "chapter": "chapter", "page": "page"}
KINDS_TEXT = "shelf, book, chapter or page"
MAX_ID = 2**63 - 1  # SQLite's INTEGER
MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000


class AccessUnavailable(EventsyncError):
    """Effective access cannot be answered from this mirror."""


class BadRequest(EventsyncError):
    """The question is malformed (an unknown kind, an id that is no number)."""


class UnknownItem(EventsyncError):
    """The mirror holds no such item or user."""


def content_type_of(kind: str) -> str:
    content_type = CONTENT_TYPE_OF_KIND.get(kind.strip().lower())
    if content_type is None:
        raise BadRequest(f"unknown kind {kind!r}: use {KINDS_TEXT}")
    return content_type


def parse_id(raw: str, what: str = "id") -> int:
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_ID:
        raise BadRequest(f"{what} must be a whole number from 1 to {MAX_ID}, not {raw!r}")
    return int(text)


async def ensure_answerable(store: Store) -> None:
    problem = await store.access_problem()
    if problem is not None:
        raise AccessUnavailable(f"effective access unavailable: {problem}")


async def item_access(store: Store, content_type: str, content_id: int) -> dict[str, Any]:
    """An item's per-role status (joint_permissions) and the users who can view it."""
    await ensure_answerable(store)
    found = await store.access_of(content_type, content_id)
    kind = KIND_OF_CONTENT_TYPE[content_type]
    if found is None:
        raise UnknownItem(f"no {kind} {content_id} in the mirror")
    roles = await store.access_roles()
    for row in found["roles"]:
        role = roles.get(row["role_id"])
        row["name"] = role.name if role is not None else None
        row["status_name"] = rules.STATUS_NAMES[row["status"]]
    return {"kind": kind, "id": content_id, **found}


async def user_items(
    store: Store, user_id: int, content_type: str, after: int, limit: int
) -> dict[str, Any]:
    await ensure_answerable(store)
    if await store.get("user", user_id) is None:
        raise UnknownItem(f"no user {user_id} in the mirror")
    ids = await store.visible_ids(user_id, content_type, after, limit)
    return {
        "user_id": user_id,
        "kind": KIND_OF_CONTENT_TYPE[content_type],
        "after": after,
        "ids": ids,
        # Another page may follow only when this one is full.
        "next_after": ids[-1] if len(ids) == limit else None,
    }


async def _inputs(store: Store, content_type: str, content_id: int) -> tuple[Any, Any]:
    chain = await store.access_chain(content_type, content_id)
    if chain is None:
        kind = KIND_OF_CONTENT_TYPE[content_type]
        raise UnknownItem(f"no {kind} {content_id} in the mirror")
    return chain, await store.access_roles()


async def can_see(
    store: Store, user_id: int, content_type: str, content_id: int
) -> tuple[bool, str]:
    """(visible, the one-line reason) for one user and one item."""
    await ensure_answerable(store)
    (levels, owner_id), roles = await _inputs(store, content_type, content_id)
    if await store.get("user", user_id) is None:
        raise UnknownItem(f"no user {user_id} in the mirror")
    mine = [roles[r] for r in await store.user_role_ids(user_id) if r in roles]
    visible, why = rules.explain_user(user_id, mine, levels, owner_id)
    kind = KIND_OF_CONTENT_TYPE[content_type]
    verdict = "can see" if visible else "cannot see"
    return visible, f"user {user_id} {verdict} {kind} {content_id}: {why}"


async def who_can_see(store: Store, content_type: str, content_id: int) -> list[str]:
    """Lines for a person at a shell: the users who can view the item, then each role's
    status with its reason."""
    await ensure_answerable(store)
    (levels, owner_id), roles = await _inputs(store, content_type, content_id)
    found = await store.access_of(content_type, content_id)
    users = found["users"] if found is not None else []
    kind = KIND_OF_CONTENT_TYPE[content_type]
    owner = f"user {owner_id}" if owner_id else "nobody"
    lines = [
        f"{kind} {content_id} (owner: {owner}): {len(users)} user(s) can see it: "
        + (", ".join(str(u) for u in users) or "none")
    ]
    for role_id in sorted(roles):
        status, why = rules.explain_role(roles[role_id], levels, owner_id)
        lines.append(f"  {rules.STATUS_NAMES[status]:<14}  {why}")
    return lines


# ---- HTTP -------------------------------------------------------------------------------------


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def _error(status: int, exc: Exception) -> web.Response:
    return web.json_response({"error": {"message": str(exc), "code": status}}, status=status)


async def _answer(coro: Any) -> web.Response:
    try:
        return web.json_response(await coro)
    except BadRequest as exc:
        return _error(400, exc)
    except UnknownItem as exc:
        return _error(404, exc)
    except AccessUnavailable as exc:
        # Not the caller's fault and not transient: the deployment has to change.
        return _error(409, exc)


def routes(store: Store) -> list[tuple[str, Any]]:
    """(path, handler) of the GET routes under /access."""

    async def item(request: web.Request) -> web.Response:
        try:
            content_type = content_type_of(request.match_info["kind"])
            content_id = parse_id(request.match_info["id"])
        except BadRequest as exc:
            return _error(400, exc)
        return await _answer(item_access(store, content_type, content_id))

    async def user(request: web.Request) -> web.Response:
        try:
            user_id = parse_id(request.match_info["id"], "user id")
            content_type = content_type_of(request.query.get("kind") or "page")
            after = _int_query(request, "after", 0, 0, MAX_ID)
            limit = _int_query(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        except BadRequest as exc:
            return _error(400, exc)
        return await _answer(user_items(store, user_id, content_type, after, limit))

    # /access/users/{id} first: "users" is no kind, and must not be taken for one.
    return [("/access/users/{id}", user), ("/access/{kind}/{id}", item)]
