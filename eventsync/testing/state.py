"""The fake BookStack's in-memory wiki: storage, hierarchy, visibility, audit log and truth."""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from eventsync.testing import shapes
from eventsync.testing.links import anchor_hrefs, rewrite_hrefs, rewrite_markdown
from eventsync.testing.models import (
    ADMIN_REQUIRED_PERMISSIONS,
    ALL_PERMISSIONS,
    CONTENT_PERMISSIONS,
    Activity,
    ApiToken,
    Attachment,
    Book,
    Chapter,
    Deletion,
    Entity,
    Page,
    Perm,
    Revision,
    Role,
    Shelf,
    SortRule,
    User,
    Webhook,
    columns,
    slugify,
)
from eventsync.testing.truth import build_truth

Clock = Callable[[], datetime]
ADMIN_USER_ID = 1
GUEST_USER_ID = 2
ADMIN_ROLE_ID = 1
PUBLIC_ROLE_ID = 4

# PermissionStatus (app/Permissions/PermissionStatus.php).
IMPLICIT_DENY, IMPLICIT_ALLOW, EXPLICIT_DENY, EXPLICIT_ALLOW = 0, 1, 2, 3

# PageContent's include tag: {{@123}} or {{@123#section}}.
INCLUDE_TAG = re.compile(r"\{\{@\s?([0-9][^}]*?)\}\}")
_SLUG_SUFFIX_CHARS = string.ascii_letters + string.digits


@dataclass
class Outgoing:
    """A webhook body built at logging time, waiting to be POSTed."""

    webhook: Webhook
    body: dict[str, Any]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class WikiState:
    """Everything the fake BookStack stores. Mutations here are silent building blocks."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        recycle_bin_lifetime: int = 30,
        app_url: str = "http://localhost",
    ) -> None:
        self._clock: Clock = clock or _utc_now
        self.recycle_bin_lifetime = recycle_bin_lifetime
        self.app_url = app_url
        # BookStack's email confirmation setting: unconfirmed users get 401 on the API.
        self.email_confirmation_required = False
        self._ids: dict[str, int] = {}
        # Str::random(3) slug suffixes, made deterministic.
        self._slug_rng = random.Random(0)

        self.shelves: dict[int, Shelf] = {}
        self.books: dict[int, Book] = {}
        self.chapters: dict[int, Chapter] = {}
        self.pages: dict[int, Page] = {}
        self.attachments: dict[int, Attachment] = {}
        self.users: dict[int, User] = {}
        self.roles: dict[int, Role] = {}
        self.tokens: dict[str, ApiToken] = {}
        self.webhooks: dict[int, Webhook] = {}
        self.deletions: dict[int, Deletion] = {}
        self.sort_rules: dict[int, SortRule] = {}
        self.activities: list[Activity] = []
        # (entity type, id) -> {role id (0 = everyone else): flags}
        self.entity_permissions: dict[tuple[str, int], dict[int, Perm]] = {}
        self.outbox: list[Outgoing] = []

        # The references table (from -> to), kept in insertion order both ways.
        self._refs_from: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self._refs_to: dict[tuple[str, int], dict[tuple[str, int], None]] = {}

        # Hierarchy indexes, trashed rows included (BookStack's withTrashed relations need them).
        self._book_pages: dict[int, set[int]] = {}
        self._book_chapters: dict[int, set[int]] = {}
        self._chapter_pages: dict[int, set[int]] = {}
        self._activities_by_entity: dict[tuple[str, int], list[Activity]] = {}
        self._deletion_by_entity: dict[tuple[str, int], int] = {}
        self._install_defaults()

    # ----------------------------------------------------------------- basics
    def now(self) -> datetime:
        # MySQL timestamp columns hold whole seconds.
        return self._clock().astimezone(UTC).replace(microsecond=0)

    def next_id(self, table: str) -> int:
        value = self._ids.get(table, 0) + 1
        self._ids[table] = value
        return value

    def _install_defaults(self) -> None:
        """The rows of a fresh BookStack install: Admin, Guest and the four default roles."""
        now = self.now()
        view_all = {p for p in CONTENT_PERMISSIONS if p.endswith("-view-all")}
        editor = set(CONTENT_PERMISSIONS)
        editor |= {
            p for p in ALL_PERMISSIONS if p.startswith(("image-", "attachment-", "comment-"))
        }
        editor |= {"content-export", "editor-change", "receive-notifications"}
        defaults = [
            ("Admin", "Administrator of the whole application", set(ALL_PERMISSIONS), "admin"),
            ("Editor", "User can edit content", editor, ""),
            ("Viewer", "User can view books & their content behind authentication", view_all, ""),
            ("Public", "The role given to public visitors if allowed", view_all, "public"),
        ]
        for name, description, perms, system_name in defaults:
            role_id = self.next_id("roles")
            self.roles[role_id] = Role(
                id=role_id,
                display_name=name,
                description=description,
                permissions=set(perms),
                system_name=system_name,
                created_at=now,
                updated_at=now,
            )
        for name, email, role_id, system_name in (
            ("Admin", "admin@admin.com", ADMIN_ROLE_ID, None),
            ("Guest", "guest@example.com", PUBLIC_ROLE_ID, "public"),
        ):
            user_id = self.next_id("users")
            self.users[user_id] = User(
                id=user_id,
                name=name,
                slug=slugify(name),
                email=email,
                roles={role_id},
                system_name=system_name,
                created_at=now,
                updated_at=now,
            )

    # ------------------------------------------------------------- lookups
    def entity(self, entity_type: str, entity_id: int) -> Entity | None:
        table: dict[int, Any] = {
            "page": self.pages,
            "chapter": self.chapters,
            "book": self.books,
            "bookshelf": self.shelves,
        }[entity_type]
        return table.get(entity_id)

    def book_pages(self, book_id: int) -> list[Page]:
        return [self.pages[i] for i in sorted(self._book_pages.get(book_id, ()))]

    def book_chapters(self, book_id: int) -> list[Chapter]:
        return [self.chapters[i] for i in sorted(self._book_chapters.get(book_id, ()))]

    def chapter_pages(self, chapter_id: int) -> list[Page]:
        return [self.pages[i] for i in sorted(self._chapter_pages.get(chapter_id, ()))]

    def parent_of(self, entity: Entity) -> Entity | None:
        """Entity::getParent, trashed parents included."""
        if isinstance(entity, Page):
            if entity.chapter_id and entity.chapter_id in self.chapters:
                return self.chapters[entity.chapter_id]
            return self.books.get(entity.book_id)
        if isinstance(entity, Chapter):
            return self.books.get(entity.book_id)
        return None

    def user_ref(self, user_id: int | None) -> dict[str, Any] | None:
        user = self.users.get(user_id) if user_id is not None else None
        if user is None:
            return None
        return {"id": user.id, "name": user.name, "slug": user.slug}

    # ---------------------------------------------------------- hierarchy
    def place_page(self, page: Page, book_id: int, chapter_id: int) -> None:
        self._book_pages.get(page.book_id, set()).discard(page.id)
        if page.chapter_id:
            self._chapter_pages.get(page.chapter_id, set()).discard(page.id)
        page.book_id, page.chapter_id = book_id, chapter_id
        self._book_pages.setdefault(book_id, set()).add(page.id)
        if chapter_id:
            self._chapter_pages.setdefault(chapter_id, set()).add(page.id)

    def place_chapter(self, chapter: Chapter, book_id: int) -> None:
        self._book_chapters.get(chapter.book_id, set()).discard(chapter.id)
        chapter.book_id = book_id
        self._book_chapters.setdefault(book_id, set()).add(chapter.id)

    def book_last_priority(self, book_id: int) -> int:
        """BookContents::getLastPriority: never below 1, so the first item gets 2."""
        pages = [
            p.priority
            for p in self.book_pages(book_id)
            if not p.chapter_id and not p.draft and not p.trashed
        ]
        chapters = [c.priority for c in self.book_chapters(book_id) if not c.trashed]
        return max([*pages, *chapters, 1])

    def new_page_priority(self, page: Page) -> int:
        """PageRepo::getNewPriority: after the chapter's last page, else at the book's end.

        `$chapter->pages('desc')->first()` counts every live page of the chapter, drafts and
        the page being published included, so a chapter's first page gets its priority + 1.
        """
        if page.chapter_id:
            siblings = [p.priority for p in self.chapter_pages(page.chapter_id) if not p.trashed]
            return max(siblings) + 1 if siblings else 0
        return self.book_last_priority(page.book_id) + 1

    # -------------------------------------------------------------- slugs/urls
    def unique_slug(self, entity: Entity | User, name: str) -> str:
        """SlugGenerator::generate: unique per table, and per book for pages and chapters."""
        slug = slugify(name) or "".join(self._slug_rng.choices("0123456789abcdef", k=5))
        while self._slug_in_use(entity, slug):
            slug += "-" + "".join(self._slug_rng.choices(_SLUG_SUFFIX_CHARS, k=3))
        return slug

    def _slug_in_use(self, entity: Entity | User, slug: str) -> bool:
        others: Iterable[Entity | User]
        if isinstance(entity, Page):
            others = (self.pages[i] for i in self._book_pages.get(entity.book_id, ()))
        elif isinstance(entity, Chapter):
            others = (self.chapters[i] for i in self._book_chapters.get(entity.book_id, ()))
        elif isinstance(entity, Book):
            others = self.books.values()
        elif isinstance(entity, Shelf):
            others = self.shelves.values()
        else:
            others = self.users.values()
        return any(
            o.slug == slug and o.id != entity.id and not getattr(o, "trashed", False)
            for o in others
        )

    def path_of(self, entity: Entity) -> str:
        if isinstance(entity, Shelf):
            return f"/shelves/{entity.slug}"
        if isinstance(entity, Book):
            return f"/books/{entity.slug}"
        book = self.books.get(entity.book_id)  # type: ignore[attr-defined]
        book_slug = book.slug if book else ""
        if isinstance(entity, Chapter):
            return f"/books/{book_slug}/chapter/{entity.slug}"
        assert isinstance(entity, Page)
        if entity.draft:
            return f"/books/{book_slug}/draft/{entity.id}"
        return f"/books/{book_slug}/page/{entity.slug}"

    def url(self, path: str) -> str:
        # Laravel's url() trims trailing slashes.
        return (self.app_url.rstrip("/") + path).rstrip("/")

    def url_of(self, entity: Entity) -> str:
        return self.url(self.path_of(entity))

    def update_url(self, old_url: str, new_url: str) -> None:
        """bookstack:update-url: a plain REPLACE in stored content, silent, no timestamps."""
        old_url, new_url = old_url.rstrip("/"), new_url.rstrip("/")
        if old_url == new_url:
            return
        for page in self.pages.values():
            page.html = page.html.replace(old_url, new_url)
            page.markdown = page.markdown.replace(old_url, new_url)
        holders: list[Shelf | Book | Chapter] = [
            *self.shelves.values(),
            *self.books.values(),
            *self.chapters.values(),
        ]
        for holder in holders:
            holder.description_html = holder.description_html.replace(old_url, new_url)
        for attachment in self.attachments.values():
            attachment.path = attachment.path.replace(old_url, new_url)

    # ----------------------------------------------------------- references
    def resolve_link(self, link: str) -> Entity | None:
        """CrossLinkParser's resolvers, in order: permalink, page, chapter, book, shelf.

        Only absolute links to this app resolve; slugs compare case-insensitively (MySQL).
        """
        match = re.match(re.escape(self.url("/link")) + r"/(\d+)", link)
        if match:
            page = self.pages.get(int(match.group(1)))
            return page if page is not None and not page.trashed else None
        books = re.escape(self.url("/books"))
        end = r"(?:[#?/]|$)"
        match = re.match(books + r"/([\w-]+)/page/([\w-]+)" + end, link, re.ASCII)
        if match:
            found = self._child_by_slugs(match.group(1), match.group(2), self.book_pages)
            if found is not None:
                return found
        match = re.match(books + r"/([\w-]+)/chapter/([\w-]+)" + end, link, re.ASCII)
        if match:
            found = self._child_by_slugs(match.group(1), match.group(2), self.book_chapters)
            if found is not None:
                return found
        match = re.match(books + r"/([\w-]+)" + end, link, re.ASCII)
        if match:
            return self._by_slug(self.books.values(), match.group(1))
        match = re.match(re.escape(self.url("/shelves")) + r"/([\w-]+)" + end, link, re.ASCII)
        if match:
            return self._by_slug(self.shelves.values(), match.group(1))
        return None

    @staticmethod
    def _by_slug(items: Iterable[Any], slug: str) -> Any:
        slug = slug.casefold()
        found = [e for e in items if not e.trashed and e.slug.casefold() == slug]
        return min(found, key=lambda e: e.id) if found else None

    def _child_by_slugs(
        self, book_slug: str, slug: str, children: Callable[[int], list[Any]]
    ) -> Entity | None:
        book_slug = book_slug.casefold()
        found: list[Entity] = []
        for book in self.books.values():
            if not book.trashed and book.slug.casefold() == book_slug:
                match = self._by_slug(children(book.id), slug)
                if match is not None:
                    found.append(match)
        return min(found, key=lambda e: e.id) if found else None

    def store_references(self, entity: Entity) -> None:
        """ReferenceStore::updateForEntity: replace the links going out of the item's html.

        BookStack runs it when an item is created or updated (BaseRepo) and when a revision
        is restored; not on moves, sorts or reference rewrites.
        """
        key = (entity.TYPE, entity.id)
        for target in self._refs_from.pop(key, []):
            self._refs_to.get(target, {}).pop(key, None)
        html = entity.html if isinstance(entity, Page) else getattr(entity, "description_html", "")
        targets: dict[tuple[str, int], None] = {}
        for link in anchor_hrefs(html):
            model = self.resolve_link(link)
            if model is not None:
                targets[(model.TYPE, model.id)] = None
        if targets:
            self._refs_from[key] = list(targets)
            for target in targets:
                self._refs_to.setdefault(target, {})[key] = None

    def references_to(self, entity: Entity) -> list[tuple[str, int]]:
        """(type, id) of the items holding a stored link to `entity`, oldest first."""
        return list(self._refs_to.get((entity.TYPE, entity.id), {}))

    def _drop_references(self, entity: Entity) -> None:
        key = (entity.TYPE, entity.id)
        for target in self._refs_from.pop(key, []):
            self._refs_to.get(target, {}).pop(key, None)
        for source in self._refs_to.pop(key, {}):
            targets = self._refs_from.get(source, [])
            if key in targets:
                targets.remove(key)

    def update_references(
        self, entity: Entity, old_url: str, *, user_id: int = ADMIN_USER_ID
    ) -> None:
        """ReferenceUpdater::updateEntityReferences after `entity`'s URL changed.

        Only items holding a stored reference to it (for a book: to it or to any of its
        pages and chapters) that the acting user can see are touched, silently: a page gets
        its `<a href>`s and markdown links rewritten, revision_count + 1 and a new revision
        (saved even if no link text matched); a shelf, book or chapter gets its
        description_html hrefs rewritten and is saved when that changed it.
        """
        new_url = self.url_of(entity)
        if old_url == new_url:
            return
        targets = [entity]
        if isinstance(entity, Book):
            targets += [p for p in self.book_pages(entity.id) if not p.trashed]
            targets += [c for c in self.book_chapters(entity.id) if not c.trashed]
        sources: dict[tuple[str, int], None] = {}
        for target in targets:
            for source in self.references_to(target):
                sources.setdefault(source, None)
        now = self.now()
        for source_type, source_id in sources:
            source = self.entity(source_type, source_id)
            # whereHas('from') skips trashed items; restrictEntityRelationQuery skips drafts
            # and items the acting user cannot see.
            if source is None or source.trashed or not self.can_view(user_id, source):
                continue
            if isinstance(source, Page):
                if source.draft:
                    continue
                source.html = rewrite_hrefs(source.html, old_url, new_url)
                source.markdown = rewrite_markdown(source.markdown, old_url, new_url)
                source.revision_count += 1
                source.updated_at = now
                self.store_revision(source, "System auto-update of internal links", user_id)
            else:
                assert isinstance(source, Shelf | Book | Chapter)
                html = rewrite_hrefs(source.description_html, old_url, new_url)
                if html != source.description_html:
                    source.description_html = html
                    source.updated_at = now

    def store_revision(self, page: Page, summary: str | None, user_id: int | None) -> Revision:
        book = self.books.get(page.book_id)
        revision = Revision(
            id=self.next_id("page_revisions"),
            page_id=page.id,
            name=page.name,
            slug=page.slug,
            book_slug=book.slug if book else "",
            html=page.html,
            markdown=page.markdown,
            created_by=user_id,
            # RevisionRepo::storeNewForPage copies the page's updated_at.
            created_at=page.updated_at,
            summary=summary,
            revision_number=page.revision_count,
        )
        page.revisions.append(revision)
        return revision

    def change_book(
        self,
        child: Page | Chapter,
        book_id: int,
        *,
        user_id: int = ADMIN_USER_ID,
        before: tuple[Any, ...] | None = None,
    ) -> None:
        """BookChild::changeBook: new book, refreshed slug, save, references; pages follow.

        The save bumps updated_at only when a column changed (`before` holds the columns
        as they were before the caller's own changes, e.g. PageRepo::move's chapter_id).
        """
        before = columns(child) if before is None else before
        old_url = self.url_of(child)
        if isinstance(child, Page):
            self.place_page(child, book_id, child.chapter_id)
        else:
            self.place_chapter(child, book_id)
        child.slug = self.unique_slug(child, child.name)
        if columns(child) != before:
            child.updated_at = self.now()
        self.update_references(child, old_url, user_id=user_id)
        if isinstance(child, Chapter):
            # $this->pages()->withTrashed(): ordered by priority, trashed pages included.
            pages = sorted(self.chapter_pages(child.id), key=lambda p: (p.priority, p.id))
            for page in pages:
                self.change_book(page, book_id, user_id=user_id)

    # ------------------------------------------------------------ rendering
    def render_html(self, page: Page, viewer_id: int, depth: int = 0) -> str:
        """Page::forJsonDisplay html: include tags replaced by the included page's content."""
        if "{{@" not in page.html:
            return page.html

        def include(match: re.Match[str]) -> str:
            ref = match.group(1).split("#", 1)[0].strip()
            target = self.pages.get(int(ref)) if ref.isdigit() else None
            # PageIncludeParser gives up after a few levels so self-includes terminate.
            if target is None or depth >= 3 or not self.can_view(viewer_id, target):
                return ""
            return self.render_html(target, viewer_id, depth + 1)

        return INCLUDE_TAG.sub(include, page.html)

    # ----------------------------------------------------------- visibility
    def user_roles(self, user_id: int) -> list[Role]:
        user = self.users.get(user_id)
        if user is None:
            return []
        return [self.roles[r] for r in sorted(user.roles) if r in self.roles]

    def user_can(self, user_id: int, permission: str) -> bool:
        """User::can for role-level permissions (access-api, settings-manage...)."""
        return any(permission in role.permissions for role in self.user_roles(user_id))

    def is_admin(self, user_id: int) -> bool:
        return any(role.system_name == "admin" for role in self.user_roles(user_id))

    def _chain(self, entity: Entity) -> list[Entity]:
        chain: list[Entity] = [entity]
        if isinstance(entity, Page):
            if entity.chapter_id and entity.chapter_id in self.chapters:
                chain.append(self.chapters[entity.chapter_id])
            if entity.book_id in self.books:
                chain.append(self.books[entity.book_id])
        elif isinstance(entity, Chapter) and entity.book_id in self.books:
            chain.append(self.books[entity.book_id])
        return chain

    def _levels(self, entity: Entity) -> Iterator[dict[int, Perm]]:
        """The entity_permissions rows of each level of the chain that has any."""
        for level in self._chain(entity):
            rows = self.entity_permissions.get((level.TYPE, level.id))
            if rows:
                yield rows

    def view_status(self, role: Role, entity: Entity) -> tuple[int, int | None]:
        """One joint_permissions row: (status, owner_id) of `role` for viewing `entity`, as
        JointPermissionBuilder::createJointPermissionData computes it (FACTS §6 steps 1-6)."""
        if role.system_name == "admin":
            # createJointPermissionDataArray(..., EXPLICIT_ALLOW, hasPermissionOwn: true)
            return EXPLICIT_ALLOW, entity.owned_by or None
        role_value: bool | None = None
        fallback: bool | None = None
        for rows in self._levels(entity):
            if role_value is None and role.id in rows:
                role_value = rows[role.id].view
            if 0 in rows:
                fallback = rows[0].view
                break
        if role_value is not None:
            return (EXPLICIT_ALLOW if role_value else EXPLICIT_DENY), None
        if fallback is not None:
            return (IMPLICIT_ALLOW if fallback else IMPLICIT_DENY), None
        # No entity row applies anywhere in the chain: the role-level permissions, and only
        # here does `-view-own` count (hasPermissionOwn is false on the entity path).
        status = IMPLICIT_ALLOW if f"{entity.TYPE}-view-all" in role.permissions else IMPLICIT_DENY
        own = f"{entity.TYPE}-view-own" in role.permissions
        return status, (entity.owned_by or None) if own else None

    def _entity_permission(self, user_id: int, entity: Entity, action: str) -> bool | None:
        """EntityPermissionEvaluator::evaluateEntityForUser: the rows of the user's roles and
        the fallback, walked up the chain; None when no row applies."""
        role_ids = {r.id for r in self.user_roles(user_id)}
        found: dict[int, bool] = {}
        fallback: bool | None = None
        for rows in self._levels(entity):
            for role_id, perm in rows.items():
                if role_id != 0 and role_id in role_ids and role_id not in found:
                    found[role_id] = getattr(perm, action)
            if 0 in rows:
                fallback = getattr(rows[0], action)
                break
        if found:
            return any(found.values())
        return fallback

    def can(self, user_id: int, action: str, entity: Entity, permission_type: str = "") -> bool:
        """May the user take `action` on `entity` (FACTS §6)? Viewing is the joint-permission
        rule (PermissionApplicator::restrictEntityQuery: max status over the user's roles,
        then the owner); other actions are checkOwnableUserAccess, with the role permission
        `{permission_type}-{action}-all/-own` (the entity's type unless given: creating a
        page in a book checks `page-create`)."""
        roles = self.user_roles(user_id)
        if not roles:
            return False
        if action == "view":
            rows = [self.view_status(role, entity) for role in roles]
            status = max(s for s, _ in rows)
            owner = max((o for _, o in rows if o is not None), default=None)
            return status in (IMPLICIT_ALLOW, EXPLICIT_ALLOW) or (
                owner == user_id and status != EXPLICIT_DENY
            )
        if self.is_admin(user_id):
            return True
        applied = self._entity_permission(user_id, entity, action)
        if applied is not None:
            return applied
        prefix = f"{permission_type or entity.TYPE}-{action}"
        return self.user_can(user_id, f"{prefix}-all") or (
            entity.owned_by == user_id and self.user_can(user_id, f"{prefix}-own")
        )

    def can_view(self, user_id: int, entity: Entity, *, binned: bool = False) -> bool:
        """`binned=True` for what BookStack reaches through a raw page join that skips the
        trash scope (attachments: PermissionApplicator::restrictPageRelationQuery)."""
        if entity.trashed and not binned:
            return False
        # restrictDraftsOnPageQuery: nobody, admins included, sees another user's draft.
        if isinstance(entity, Page) and entity.draft and entity.owned_by != user_id:
            return False
        if self.is_admin(user_id):
            return True
        return self.can(user_id, "view", entity)

    def visible(self, user_id: int, entities: Iterable[Entity]) -> Iterator[Entity]:
        admin = self.is_admin(user_id)
        for entity in entities:
            if entity.trashed:
                continue
            if isinstance(entity, Page) and entity.draft and entity.owned_by != user_id:
                continue
            if admin or self.can(user_id, "view", entity):
                yield entity

    def visible_attachments(self, user_id: int) -> Iterator[Attachment]:
        """Attachments of pages the user may view, binned pages included: real BookStack
        lists and serves those (FACTS, first section)."""
        seen: dict[int, bool] = {}
        for attachment in self.attachments.values():
            page_id = attachment.uploaded_to
            if page_id not in seen:
                page = self.pages.get(page_id)
                seen[page_id] = page is not None and self.can_view(user_id, page, binned=True)
            if seen[page_id]:
                yield attachment

    # --------------------------------------------------------- audit log
    def log(
        self,
        type_: str,
        detail: object,
        *,
        user_id: int,
        ip: str = "127.0.0.1",
        committed: bool = True,
        listed: bool = False,
    ) -> Activity:
        """ActivityLogger::add: store the row, then build a webhook body per matching hook.

        `listed`: the logged model came from a list query that selects fewer columns (the
        books BookSorter::sortUsingMap loads), which shows in the webhook's related_item.
        """
        if isinstance(detail, str):
            descriptor = detail
        elif isinstance(detail, Deletion):
            descriptor = self.deletion_descriptor(detail)
        else:
            descriptor = detail.descriptor()  # type: ignore[attr-defined]
        loggable = detail if isinstance(detail, Entity) else None
        activity = Activity(
            id=self.next_id("activities"),
            type=type_.lower(),
            detail=descriptor,
            user_id=user_id,
            loggable_id=loggable.id if loggable else None,
            loggable_type=loggable.TYPE if loggable else None,
            ip=ip,
            created_at=self.now(),
            committed=committed,
        )
        self.activities.append(activity)
        if loggable is not None:
            self._activities_by_entity.setdefault((loggable.TYPE, loggable.id), []).append(activity)
        initiator = self.users.get(user_id) or self.users[GUEST_USER_ID]
        for webhook in self.webhooks.values():
            if webhook.active and ("all" in webhook.events or type_ in webhook.events):
                body = shapes.webhook_body(self, type_, webhook, detail, initiator, listed=listed)
                self.outbox.append(Outgoing(webhook, body))
        return activity

    def anonymise_activities(self, entity: Entity) -> None:
        """ActivityLogger::removeEntity: rows keep only the bare name."""
        for activity in self._activities_by_entity.pop((entity.TYPE, entity.id), []):
            activity.detail = entity.name
            activity.loggable_id = None
            activity.loggable_type = None

    def clear_activity(self) -> None:
        """bookstack:clear-activity: TRUNCATE, so ids restart at 1."""
        self.activities.clear()
        self._activities_by_entity.clear()
        self._ids["activities"] = 0

    def deletion_descriptor(self, deletion: Deletion) -> str:
        entity = self.entity(deletion.deletable_type, deletion.deletable_id)
        if entity is None:
            return f"Deletion ({deletion.id})"
        return (
            f"Deletion ({deletion.id}) for {deletion.deletable_type} "
            f"({deletion.deletable_id}) {entity.name}"
        )

    # ------------------------------------------------------------ recycle bin
    def soft_delete(self, entity: Entity, user_id: int, *, record: bool = True) -> None:
        """TrashCan::softDestroy*: one Deletion for the item, children trashed silently."""
        now = self.now()
        if record:
            deletion = Deletion(
                id=self.next_id("deletions"),
                deleted_by=user_id,
                deletable_type=entity.TYPE,
                deletable_id=entity.id,
                created_at=now,
                updated_at=now,
            )
            self.deletions[deletion.id] = deletion
            self._deletion_by_entity[(entity.TYPE, entity.id)] = deletion.id
        if isinstance(entity, Book):
            for page in self.book_pages(entity.id):
                if not page.trashed:
                    self.soft_delete(page, user_id, record=False)
            for chapter in self.book_chapters(entity.id):
                if not chapter.trashed:
                    self.soft_delete(chapter, user_id, record=False)
        elif isinstance(entity, Chapter):
            for page in self.chapter_pages(entity.id):
                if not page.trashed:
                    self.soft_delete(page, user_id, record=False)
        entity.deleted_at = now
        entity.updated_at = now

    def _drop_deletion_of(self, entity: Entity) -> None:
        deletion_id = self._deletion_by_entity.pop((entity.TYPE, entity.id), None)
        if deletion_id is not None:
            self.deletions.pop(deletion_id, None)

    def restore_deletion(self, deletion: Deletion) -> int:
        """TrashCan::restoreFromDeletion: nothing restored when the parent is still trashed."""
        entity = self.entity(deletion.deletable_type, deletion.deletable_id)
        count = 0
        parent = self.parent_of(entity) if entity is not None else None
        if entity is not None and not (parent is not None and parent.trashed):
            count = self._restore_entity(entity)
        self.deletions.pop(deletion.id, None)
        self._deletion_by_entity.pop((deletion.deletable_type, deletion.deletable_id), None)
        return count

    def _restore_entity(self, entity: Entity) -> int:
        """TrashCan::restoreEntity: restore() saves, so each restored row's updated_at moves."""
        now = self.now()

        def restore(item: Entity) -> None:
            if item.trashed:
                item.deleted_at = None
                item.updated_at = now

        restore(entity)
        count = 1
        children: list[Entity] = []
        if isinstance(entity, Book | Chapter):
            children += (
                self.book_pages(entity.id)
                if isinstance(entity, Book)
                else self.chapter_pages(entity.id)
            )
        if isinstance(entity, Book):
            children += self.book_chapters(entity.id)
        for child in children:
            self._drop_deletion_of(child)
            restore(child)
            count += 1
        return count

    def destroy(self, entity: Entity) -> int:
        """TrashCan::destroyEntity: permanent, children included, history anonymised."""
        count = 0
        if isinstance(entity, Book):
            for page in self.book_pages(entity.id):
                count += self.destroy(page)
            for chapter in self.book_chapters(entity.id):
                count += self.destroy(chapter)
            for shelf in self.shelves.values():
                if entity.id in shelf.books:
                    shelf.books.remove(entity.id)
            self._book_pages.pop(entity.id, None)
            self._book_chapters.pop(entity.id, None)
            del self.books[entity.id]
        elif isinstance(entity, Chapter):
            for page in self.chapter_pages(entity.id):
                count += self.destroy(page)
            self._book_chapters.get(entity.book_id, set()).discard(entity.id)
            self._chapter_pages.pop(entity.id, None)
            del self.chapters[entity.id]
        elif isinstance(entity, Page):
            for attachment_id in [
                a.id for a in self.attachments.values() if a.uploaded_to == entity.id
            ]:
                del self.attachments[attachment_id]
            for holder in [*self.books.values(), *self.chapters.values()]:
                if holder.default_template_id == entity.id:
                    holder.default_template_id = None
            self._book_pages.get(entity.book_id, set()).discard(entity.id)
            if entity.chapter_id:
                self._chapter_pages.get(entity.chapter_id, set()).discard(entity.id)
            del self.pages[entity.id]
        elif isinstance(entity, Shelf):
            del self.shelves[entity.id]
        self.anonymise_activities(entity)
        self._drop_references(entity)
        self.entity_permissions.pop((entity.TYPE, entity.id), None)
        self._drop_deletion_of(entity)
        return count + 1

    def destroy_deletion(self, deletion: Deletion) -> int:
        entity = self.entity(deletion.deletable_type, deletion.deletable_id)
        count = self.destroy(entity) if entity is not None else 0
        self.deletions.pop(deletion.id, None)
        return count

    def auto_clear(self) -> None:
        """TrashCan::autoClearOld (silent). The 10 s slack makes lifetime 0 clear at once."""
        if self.recycle_bin_lifetime < 0:
            return
        before = self.now() + timedelta(seconds=10) - timedelta(days=self.recycle_bin_lifetime)
        for deletion in [d for d in self.deletions.values() if d.created_at < before]:
            if deletion.id in self.deletions:
                self.destroy_deletion(deletion)

    # --------------------------------------------------------- permissions
    def has_permissions(self, entity: Entity) -> bool:
        return bool(self.entity_permissions.get((entity.TYPE, entity.id)))

    def copy_permissions(self, source: Entity, target: Entity) -> None:
        rows = self.entity_permissions.get((source.TYPE, source.id))
        if rows:
            self.entity_permissions[(target.TYPE, target.id)] = dict(rows)
        else:
            self.entity_permissions.pop((target.TYPE, target.id), None)

    # --------------------------------------------------------------- truth
    def truth(self, user_id: int = ADMIN_USER_ID) -> dict[str, Any]:
        """What a correct mirror holds: DESIGN.md's `eventsync export` document."""
        return build_truth(self, user_id)


def admin_permissions(permissions: Iterable[str]) -> set[str]:
    """Role permissions as PermissionsRepo stores them for the admin role."""
    return set(permissions) | ADMIN_REQUIRED_PERMISSIONS
