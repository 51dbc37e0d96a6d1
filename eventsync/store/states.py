"""The change feed's vocabulary, and the "state" each change row carries: the entity's mirror
row right after the change, taken in the change's own transaction."""

from __future__ import annotations

import base64
import json
import sqlite3
from typing import Any

# Every `entity` value a change row can have, in the order the docs list them. `access` is
# the effective-access row DESIGN.md describes (the set of users who can view an item).
FEED_ENTITIES = (
    "shelf",
    "book",
    "chapter",
    "page",
    "attachment",
    "user",
    "role",
    "shelf_books",
    "user_role",
    "permissions",
    "access",
)

# Entities with a table row of their own, and that table.
_TABLES = {
    "shelf": "shelves",
    "book": "books",
    "chapter": "chapters",
    "page": "pages",
    "attachment": "attachments",
    "user": "users",
    "role": "roles",
}
# eventsync's own bookkeeping (read times), not BookStack's data: left out of a state.
_INTERNAL = frozenset({"fetched_at", "placed_at", "read_updated_at", "roles_read_at"})
_JSON = frozenset({"tags", "permissions"})
_BOOLEAN = frozenset({"draft", "template", "external", "mfa_enforced"})


def _row_state(conn: sqlite3.Connection, table: str, entity_id: int) -> dict[str, Any] | None:
    cur = conn.execute(f"SELECT * FROM {table} WHERE id = ?", (entity_id,))
    row = cur.fetchone()
    if row is None:
        return None
    out: dict[str, Any] = {}
    for (name, *_), value in zip(cur.description, tuple(row), strict=True):
        if name in _INTERNAL:
            continue
        if name in _JSON and isinstance(value, str):
            value = json.loads(value)
        elif name in _BOOLEAN and value is not None:
            value = bool(value)
        elif isinstance(value, bytes):
            # An attachment's file (EVENTSYNC_ATTACHMENT_CONTENT=true): JSON has no bytes.
            value = base64.b64encode(value).decode("ascii")
        out[name] = value
    return out


def _permission_state(
    conn: sqlite3.Connection, content_type: str | None, content_id: int
) -> dict[str, Any] | None:
    head = conn.execute(
        "SELECT owner_id, inheriting, fallback_view, fallback_create, fallback_update, "
        "fallback_delete FROM content_permissions WHERE content_type = ? AND content_id = ?",
        (content_type, content_id),
    ).fetchone()
    if head is None:
        return None

    def flag(value: int | None) -> bool | None:
        return None if value is None else bool(value)

    roles = conn.execute(
        'SELECT role_id, "view", "create", "update", "delete" FROM content_role_permissions '
        "WHERE content_type = ? AND content_id = ? ORDER BY role_id",
        (content_type, content_id),
    ).fetchall()
    # The shape of an `eventsync export` permissions entry.
    return {
        "content_type": content_type,
        "content_id": content_id,
        "owner_id": head[0],
        "inheriting": bool(head[1]),
        "fallback": {
            "view": flag(head[2]),
            "create": flag(head[3]),
            "update": flag(head[4]),
            "delete": flag(head[5]),
        },
        "role_permissions": [
            {
                "role_id": r[0],
                "view": bool(r[1]),
                "create": bool(r[2]),
                "update": bool(r[3]),
                "delete": bool(r[4]),
            }
            for r in roles
        ],
    }


def change_state(
    conn: sqlite3.Connection,
    op: str,
    entity: str,
    entity_id: int,
    content_type: str | None,
    data: Any,
) -> str | None:
    """The state of a change as JSON text, read inside the change's transaction (after the
    write it records); None after a delete and for entities without a row of their own."""
    if op == "delete":
        return None
    state: Any = None
    if entity in _TABLES:
        state = _row_state(conn, _TABLES[entity], entity_id)
    elif entity == "permissions":
        state = _permission_state(conn, content_type, entity_id)
    elif entity == "shelf_books":
        books = conn.execute(
            "SELECT book_id FROM shelf_books WHERE shelf_id = ? ORDER BY position", (entity_id,)
        ).fetchall()
        state = {"shelf_id": entity_id, "books": [b[0] for b in books]}
    elif entity == "user_role" and isinstance(data, dict):
        role_id = data.get("role_id")
        held = conn.execute(
            "SELECT 1 FROM user_roles WHERE user_id = ? AND role_id = ?", (entity_id, role_id)
        ).fetchone()
        state = {"user_id": entity_id, "role_id": role_id} if held else None
    return None if state is None else json.dumps(state, ensure_ascii=False)
