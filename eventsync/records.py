"""BookStack API payloads → mirror rows (one place that knows both shapes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from eventsync.bookstack import models as m

# Endpoint and models of each kind: (listing/read path, list-item model, read model).
ENDPOINTS: dict[str, tuple[str, type[BaseModel], type[BaseModel]]] = {
    "shelf": ("/api/shelves", m.ShelfListItem, m.Shelf),
    "book": ("/api/books", m.BookListItem, m.Book),
    "chapter": ("/api/chapters", m.ChapterListItem, m.Chapter),
    "page": ("/api/pages", m.PageListItem, m.Page),
    "attachment": ("/api/attachments", m.Attachment, m.Attachment),
    "user": ("/api/users", m.UserListItem, m.User),
    "role": ("/api/roles", m.RoleListItem, m.Role),
}

# Fields a listing carries that, when they differ from the mirror, mean the item changed.
# Pages add revision_count: link rewrites in other pages bump it (FACTS §2.5).
LISTED_FIELDS: dict[str, tuple[str, ...]] = {
    "shelf": ("name", "slug", "description", "updated_at"),
    "book": ("name", "slug", "description", "updated_at"),
    "chapter": ("book_id", "name", "slug", "description", "priority", "updated_at"),
    "page": (
        "book_id",
        "chapter_id",
        "name",
        "slug",
        "priority",
        "draft",
        "template",
        "revision_count",
        "updated_at",
    ),
    "attachment": ("name", "extension", "uploaded_to", "external", "order", "updated_at"),
    "user": ("name", "slug", "email", "external_auth_id", "updated_at"),
    "role": ("display_name", "description", "updated_at", "users_count", "permissions_count"),
}

# Kinds whose listing rows carry everything the mirror keeps: no read needed.
COMPLETE_FROM_LISTING = frozenset({"attachment", "user"})


def _tags(model: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "value": t.value} for t in getattr(model, "tags", [])]


def to_row(kind: str, model: BaseModel) -> dict[str, Any]:
    """Mirror row for `kind` from a list item or a read (fields it lacks come out None)."""
    d = model.model_dump()
    row: dict[str, Any] = {k: d.get(k) for k in d}
    if kind in ("shelf", "book", "chapter"):
        row["description"] = d.get("description") or ""
        row["tags"] = _tags(model)
    if kind == "page":
        row["tags"] = _tags(model)
        row["priority"] = d.get("priority") or 0
        row["revision_count"] = d.get("revision_count") or 0
    if kind == "chapter":
        row["priority"] = d.get("priority") or 0
    if kind == "attachment":
        row["order"] = d.get("order") or 0
        row["extension"] = d.get("extension") or ""
    if kind == "role":
        row["description"] = d.get("description") or ""
        row["system_name"] = d.get("system_name") or ""
        row["external_auth_id"] = d.get("external_auth_id") or ""
        row["permissions"] = sorted(d.get("permissions") or [])
    return row


def listed(kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    """A listing row reduced to the comparable fields, normalised like the mirror stores them."""
    model = ENDPOINTS[kind][1].model_validate(raw)
    row = to_row(kind, model)
    out = {f: row.get(f) for f in LISTED_FIELDS[kind]}
    for k, v in out.items():
        if isinstance(v, bool):
            out[k] = int(v)
    return out


def permissions_row(model: m.ContentPermissions) -> dict[str, Any]:
    fb = model.fallback_permissions
    return {
        "owner_id": model.owner.id if model.owner else None,
        "inheriting": fb.inheriting,
        "fallback": {
            "view": fb.view,
            "create": fb.create,
            "update": fb.update,
            "delete": fb.delete,
        },
        "role_permissions": [
            {
                "role_id": r.role_id,
                "view": r.view,
                "create": r.create,
                "update": r.update,
                "delete": r.delete,
            }
            for r in model.role_permissions
        ],
    }
