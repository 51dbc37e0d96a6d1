"""Route handlers of the fake BookStack REST API (FACTS §4, §5)."""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from eventsync.testing import search, shapes
from eventsync.testing.listing import LISTING_FIELDS, apply_listing
from eventsync.testing.models import Entity, Page, Perm
from eventsync.testing.mutations import NotFoundError

if TYPE_CHECKING:
    from eventsync.testing.server import FakeBookStack

FAKE_KEY: web.AppKey[Any] = web.AppKey("fake", object)
USER_KEY: web.RequestKey[int] = web.RequestKey("user_id", int)
TOKEN_KEY: web.RequestKey[str] = web.RequestKey("token_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

NO_PERMISSION = "You do not have permission to perform the requested action."
CONTENT_TYPES = {"page", "chapter", "book", "bookshelf"}
ENTITY_ROUTES = {"pages": "page", "chapters": "chapter", "books": "book", "shelves": "bookshelf"}


class ApiError(Exception):
    """An error BookStack renders as {"error": {"message", "code"}}."""

    def __init__(
        self, status: int, message: str, *, validation: dict[str, list[str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.validation = validation


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"message": message, **extra, "code": status}
    return web.json_response({"error": body}, status=status)


# layouts/base.blade.php around errors/404.blade.php, as a real v25.02.4 renders it for an
# unknown /api/ path (real-v25.02.4/api/error-unknown-api-route-404.html.head is its start).
_NOT_FOUND_PAGE = """<!DOCTYPE html>
<html lang="en-GB"
      dir="ltr"
      class="">
<head>
    <title>BookStack</title>

    <!-- Meta -->
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width">
    <meta name="base-url" content="{base_url}">
    <meta name="theme-color" content="#206ea7"/>

    <!-- Social Cards Meta -->
    <meta property="og:title" content="BookStack">
    <meta property="og:url" content="{page_url}">
</head>
<body class="">
    <div id="content" class="block">
        <div class="container mt-l">
            <div class="card mb-xl px-l pb-l pt-l">
                <h1 class="list-heading">Page Not Found</h1>
                <p>Sorry, The page you were looking for could not be found.</p>
            </div>
        </div>
    </div>
</body>
</html>
"""


def not_found_page(base_url: str, page_url: str) -> web.Response:
    """What BookStack answers for a path no route has: routes/web.php's Route::fallback renders
    the HTML 404 view, before any API middleware, so no JSON body and no rate-limit headers."""
    text = _NOT_FOUND_PAGE.format(
        base_url=html.escape(base_url, quote=True), page_url=html.escape(page_url, quote=True)
    )
    return web.Response(status=404, text=text, content_type="text/html")


def _fake(request: web.Request) -> FakeBookStack:
    return request.app[FAKE_KEY]  # type: ignore[no-any-return]


def _user_id(request: web.Request) -> int:
    return request[USER_KEY]


def _require(request: web.Request, *permissions: str) -> None:
    state = _fake(request).state
    if not all(state.user_can(_user_id(request), p) for p in permissions):
        raise ApiError(403, NO_PERMISSION)


def _id(request: web.Request) -> int:
    return int(request.match_info["id"])


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "Invalid JSON body") from exc
    if not isinstance(data, dict):
        raise ApiError(422, "The given data was invalid.")
    return data


def _model_not_found(model: str, model_id: object) -> ApiError:
    """A ModelNotFoundException from findOrFail, as Handler::renderApiException shows it."""
    return ApiError(404, f"No query results for model [BookStack\\{model}] {model_id}")


MODEL_CLASSES = {
    "page": "Entities\\Models\\Page",
    "chapter": "Entities\\Models\\Chapter",
    "book": "Entities\\Models\\Book",
    "bookshelf": "Entities\\Models\\Bookshelf",
}


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "The given data was invalid.", validation={field: [message]})


def _listing(request: web.Request, route: str, rows: list[dict[str, Any]]) -> web.Response:
    data, total = apply_listing(rows, LISTING_FIELDS[route], request.query)
    if route in _fake(request).faults.short_listings and data:
        data = data[:-1]  # a listing page that lost a row on the way; total still says it all
    return web.json_response({"data": data, "total": total})


# ------------------------------------------------------------------ content
def _visible_entity(request: web.Request, entity_type: str, entity_id: int) -> Entity:
    state = _fake(request).state
    entity = state.entity(entity_type, entity_id)
    if entity is None or not state.can_view(_user_id(request), entity):
        # lang/en/errors.php: bookshelf_not_found is "Shelf not found".
        label = {"bookshelf": "Shelf"}.get(entity_type, entity_type.capitalize())
        raise ApiError(404, f"{label} not found")
    return entity


async def list_content(request: web.Request) -> web.Response:
    route = request.match_info.route.resource.canonical  # type: ignore[union-attr]
    entity_type = ENTITY_ROUTES[route.rsplit("/", 1)[1]]
    state = _fake(request).state
    table = {
        "page": (state.pages, shapes.page_item),
        "chapter": (state.chapters, shapes.chapter_item),
        "book": (state.books, shapes.book_item),
        "bookshelf": (state.shelves, shapes.shelf_item),
    }
    items, formatter = table[entity_type]
    visible = state.visible(_user_id(request), (items[i] for i in sorted(items)))
    rows = [formatter(state, e) for e in visible]  # type: ignore[operator]
    return _listing(request, route, rows)


async def read_content(request: web.Request) -> web.Response:
    route = request.match_info.route.resource.canonical  # type: ignore[union-attr]
    entity_type = ENTITY_ROUTES[route.split("/")[2]]
    entity = _visible_entity(request, entity_type, _id(request))
    return web.json_response(_read_shape(request, entity))


def _read_shape(request: web.Request, entity: Entity) -> dict[str, Any]:
    state, viewer = _fake(request).state, _user_id(request)
    if entity.TYPE == "page":
        return shapes.page_read(state, entity, viewer)  # type: ignore[arg-type]
    if entity.TYPE == "chapter":
        return shapes.chapter_read(state, entity, viewer)  # type: ignore[arg-type]
    if entity.TYPE == "book":
        return shapes.book_read(state, entity, viewer)  # type: ignore[arg-type]
    return shapes.shelf_read(state, entity, viewer)  # type: ignore[arg-type]


def _write_shape(request: web.Request, entity: Entity) -> dict[str, Any]:
    """Create/update responses: the read shape without children, users as ints."""
    if isinstance(entity, Page):
        return _read_shape(request, entity)
    shape = _read_shape(request, entity)
    for key in ("contents", "pages"):
        shape.pop(key, None)
    for key in ("created_by", "updated_by", "owned_by"):
        shape[key] = getattr(entity, key)
    return shape


def _check_can(
    request: web.Request, action: str, entity: Entity, permission_type: str = ""
) -> None:
    state = _fake(request).state
    user_id = _user_id(request)
    if not (state.is_admin(user_id) or state.can(user_id, action, entity, permission_type)):
        raise ApiError(403, NO_PERMISSION)


def _name(data: dict[str, Any], *, required: bool) -> str | None:
    name = data.get("name")
    if name is None and not required:
        return None
    if not isinstance(name, str) or not name.strip():
        raise _invalid("name", "The name field is required.")
    if len(name) > 255:
        raise _invalid("name", "The name may not be greater than 255 characters.")
    return name


def _priority(data: dict[str, Any]) -> int | None:
    """`priority` is fillable on pages and chapters: given, it overrides the computed one."""
    value = data.get("priority")
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise _invalid("priority", "The priority must be an integer.") from exc


def _visible_parent(request: web.Request, entity_type: str, raw: Any) -> Entity:
    try:
        parent_id = int(raw)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"{entity_type}_id", f"The {entity_type} id must be an integer.") from exc
    return _visible_entity(request, entity_type, parent_id)


def _page_create_errors(data: dict[str, Any]) -> dict[str, list[str]]:
    """PageApiController's create rules, all checked at once as Laravel's validator does."""

    def missing(key: str) -> bool:
        # Laravel's "required" fails for an absent key, null, "" and [].
        return data.get(key) in (None, "", [])

    errors: dict[str, list[str]] = {}
    if missing("book_id") and missing("chapter_id"):
        errors["book_id"] = ["The book id field is required when chapter id is not present."]
        errors["chapter_id"] = ["The chapter id field is required when book id is not present."]
    try:
        _name(data, required=True)
    except ApiError as exc:
        errors.update(exc.validation or {})
    # Absent keys only: the fake has always taken an empty html as an empty page.
    if "html" not in data and "markdown" not in data:
        errors["html"] = ["The html field is required when markdown is not present."]
        errors["markdown"] = ["The markdown field is required when html is not present."]
    return errors


async def create_content(request: web.Request) -> web.Response:
    fake = _fake(request)
    route = request.match_info.route.resource.canonical  # type: ignore[union-attr]
    entity_type = ENTITY_ROUTES[route.rsplit("/", 1)[1]]
    data = await _json_body(request)
    user_id = _user_id(request)
    if entity_type == "page" and (errors := _page_create_errors(data)):
        raise ApiError(422, "The given data was invalid.", validation=errors)
    name = _name(data, required=True)
    assert name is not None
    tags = data.get("tags") or []
    if entity_type == "page":
        if data.get("chapter_id"):
            parent = _visible_parent(request, "chapter", data["chapter_id"])
        else:
            parent = _visible_parent(request, "book", data["book_id"])
        _check_can(request, "create", parent, "page")
        new_id = await fake.create_page(
            book_id=parent.id if parent.TYPE == "book" else None,
            chapter_id=parent.id if parent.TYPE == "chapter" else None,
            name=name,
            html=data.get("html"),
            markdown=data.get("markdown"),
            tags=tags,
            priority=_priority(data),
            acting_user_id=user_id,
        )
    elif entity_type == "chapter":
        parent = _visible_parent(request, "book", data.get("book_id"))
        _check_can(request, "create", parent, "chapter")
        new_id = await fake.create_chapter(
            parent.id,
            name,
            data.get("description") or "",
            tags,
            description_html=data.get("description_html"),
            priority=_priority(data),
            acting_user_id=user_id,
        )
    elif entity_type == "book":
        _require(request, "book-create-all")
        new_id = await fake.create_book(
            name,
            data.get("description") or "",
            tags,
            description_html=data.get("description_html"),
            acting_user_id=user_id,
        )
    else:
        _require(request, "bookshelf-create-all")
        new_id = await fake.create_shelf(
            name,
            [int(b) for b in data.get("books") or []],
            data.get("description") or "",
            tags,
            description_html=data.get("description_html"),
            acting_user_id=user_id,
        )
    entity = fake.state.entity(entity_type, new_id)
    assert entity is not None
    return web.json_response(_write_shape(request, entity))


async def update_content(request: web.Request) -> web.Response:
    fake = _fake(request)
    route = request.match_info.route.resource.canonical  # type: ignore[union-attr]
    entity_type = ENTITY_ROUTES[route.split("/")[2]]
    entity = _visible_entity(request, entity_type, _id(request))
    _check_can(request, "update", entity)
    data = await _json_body(request)
    user_id = _user_id(request)
    name = _name(data, required=False)
    tags = data.get("tags")
    description = data.get("description")
    description_html = data.get("description_html")
    # array_key_exists('default_template_id'): null or 0 clears it.
    template_id = int(data["default_template_id"] or 0) if "default_template_id" in data else None
    if entity_type == "page":
        assert isinstance(entity, Page)
        parent: Entity | None = None
        if data.get("chapter_id"):
            parent = _visible_parent(request, "chapter", data["chapter_id"])
        elif data.get("book_id"):
            parent = _visible_parent(request, "book", data["book_id"])
        current = fake.state.parent_of(entity)
        if parent is not None and (
            current is None
            or (parent.TYPE, parent.id)
            != (
                current.TYPE,
                current.id,
            )
        ):
            # PageApiController::update: move (page_move), then always update (page_update).
            _check_can(request, "delete", entity)
            await fake.move_page(
                entity.id,
                book_id=parent.id if parent.TYPE == "book" else None,
                chapter_id=parent.id if parent.TYPE == "chapter" else None,
                acting_user_id=user_id,
            )
        await fake.update_page(
            entity.id,
            name=name,
            html=data.get("html"),
            markdown=data.get("markdown"),
            tags=tags,
            summary=data.get("summary"),
            priority=_priority(data),
            acting_user_id=user_id,
        )
    elif entity_type == "chapter":
        if data.get("book_id") and int(data["book_id"]) != entity.book_id:  # type: ignore[attr-defined]
            book = _visible_parent(request, "book", data["book_id"])
            _check_can(request, "delete", entity)
            await fake.move_chapter(entity.id, book.id, acting_user_id=user_id)
        await fake.update_chapter(
            entity.id,
            name=name,
            description=description,
            description_html=description_html,
            tags=tags,
            default_template_id=template_id,
            priority=_priority(data),
            acting_user_id=user_id,
        )
    elif entity_type == "book":
        await fake.update_book(
            entity.id,
            name=name,
            description=description,
            description_html=description_html,
            tags=tags,
            default_template_id=template_id,
            acting_user_id=user_id,
        )
    else:
        books = data.get("books")
        await fake.update_shelf(
            entity.id,
            name=name,
            description=description,
            description_html=description_html,
            tags=tags,
            books=[int(b) for b in books] if books is not None else None,
            acting_user_id=user_id,
        )
    return web.json_response(_write_shape(request, entity))


async def delete_content(request: web.Request) -> web.Response:
    fake = _fake(request)
    route = request.match_info.route.resource.canonical  # type: ignore[union-attr]
    entity_type = ENTITY_ROUTES[route.split("/")[2]]
    entity = _visible_entity(request, entity_type, _id(request))
    _check_can(request, "delete", entity)
    deleters = {
        "page": fake.delete_page,
        "chapter": fake.delete_chapter,
        "book": fake.delete_book,
        "bookshelf": fake.delete_shelf,
    }
    await deleters[entity_type](entity.id, acting_user_id=_user_id(request))
    return web.Response(status=204)


# -------------------------------------------------------------- attachments
async def list_attachments(request: web.Request) -> web.Response:
    state = _fake(request).state
    attachments = sorted(state.visible_attachments(_user_id(request)), key=lambda a: a.id)
    rows = [shapes.attachment_item(state, a) for a in attachments]
    return _listing(request, "/api/attachments", rows)


async def read_attachment(request: web.Request) -> web.Response:
    state = _fake(request).state
    attachment = state.attachments.get(_id(request))
    page = state.pages.get(attachment.uploaded_to) if attachment else None
    visible = page is not None and state.can_view(_user_id(request), page, binned=True)
    if attachment is None or not visible:
        raise _model_not_found("Uploads\\Attachment", request.match_info["id"])
    return web.json_response(shapes.attachment_read(state, attachment))


# ------------------------------------------------------------ users, roles
async def list_users(request: web.Request) -> web.Response:
    _require(request, "users-manage")
    state = _fake(request).state
    last: dict[int, Any] = {}
    for activity in state.activities:
        if activity.committed and activity.user_id is not None:
            last[activity.user_id] = activity.created_at
    users = [state.users[i] for i in sorted(state.users) if state.users[i].committed]
    rows = [shapes.user_item(state, u, last.get(u.id)) for u in users]
    return _listing(request, "/api/users", rows)


async def read_user(request: web.Request) -> web.Response:
    _require(request, "users-manage")
    state = _fake(request).state
    user = state.users.get(_id(request))
    if user is None or not user.committed:
        raise _model_not_found("Users\\Models\\User", _id(request))
    return web.json_response(shapes.user_read(state, user))


async def list_roles(request: web.Request) -> web.Response:
    _require(request, "user-roles-manage")
    state = _fake(request).state
    roles = [state.roles[i] for i in sorted(state.roles) if state.roles[i].committed]
    return _listing(request, "/api/roles", [shapes.role_item(state, r) for r in roles])


async def read_role(request: web.Request) -> web.Response:
    _require(request, "user-roles-manage")
    state = _fake(request).state
    role = state.roles.get(_id(request))
    if role is None or not role.committed:
        raise _model_not_found("Users\\Models\\Role", _id(request))
    return web.json_response(shapes.role_read(state, role))


# -------------------------------------------------------- audit, recycle bin
async def list_audit_log(request: web.Request) -> web.Response:
    _require(request, "settings-manage", "users-manage")
    state = _fake(request).state
    # Rows logged inside a still-open transaction are not visible yet, ids notwithstanding.
    rows = [shapes.activity_row(state, a) for a in state.activities if a.committed]
    return _listing(request, "/api/audit-log", rows)


async def list_recycle_bin(request: web.Request) -> web.Response:
    _require(request, "settings-manage", "restrictions-manage-all")
    state = _fake(request).state
    rows = [shapes.deletion_row(state, state.deletions[i]) for i in sorted(state.deletions)]
    return _listing(request, "/api/recycle-bin", rows)


async def restore_recycle_bin(request: web.Request) -> web.Response:
    _require(request, "settings-manage", "restrictions-manage-all")
    fake = _fake(request)
    try:
        count = await fake.recycle_bin_restore(_id(request), acting_user_id=_user_id(request))
    except NotFoundError as exc:
        raise _model_not_found("Entities\\Models\\Deletion", _id(request)) from exc
    return web.json_response({"restore_count": count})


async def destroy_recycle_bin(request: web.Request) -> web.Response:
    _require(request, "settings-manage", "restrictions-manage-all")
    fake = _fake(request)
    try:
        count = await fake.recycle_bin_destroy(_id(request), acting_user_id=_user_id(request))
    except NotFoundError as exc:
        raise _model_not_found("Entities\\Models\\Deletion", _id(request)) from exc
    return web.json_response({"delete_count": count})


# ------------------------------------------------------- content permissions
def _permissions_target(request: web.Request) -> Entity:
    # EntityProvider::get lower-cases the type and throws (a 500) for an unknown one.
    entity_type = request.match_info["type"].lower()
    if entity_type not in CONTENT_TYPES:
        raise ApiError(500, f'Provided type "{entity_type}" is not a valid entity type')
    state, user_id = _fake(request).state, _user_id(request)
    found = state.entity(entity_type, _id(request))
    if found is None or not state.can_view(user_id, found):
        # ->scopes(['visible'])->findOrFail($contentId)
        raise _model_not_found(MODEL_CLASSES[entity_type], request.match_info["id"])
    entity: Entity = found
    # checkOwnableUserAccess('restrictions-manage'): all, or own for the owner.
    allowed = state.user_can(user_id, "restrictions-manage-all") or (
        state.user_can(user_id, "restrictions-manage-own") and entity.owned_by == user_id
    )
    if not allowed:
        raise ApiError(403, NO_PERMISSION)
    return entity


async def read_permissions(request: web.Request) -> web.Response:
    entity = _permissions_target(request)
    return web.json_response(shapes.content_permissions(_fake(request).state, entity))


async def update_permissions(request: web.Request) -> web.Response:
    """PermissionsUpdater::updateFromApiRequestData: each part replaced only when given."""
    fake = _fake(request)
    entity = _permissions_target(request)
    data = await _json_body(request)
    rows = dict(fake.state.entity_permissions.get((entity.TYPE, entity.id), {}))
    role_rows: Iterable[dict[str, Any]] = [
        {"role_id": r, **p.as_dict()} for r, p in rows.items() if r != 0
    ]
    if isinstance(data.get("role_permissions"), list):
        role_rows = [r for r in data["role_permissions"] if isinstance(r, dict)]
    fallback: dict[str, Any] | None = rows[0].as_dict() if 0 in rows else None
    if "fallback_permissions" in data:
        given = data["fallback_permissions"] or {}
        inheriting = given.get("inheriting")
        fallback = dict(given) if inheriting is not None and inheriting is not True else None
    owner_id = data.get("owner_id")
    if owner_id is not None and int(owner_id) not in fake.state.users:
        owner_id = None  # updateOwnerFromId ignores users that do not exist
    for row in role_rows:
        Perm.of(row)  # shape check; bad rows would be a 422 in BookStack
    await fake.set_permissions(
        entity.TYPE,
        entity.id,
        owner_id=int(owner_id) if owner_id is not None else None,
        fallback=fallback,
        role_permissions=role_rows,
        acting_user_id=_user_id(request),
    )
    return web.json_response(shapes.content_permissions(fake.state, entity))


async def search_content(request: web.Request) -> web.Response:
    fake = _fake(request)
    lose_one = "/api/search" in fake.faults.short_listings
    return search.response(fake.state, _user_id(request), request.query, lose_one=lose_one)


def routes() -> list[tuple[str, str, Handler]]:
    table: list[tuple[str, str, Handler]] = []
    for name in ENTITY_ROUTES:
        table += [
            ("GET", f"/api/{name}", list_content),
            ("POST", f"/api/{name}", create_content),
            ("GET", f"/api/{name}/{{id:\\d+}}", read_content),
            ("PUT", f"/api/{name}/{{id:\\d+}}", update_content),
            ("DELETE", f"/api/{name}/{{id:\\d+}}", delete_content),
        ]
    table += [
        ("GET", "/api/attachments", list_attachments),
        ("GET", "/api/attachments/{id:\\d+}", read_attachment),
        ("GET", "/api/users", list_users),
        ("GET", "/api/users/{id:\\d+}", read_user),
        ("GET", "/api/roles", list_roles),
        ("GET", "/api/roles/{id:\\d+}", read_role),
        ("GET", "/api/audit-log", list_audit_log),
        ("GET", "/api/recycle-bin", list_recycle_bin),
        ("PUT", "/api/recycle-bin/{id:\\d+}", restore_recycle_bin),
        ("DELETE", "/api/recycle-bin/{id:\\d+}", destroy_recycle_bin),
        ("GET", "/api/search", search_content),
        ("GET", "/api/content-permissions/{type}/{id:\\d+}", read_permissions),
        ("PUT", "/api/content-permissions/{type}/{id:\\d+}", update_permissions),
    ]
    return table
