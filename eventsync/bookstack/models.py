"""Pydantic models for the BookStack API payloads the sync reads (FACTS §5)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _user_id(value: Any) -> Any:
    # List and create/update responses give created_by/updated_by/owned_by as an int, read
    # responses as {id, name, slug}, and a deleted user leaves null: the mirror wants the id.
    if isinstance(value, dict):
        return value.get("id")
    return value


def _zero_is_none(value: Any) -> Any:
    # BookStack stores chapter_id = 0 for a page outside any chapter; the mirror says null.
    if value == 0 and not isinstance(value, bool):
        return None
    return value


UserId = Annotated[int | None, BeforeValidator(_user_id)]
"""A user reference given as an int, a {id, name, slug} object or null: kept as the id."""

ChapterId = Annotated[int | None, BeforeValidator(_zero_is_none)]
"""A page's chapter_id, with BookStack's 0 ("no chapter") normalised to None."""


class BookStackModel(BaseModel):
    """Base: unknown fields are dropped (BookStack adds fields and leaks extra columns)."""

    model_config = ConfigDict(extra="ignore")


class Tag(BookStackModel):
    name: str
    value: str = ""
    order: int | None = None


class UserSummary(BookStackModel):
    """`{id, name, slug}` as BookStack embeds a user (owner, role members, audit `user`)."""

    id: int
    name: str = ""
    slug: str = ""


class RoleSummary(BookStackModel):
    """`{id, display_name}` as BookStack embeds a role (user read, permission rows)."""

    id: int
    display_name: str = ""


class Entity(BookStackModel):
    """Fields every content listing row has."""

    id: int
    name: str
    slug: str = ""
    created_at: str | None = None
    updated_at: str | None = None
    created_by: UserId = None
    updated_by: UserId = None
    owned_by: UserId = None


# --- shelves -------------------------------------------------------------------------------


class ShelfListItem(Entity):
    description: str | None = None


class BookListItem(Entity):
    description: str | None = None


class Shelf(ShelfListItem):
    """`GET /api/shelves/{id}`: `books` is in the shelf's own order."""

    description_html: str | None = None
    tags: list[Tag] = Field(default_factory=list)
    books: list[BookListItem] = Field(default_factory=list)


# --- books ---------------------------------------------------------------------------------


class BookContentPage(BookStackModel):
    id: int
    name: str
    slug: str = ""
    book_id: int | None = None
    chapter_id: ChapterId = None
    draft: bool = False
    template: bool = False
    priority: int | None = None
    created_at: str | None = None
    updated_at: str | None = None


class BookContentItem(BookContentPage):
    """An item of a book's `contents`: a chapter (with `pages`) or a page outside one."""

    type: str = ""
    pages: list[BookContentPage] = Field(default_factory=list)


class Book(BookListItem):
    """`GET /api/books/{id}`: `contents` includes the token user's own drafts."""

    description_html: str | None = None
    default_template_id: int | None = None
    # v25.02+: the sort rule that re-sorts the book's contents (absent before: None).
    sort_rule_id: int | None = None
    tags: list[Tag] = Field(default_factory=list)
    contents: list[BookContentItem] = Field(default_factory=list)


# --- chapters and pages --------------------------------------------------------------------


class PageListItem(Entity):
    book_id: int
    chapter_id: ChapterId = None
    priority: int | None = None
    draft: bool = False
    template: bool = False
    revision_count: int | None = None
    editor: str | None = None
    book_slug: str | None = None


class Page(PageListItem):
    """`GET /api/pages/{id}`: `html` is rendered (includes resolved), `raw_html` is stored."""

    html: str | None = None
    raw_html: str | None = None
    markdown: str | None = None
    tags: list[Tag] = Field(default_factory=list)


class ChapterListItem(Entity):
    book_id: int
    description: str | None = None
    priority: int | None = None
    book_slug: str | None = None


class Chapter(ChapterListItem):
    """`GET /api/chapters/{id}`: `pages` includes the token user's own drafts."""

    description_html: str | None = None
    default_template_id: int | None = None
    tags: list[Tag] = Field(default_factory=list)
    pages: list[PageListItem] = Field(default_factory=list)


# --- attachments ---------------------------------------------------------------------------


class Attachment(BookStackModel):
    """A listing row or a read. The read also carries `content` (the whole file as base64),
    which this model drops: prefer the listing, which has every field the mirror keeps."""

    id: int
    name: str
    extension: str = ""
    uploaded_to: int
    external: bool = False
    order: int | None = None
    created_at: str | None = None
    updated_at: str | None = None
    created_by: UserId = None
    updated_by: UserId = None


class AttachmentRead(Attachment):
    """An attachment read: `content` is the file as base64, or the URL of an external link."""

    content: str | None = None


# --- users and roles -----------------------------------------------------------------------


class UserListItem(BookStackModel):
    id: int
    name: str
    slug: str = ""
    email: str | None = None
    external_auth_id: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    last_activity_at: str | None = None


class User(UserListItem):
    """`GET /api/users/{id}`: the only place a user's roles appear."""

    roles: list[RoleSummary] = Field(default_factory=list)


class RoleListItem(BookStackModel):
    id: int
    display_name: str
    description: str | None = None
    system_name: str | None = None
    external_auth_id: str | None = None
    mfa_enforced: bool = False
    created_at: str | None = None
    updated_at: str | None = None
    users_count: int | None = None
    permissions_count: int | None = None


class Role(RoleListItem):
    """`GET /api/roles/{id}`: permission names (sorted by BookStack) and member users."""

    permissions: list[str] = Field(default_factory=list)
    users: list[UserSummary] = Field(default_factory=list)


# --- content permissions -------------------------------------------------------------------


class RolePermission(BookStackModel):
    role_id: int
    view: bool = False
    create: bool = False
    update: bool = False
    delete: bool = False
    role: RoleSummary | None = None


class FallbackPermissions(BookStackModel):
    """The "everyone else" row; when `inheriting`, BookStack sends the four values as null."""

    inheriting: bool = True
    view: bool | None = None
    create: bool | None = None
    update: bool | None = None
    delete: bool | None = None


class ContentPermissions(BookStackModel):
    """`GET /api/content-permissions/{type}/{id}`: this item's own overrides only."""

    owner: UserSummary | None = None
    role_permissions: list[RolePermission] = Field(default_factory=list)
    fallback_permissions: FallbackPermissions = Field(default_factory=FallbackPermissions)


# --- audit log -----------------------------------------------------------------------------


class AuditLogEntry(BookStackModel):
    """One activity. `loggable_id` is null and `detail` a bare name once the item was
    permanently destroyed (FACTS §1.2); `user` is null when the user was deleted."""

    id: int
    type: str
    detail: str | None = None
    user_id: int | None = None
    loggable_id: int | None = None
    loggable_type: str | None = None
    ip: str | None = None
    created_at: str
    user: UserSummary | None = None
