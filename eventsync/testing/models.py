"""The rows of the fake BookStack's in-memory database, one dataclass per table."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, ClassVar

# BookStack's built-in role permission names (database/migrations), all given to Admin.
CONTENT_PERMISSIONS: tuple[str, ...] = tuple(
    f"{kind}-{action}-{scope}"
    for kind in ("bookshelf", "book", "chapter", "page")
    for action in ("view", "create", "update", "delete")
    for scope in ("all", "own")
    # Shelves and books are created at the top level, so there is no "own" variant.
    if not (action == "create" and scope == "own" and kind in ("bookshelf", "book"))
)
OTHER_PERMISSIONS: tuple[str, ...] = tuple(
    f"{kind}-{action}-{scope}"
    for kind in ("image", "attachment", "comment")
    for action in ("create", "update", "delete")
    for scope in ("all", "own")
)
SYSTEM_PERMISSIONS: tuple[str, ...] = (
    "access-api",
    "content-export",
    "editor-change",
    "receive-notifications",
    "restrictions-manage-all",
    "restrictions-manage-own",
    "settings-manage",
    "templates-manage",
    "user-roles-manage",
    "users-manage",
)
ALL_PERMISSIONS: tuple[str, ...] = tuple(
    sorted(CONTENT_PERMISSIONS + OTHER_PERMISSIONS + SYSTEM_PERMISSIONS)
)
# PermissionsRepo::assignRolePermissions never lets the admin role lose these.
ADMIN_REQUIRED_PERMISSIONS: frozenset[str] = frozenset(
    {
        "users-manage",
        "user-roles-manage",
        "restrictions-manage-all",
        "restrictions-manage-own",
        "settings-manage",
    }
)

# lang/en/activities.php: the webhook `text` is "<initiator> <this>[ "<entity name>"]".
ACTIVITY_TEXT: dict[str, str] = {
    "page_create": "created page",
    "page_update": "updated page",
    "page_delete": "deleted page",
    "page_restore": "restored page",
    "page_move": "moved page",
    "chapter_create": "created chapter",
    "chapter_update": "updated chapter",
    "chapter_delete": "deleted chapter",
    "chapter_move": "moved chapter",
    "book_create": "created book",
    "book_create_from_chapter": "converted chapter to book",
    "book_update": "updated book",
    "book_delete": "deleted book",
    "book_sort": "sorted book",
    "bookshelf_create": "created shelf",
    "bookshelf_create_from_book": "converted book to shelf",
    "bookshelf_update": "updated shelf",
    "bookshelf_delete": "deleted shelf",
    "revision_restore": "restored revision",
    "revision_delete": "deleted revision",
    "auth_login": "logged in",
    "auth_register": "registered as new user",
    "auth_password_reset_request": "requested user password reset",
    "auth_password_reset_update": "reset user password",
    "mfa_setup_method": "configured MFA method",
    "mfa_remove_method": "removed MFA method",
    "settings_update": "updated settings",
    "maintenance_action_run": "ran maintenance action",
    "webhook_create": "created webhook",
    "webhook_update": "updated webhook",
    "webhook_delete": "deleted webhook",
    "user_create": "created user",
    "user_update": "updated user",
    "user_delete": "deleted user",
    "api_token_create": "created API token",
    "api_token_update": "updated API token",
    "api_token_delete": "deleted API token",
    "role_create": "created role",
    "role_update": "updated role",
    "role_delete": "deleted role",
    "recycle_bin_empty": "emptied recycle bin",
    "recycle_bin_restore": "restored from recycle bin",
    "recycle_bin_destroy": "removed from recycle bin",
    "commented_on": "commented on",
    "comment_create": "added comment",
    "comment_update": "updated comment",
    "comment_delete": "deleted comment",
    "permissions_update": "updated permissions",
    "sort_rule_create": "created sort rule",
    "sort_rule_update": "updated sort rule",
    "sort_rule_delete": "deleted sort rule",
}

# Dataclass fields that are not columns of the row: relations, pivots and fake bookkeeping.
_NOT_COLUMNS = frozenset(
    {"tags", "books", "revisions", "roles", "permissions", "committed", "updated_at"}
)


def columns(row: Any) -> tuple[Any, ...]:
    """The row's column values except updated_at: what Eloquent's isDirty() compares.

    Laravel's save() writes, and bumps updated_at, only when one of these changed; pivot
    syncs (shelf books, user roles, role permissions) and tags are not columns.
    """
    return tuple(getattr(row, f.name) for f in fields(row) if f.name not in _NOT_COLUMNS)


_NON_SLUG = re.compile(r"[^a-z0-9]+")


def slugify(text: str) -> str:
    """Roughly Laravel's Str::slug: ASCII-fold, lowercase, runs of other chars become '-'."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return _NON_SLUG.sub("-", folded.lower()).strip("-")


def iso(dt: datetime | None) -> str | None:
    """Render a timestamp the way Laravel serialises dates (second precision, UTC)."""
    if dt is None:
        return None
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


@dataclass(kw_only=True)
class Entity:
    """Columns shared by pages, chapters, books and shelves."""

    TYPE: ClassVar[str] = ""

    id: int
    name: str
    slug: str
    created_at: datetime
    updated_at: datetime
    created_by: int | None
    updated_by: int | None
    owned_by: int | None
    tags: list[tuple[str, str]] = field(default_factory=list)
    deleted_at: datetime | None = None

    @property
    def trashed(self) -> bool:
        return self.deleted_at is not None

    def descriptor(self) -> str:
        return f"({self.id}) {self.name}"


@dataclass(kw_only=True)
class Shelf(Entity):
    TYPE: ClassVar[str] = "bookshelf"

    description: str = ""
    # HasHtmlDescription: the stored html ('' = none; descriptionHtml() then builds one).
    description_html: str = ""
    # The bookshelves_books pivot, in `order`; rows survive a soft delete on either side.
    books: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class Book(Entity):
    TYPE: ClassVar[str] = "book"

    description: str = ""
    description_html: str = ""
    default_template_id: int | None = None
    # v25.02's books.sort_rule_id: the rule (Settings > Sorting) that auto-sorts the book.
    sort_rule_id: int | None = None


@dataclass(kw_only=True)
class Chapter(Entity):
    TYPE: ClassVar[str] = "chapter"

    book_id: int
    description: str = ""
    description_html: str = ""
    priority: int = 0
    default_template_id: int | None = None


@dataclass(kw_only=True)
class Revision:
    id: int
    page_id: int
    name: str
    slug: str
    book_slug: str
    html: str
    markdown: str
    created_by: int | None
    created_at: datetime
    summary: str | None
    revision_number: int
    type: str = "version"

    def descriptor(self) -> str:
        return f"Revision #{self.revision_number} (ID: {self.id}) for page ID {self.page_id}"


@dataclass(kw_only=True)
class Page(Entity):
    TYPE: ClassVar[str] = "page"

    book_id: int
    # 0 means "directly in the book", as BookStack stores it in a NOT NULL column.
    chapter_id: int = 0
    priority: int = 0
    draft: bool = False
    template: bool = False
    revision_count: int = 0
    editor: str = "wysiwyg"
    html: str = ""
    markdown: str = ""
    revisions: list[Revision] = field(default_factory=list)


ENTITY_CLASSES: dict[str, type[Entity]] = {
    "bookshelf": Shelf,
    "book": Book,
    "chapter": Chapter,
    "page": Page,
}


@dataclass(kw_only=True)
class Attachment:
    id: int
    name: str
    uploaded_to: int
    external: bool
    order: int
    extension: str
    path: str
    content: bytes
    created_at: datetime
    updated_at: datetime
    created_by: int | None
    updated_by: int | None


@dataclass(kw_only=True)
class User:
    id: int
    name: str
    slug: str
    email: str
    created_at: datetime
    updated_at: datetime
    roles: set[int] = field(default_factory=set)
    system_name: str | None = None
    external_auth_id: str = ""
    email_confirmed: bool = True
    # False while the creating transaction is open: the API cannot see the row yet.
    committed: bool = True

    def descriptor(self) -> str:
        return f"({self.id}) {self.name}"


@dataclass(kw_only=True)
class Role:
    id: int
    display_name: str
    description: str
    created_at: datetime
    updated_at: datetime
    permissions: set[str] = field(default_factory=set)
    system_name: str = ""
    external_auth_id: str = ""
    mfa_enforced: bool = False
    committed: bool = True

    def descriptor(self) -> str:
        return f"({self.id}) {self.display_name}"


@dataclass(kw_only=True)
class SortRule:
    """A v25.02 sort rule: `sequence` is its comma-separated operations (name_asc, ...)."""

    id: int
    name: str
    sequence: str
    created_at: datetime
    updated_at: datetime

    def descriptor(self) -> str:
        return f"({self.id}) {self.name}"


@dataclass(kw_only=True)
class ApiToken:
    token_id: str
    secret: str
    user_id: int
    expires_at: datetime | None = None


@dataclass(kw_only=True)
class Webhook:
    id: int
    name: str
    url: str
    events: tuple[str, ...]
    timeout: float = 3.0
    active: bool = True

    def descriptor(self) -> str:
        return f"({self.id}) {self.name}"


@dataclass(kw_only=True)
class Deletion:
    id: int
    deleted_by: int | None
    deletable_type: str
    deletable_id: int
    created_at: datetime
    updated_at: datetime


@dataclass(kw_only=True)
class Activity:
    id: int
    type: str
    detail: str
    user_id: int | None
    loggable_id: int | None
    loggable_type: str | None
    ip: str
    created_at: datetime
    # False while the logging transaction is open (user_create, role_create).
    committed: bool = True


@dataclass(frozen=True)
class Perm:
    """One entity_permissions row's flags."""

    view: bool
    create: bool
    update: bool
    delete: bool

    @classmethod
    def of(cls, data: dict[str, object]) -> Perm:
        return cls(
            view=bool(data.get("view", False)),
            create=bool(data.get("create", False)),
            update=bool(data.get("update", False)),
            delete=bool(data.get("delete", False)),
        )

    def as_dict(self) -> dict[str, bool]:
        return {
            "view": self.view,
            "create": self.create,
            "update": self.update,
            "delete": self.delete,
        }
