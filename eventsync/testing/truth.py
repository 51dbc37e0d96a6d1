"""The truth: what a correct eventsync mirror of the fake holds (DESIGN.md export shape)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eventsync.testing.models import Entity, Page, iso

if TYPE_CHECKING:
    from eventsync.testing.state import WikiState


def build_truth(state: WikiState, user_id: int) -> dict[str, Any]:
    """What a correct mirror holds: DESIGN.md's `eventsync export` document."""

    def tags(entity: Entity) -> list[dict[str, str]]:
        return [{"name": n, "value": v} for n, v in entity.tags]

    def live(table: dict[int, Any]) -> list[Any]:
        items = state.visible(user_id, (table[i] for i in sorted(table)))
        return [e for e in items if not (isinstance(e, Page) and e.draft)]

    books = live(state.books)
    book_ids = {b.id for b in books}
    pages = live(state.pages)
    page_ids = {p.id for p in pages}
    live_users = [state.users[i] for i in sorted(state.users) if state.users[i].committed]
    live_roles = [state.roles[i] for i in sorted(state.roles) if state.roles[i].committed]
    role_users: dict[int, list[int]] = {r.id: [] for r in live_roles}
    for user in live_users:
        for role_id in sorted(user.roles):
            if role_id in role_users:
                role_users[role_id].append(user.id)

    permissions: list[dict[str, Any]] = []
    for content_type, table in (
        ("book", state.books),
        ("bookshelf", state.shelves),
        ("chapter", state.chapters),
        ("page", state.pages),
    ):
        for entity in live(table):
            rows = state.entity_permissions.get((content_type, entity.id))
            if not rows:
                continue
            fallback = rows.get(0)
            permissions.append(
                {
                    "content_type": content_type,
                    "content_id": entity.id,
                    "owner_id": entity.owned_by,
                    "inheriting": fallback is None,
                    "fallback": fallback.as_dict()
                    if fallback
                    else dict.fromkeys(("view", "create", "update", "delete")),
                    "role_permissions": [
                        {"role_id": role_id, **rows[role_id].as_dict()}
                        for role_id in sorted(rows)
                        if role_id != 0
                    ],
                }
            )
    permissions.sort(key=lambda p: (p["content_type"], p["content_id"]))

    return {
        "shelves": [
            {
                "id": s.id,
                "name": s.name,
                "slug": s.slug,
                "description": s.description,
                "books": [b for b in s.books if b in book_ids],
                "tags": tags(s),
            }
            for s in live(state.shelves)
        ],
        "books": [
            {
                "id": b.id,
                "name": b.name,
                "slug": b.slug,
                "description": b.description,
                "sort_rule_id": getattr(b, "sort_rule_id", None),
                "tags": tags(b),
            }
            for b in books
        ],
        "chapters": [
            {
                "id": c.id,
                "book_id": c.book_id,
                "name": c.name,
                "slug": c.slug,
                "description": c.description,
                "priority": c.priority,
                "tags": tags(c),
            }
            for c in live(state.chapters)
        ],
        "pages": [
            {
                "id": p.id,
                "book_id": p.book_id,
                "chapter_id": p.chapter_id or None,
                "name": p.name,
                "slug": p.slug,
                "priority": p.priority,
                "draft": False,
                "template": p.template,
                "revision_count": p.revision_count,
                "raw_html": p.html,
                "html": state.render_html(p, user_id),
                "markdown": p.markdown,
                "updated_at": iso(p.updated_at),
                "tags": tags(p),
            }
            for p in pages
        ],
        "attachments": [
            {
                "id": a.id,
                "name": a.name,
                "extension": a.extension,
                "uploaded_to": a.uploaded_to,
                "external": a.external,
                "order": a.order,
                "updated_at": iso(a.updated_at),
            }
            for a in sorted(state.attachments.values(), key=lambda a: a.id)
            if a.uploaded_to in page_ids
        ],
        "users": [
            {
                "id": u.id,
                "name": u.name,
                "slug": u.slug,
                "email": u.email,
                "roles": sorted(r for r in u.roles if r in role_users),
            }
            for u in live_users
        ],
        "roles": [
            {
                "id": r.id,
                "display_name": r.display_name,
                "description": r.description,
                "permissions": sorted(r.permissions),
                "users": role_users[r.id],
            }
            for r in live_roles
        ],
        "permissions": permissions,
    }
