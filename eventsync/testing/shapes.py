"""JSON shapes of the fake BookStack: API listings, reads and webhook bodies (FACTS §1.4, §5)."""

from __future__ import annotations

import base64
import html as html_lib
from typing import TYPE_CHECKING, Any

from eventsync.testing import links
from eventsync.testing.models import (
    ACTIVITY_TEXT,
    Activity,
    Attachment,
    Book,
    Chapter,
    Deletion,
    Entity,
    Page,
    Revision,
    Role,
    Shelf,
    SortRule,
    User,
    Webhook,
    iso,
)

if TYPE_CHECKING:
    from eventsync.testing.state import WikiState

JSON = dict[str, Any]


def description_html(entity: Shelf | Book | Chapter) -> str:
    """forJsonDisplay: HasHtmlDescription::descriptionHtml()."""
    return links.description_html(entity.description, entity.description_html)


def tags_read(entity: Entity) -> list[JSON]:
    # TagRepo::saveTagsToEntity stores the input index as `order`.
    return [{"name": n, "value": v, "order": i} for i, (n, v) in enumerate(entity.tags)]


def _users(state: WikiState, entity: Entity | Attachment, *, objects: bool) -> JSON:
    keys = ("created_by", "updated_by") + (("owned_by",) if isinstance(entity, Entity) else ())
    if not objects:
        return {k: getattr(entity, k) for k in keys}
    return {k: state.user_ref(getattr(entity, k)) for k in keys}


# ------------------------------------------------------------------ listings
def page_item(state: WikiState, page: Page) -> JSON:
    book = state.books.get(page.book_id)
    return {
        "id": page.id,
        "book_id": page.book_id,
        "chapter_id": page.chapter_id,
        "name": page.name,
        "slug": page.slug,
        "priority": page.priority,
        "draft": page.draft,
        "template": page.template,
        "created_at": iso(page.created_at),
        "updated_at": iso(page.updated_at),
        **_users(state, page, objects=False),
        "revision_count": page.revision_count,
        "editor": page.editor,
        "book_slug": book.slug if book else None,
    }


def chapter_item(state: WikiState, chapter: Chapter) -> JSON:
    book = state.books.get(chapter.book_id)
    return {
        "id": chapter.id,
        "book_id": chapter.book_id,
        "name": chapter.name,
        "slug": chapter.slug,
        "description": chapter.description,
        "priority": chapter.priority,
        "created_at": iso(chapter.created_at),
        "updated_at": iso(chapter.updated_at),
        **_users(state, chapter, objects=False),
        "book_slug": book.slug if book else None,
    }


def _container_columns(state: WikiState, book: Book | Shelf) -> JSON:
    return {
        "id": book.id,
        "name": book.name,
        "slug": book.slug,
        "description": book.description,
        "created_at": iso(book.created_at),
        "updated_at": iso(book.updated_at),
        **_users(state, book, objects=False),
    }


def book_item(state: WikiState, book: Book | Shelf) -> JSON:
    # The listings load the cover image relation (null without a cover); nothing else of the
    # model shows, so no default_template_id or sort_rule_id here.
    return {**_container_columns(state, book), "cover": None}


shelf_item = book_item


def attachment_item(state: WikiState, attachment: Attachment) -> JSON:
    return {
        "id": attachment.id,
        "name": attachment.name,
        "extension": attachment.extension,
        "uploaded_to": attachment.uploaded_to,
        "external": attachment.external,
        "order": attachment.order,
        "created_at": iso(attachment.created_at),
        "updated_at": iso(attachment.updated_at),
        **_users(state, attachment, objects=False),
    }


def user_item(state: WikiState, user: User, last_activity: Any = None) -> JSON:
    return {
        "id": user.id,
        "name": user.name,
        "email": user.email,
        "created_at": iso(user.created_at),
        "updated_at": iso(user.updated_at),
        "external_auth_id": user.external_auth_id,
        "slug": user.slug,
        "last_activity_at": iso(last_activity),
        "profile_url": state.url(f"/user/{user.slug}"),
        "edit_url": state.url(f"/settings/users/{user.id}"),
        "avatar_url": state.url("/user_avatar.png"),
    }


def role_columns(role: Role) -> JSON:
    return {
        "id": role.id,
        "display_name": role.display_name,
        "description": role.description,
        "system_name": role.system_name,
        "external_auth_id": role.external_auth_id,
        "mfa_enforced": role.mfa_enforced,
        "created_at": iso(role.created_at),
        "updated_at": iso(role.updated_at),
    }


def role_item(state: WikiState, role: Role) -> JSON:
    users = sum(1 for u in state.users.values() if u.committed and role.id in u.roles)
    return {**role_columns(role), "users_count": users, "permissions_count": len(role.permissions)}


def activity_row(state: WikiState, activity: Activity) -> JSON:
    return {
        "id": activity.id,
        "type": activity.type,
        "detail": activity.detail,
        "user_id": activity.user_id,
        "loggable_id": activity.loggable_id,
        "loggable_type": activity.loggable_type,
        "ip": activity.ip,
        "created_at": iso(activity.created_at),
        "user": state.user_ref(activity.user_id),
    }


def deletion_row(state: WikiState, deletion: Deletion) -> JSON:
    entity = state.entity(deletion.deletable_type, deletion.deletable_id)
    deletable: JSON | None = None
    if entity is not None:
        # Every entity model lists deleted_at in $hidden.
        deletable = _entity_columns(state, entity)
        if isinstance(entity, Book | Chapter):
            pages = (
                state.book_pages(entity.id)
                if isinstance(entity, Book)
                else state.chapter_pages(entity.id)
            )
            deletable["pages_count"] = len(pages)
        if isinstance(entity, Book):
            deletable["chapters_count"] = len(state.book_chapters(entity.id))
        parent = state.parent_of(entity)
        if parent is not None:
            deletable["parent"] = {**_entity_columns(state, parent), "type": parent.TYPE}
    return {
        "id": deletion.id,
        "deleted_by": deletion.deleted_by,
        "created_at": iso(deletion.created_at),
        "updated_at": iso(deletion.updated_at),
        "deletable_type": deletion.deletable_type,
        "deletable_id": deletion.deletable_id,
        "deletable": deletable,
    }


# ---------------------------------------------------------------------- reads
def _entity_columns(state: WikiState, entity: Entity) -> JSON:
    """The model's attributes minus $hidden, users as ints (a related book or parent)."""
    if isinstance(entity, Page):
        return {k: v for k, v in page_item(state, entity).items() if k != "book_slug"}
    if isinstance(entity, Chapter):
        item = chapter_item(state, entity)
        item.pop("book_slug")
        return {**item, "default_template_id": entity.default_template_id}
    if isinstance(entity, Book):
        return {
            **_container_columns(state, entity),
            "default_template_id": entity.default_template_id,
            "sort_rule_id": entity.sort_rule_id,
        }
    return _container_columns(state, entity)  # type: ignore[arg-type]


def page_read(state: WikiState, page: Page, viewer_id: int) -> JSON:
    return {
        "id": page.id,
        "book_id": page.book_id,
        "chapter_id": page.chapter_id,
        "name": page.name,
        "slug": page.slug,
        "html": state.render_html(page, viewer_id),
        "raw_html": page.html,
        "priority": page.priority,
        "created_at": iso(page.created_at),
        "updated_at": iso(page.updated_at),
        **_users(state, page, objects=True),
        "draft": page.draft,
        "markdown": page.markdown,
        "revision_count": page.revision_count,
        "template": page.template,
        "editor": page.editor,
        "tags": tags_read(page),
    }


def _content_page(state: WikiState, page: Page, *, typed: bool) -> JSON:
    item = {
        "id": page.id,
        "name": page.name,
        "slug": page.slug,
        "book_id": page.book_id,
        "chapter_id": page.chapter_id,
        "draft": page.draft,
        "template": page.template,
        "priority": page.priority,
        "created_at": iso(page.created_at),
        "updated_at": iso(page.updated_at),
        "url": state.url_of(page),
    }
    if typed:
        item["type"] = "page"
    return item


def _tree_key(item: Page | Chapter) -> tuple[int, int, int]:
    # BookContents sorts drafts first, then by priority.
    return (0 if isinstance(item, Page) and item.draft else 1, item.priority, item.id)


def book_read(state: WikiState, book: Book, viewer_id: int) -> JSON:
    chapters = list(state.visible(viewer_id, state.book_chapters(book.id)))
    pages = list(state.visible(viewer_id, state.book_pages(book.id)))
    shown = {c.id for c in chapters}
    by_chapter: dict[int, list[Page]] = {}
    top: list[Page | Chapter] = list(chapters)
    for page in pages:
        # BookContents::getTree: a visible page whose chapter the viewer cannot see is one
        # of the book's "lone pages", at the top level (FACTS §6).
        if page.chapter_id in shown:
            by_chapter.setdefault(page.chapter_id, []).append(page)
        else:
            top.append(page)
    contents: list[JSON] = []
    for item in sorted(top, key=_tree_key):
        if isinstance(item, Page):
            contents.append(_content_page(state, item, typed=True))
            continue
        contents.append(
            {
                "id": item.id,
                "name": item.name,
                "slug": item.slug,
                "book_id": item.book_id,
                "priority": item.priority,
                "created_at": iso(item.created_at),
                "updated_at": iso(item.updated_at),
                "url": state.url_of(item),
                "type": "chapter",
                "pages": [
                    _content_page(state, p, typed=False)
                    for p in sorted(by_chapter.get(item.id, []), key=_tree_key)
                ],
            }
        )
    return {
        **_entity_columns(state, book),
        **_users(state, book, objects=True),
        "description_html": description_html(book),
        "tags": tags_read(book),
        "cover": None,
        "contents": contents,
    }


def chapter_read(state: WikiState, chapter: Chapter, viewer_id: int) -> JSON:
    pages = sorted(state.visible(viewer_id, state.chapter_pages(chapter.id)), key=_tree_key)
    return {
        **chapter_item(state, chapter),
        **_users(state, chapter, objects=True),
        "default_template_id": chapter.default_template_id,
        "description_html": description_html(chapter),
        "tags": tags_read(chapter),
        "pages": [page_item(state, p) for p in pages],  # type: ignore[arg-type]
    }


def shelf_read(state: WikiState, shelf: Shelf, viewer_id: int) -> JSON:
    books = [state.books[b] for b in shelf.books if b in state.books]
    return {
        **_container_columns(state, shelf),
        **_users(state, shelf, objects=True),
        "description_html": description_html(shelf),
        "tags": tags_read(shelf),
        "cover": None,
        "books": [_entity_columns(state, b) for b in state.visible(viewer_id, books)],
    }


def attachment_read(state: WikiState, attachment: Attachment) -> JSON:
    link = state.url(f"/attachments/{attachment.id}")
    name = html_lib.escape(attachment.name)
    content = (
        attachment.path
        if attachment.external
        else base64.b64encode(attachment.content).decode("ascii")
    )
    return {
        **attachment_item(state, attachment),
        **_users(state, attachment, objects=True),
        "links": {
            "html": f'<a target="_blank" href="{link}">{name}</a>',
            "markdown": f"[{attachment.name}]({link})",
        },
        "content": content,
    }


def user_read(state: WikiState, user: User) -> JSON:
    item = user_item(state, user)
    item.pop("last_activity_at")
    item["roles"] = [
        {"id": r.id, "display_name": r.display_name}
        for r in state.user_roles(user.id)
        if r.committed
    ]
    return item


def role_read(state: WikiState, role: Role) -> JSON:
    users = [
        {"id": u.id, "name": u.name, "slug": u.slug}
        for u in sorted(state.users.values(), key=lambda u: u.id)
        if u.committed and role.id in u.roles
    ]
    return {**role_columns(role), "permissions": sorted(role.permissions), "users": users}


def content_permissions(state: WikiState, entity: Entity) -> JSON:
    rows = state.entity_permissions.get((entity.TYPE, entity.id), {})
    fallback = rows.get(0)
    role_rows = []
    for role_id in sorted(r for r in rows if r != 0):
        role = state.roles.get(role_id)
        role_rows.append(
            {
                "role_id": role_id,
                **rows[role_id].as_dict(),
                "role": {"id": role.id, "display_name": role.display_name} if role else None,
            }
        )
    return {
        "owner": state.user_ref(entity.owned_by),
        "role_permissions": role_rows,
        "fallback_permissions": {
            "inheriting": fallback is None,
            **(
                fallback.as_dict()
                if fallback
                else dict.fromkeys(("view", "create", "update", "delete"))
            ),
        },
    }


# ------------------------------------------------------------------- webhooks
def revision_item(revision: Revision) -> JSON:
    return {
        "id": revision.id,
        "page_id": revision.page_id,
        "name": revision.name,
        "created_by": revision.created_by,
        "created_at": iso(revision.created_at),
        "updated_at": iso(revision.created_at),
        "slug": revision.slug,
        "book_slug": revision.book_slug,
        "type": revision.type,
        "summary": revision.summary,
        "revision_number": revision.revision_number,
    }


def related_item(
    state: WikiState, event: str, detail: object, *, listed: bool = False
) -> JSON | None:
    """WebhookFormatter::formatModel: the model's array with user relations as objects."""
    if isinstance(detail, Entity):
        item = _entity_columns(state, detail)
        item.pop("book_slug", None)
        item.update(_users(state, detail, objects=True))
        if listed:
            # BookQueries::visibleForList selects no created_by, updated_by, default_template_id
            # or sort_rule_id: the user relations load as null, the columns are absent.
            item["created_by"] = None
            item["updated_by"] = None
            item.pop("default_template_id", None)
            item.pop("sort_rule_id", None)
        if isinstance(detail, Page) and event in ("page_create", "page_update"):
            versions = [r for r in detail.revisions if r.type == "version"]
            item["current_revision"] = revision_item(versions[-1]) if versions else None
        return item
    if isinstance(detail, User):
        return {"id": detail.id, "name": detail.name, "slug": detail.slug}
    if isinstance(detail, Role):
        if event == "role_create":
            # PermissionsRepo::saveNewRole logs the model it just saved, never re-read: only
            # the attributes it set are there, so the columns left to their database defaults
            # (system_name, external_auth_id) are missing.
            columns = role_columns(detail)
            keep = ("display_name", "description", "mfa_enforced", "updated_at", "created_at", "id")
            return {key: columns[key] for key in keep}
        return role_columns(detail)
    if isinstance(detail, Revision):
        return revision_item(detail)
    # Deletion, Webhook and ApiToken are not BookStack\App\Model; strings are not models.
    # A SortRule is, but v25.02.4 sends its events without related_item (FACTS, sort rules).
    return None


def detail_url(state: WikiState, detail: object) -> str | None:
    if isinstance(detail, Entity):
        return state.url_of(detail)
    if isinstance(detail, Revision):
        page = state.pages.get(detail.page_id)
        base = state.path_of(page) if page else ""
        return state.url(f"{base}/revisions/{detail.id}")
    if isinstance(detail, Deletion):
        return state.url(f"/settings/recycle-bin/{detail.id}/restore")
    if isinstance(detail, Webhook):
        return state.url(f"/settings/webhooks/{detail.id}")
    if isinstance(detail, SortRule):
        return state.url(f"/settings/sorting/rules/{detail.id}")
    return None


def webhook_body(
    state: WikiState,
    event: str,
    webhook: Webhook,
    detail: object,
    initiator: User,
    *,
    listed: bool = False,
) -> JSON:
    text = f"{initiator.name} {ACTIVITY_TEXT.get(event, 'activities.' + event)}"
    if isinstance(detail, Entity):
        text += f' "{detail.name}"'
    body: JSON = {
        "event": event,
        "text": text,
        "triggered_at": iso(state.now()),
        "triggered_by": {"id": initiator.id, "name": initiator.name, "slug": initiator.slug},
        "triggered_by_profile_url": state.url(f"/user/{initiator.slug}"),
        "webhook_id": webhook.id,
        "webhook_name": webhook.name,
    }
    url = detail_url(state, detail)
    if url is not None:
        body["url"] = url
    item = related_item(state, event, detail, listed=listed)
    if item is not None:
        body["related_item"] = item
    return body
