"""What users do to the fake wiki, logged and announced the way BookStack does it.

Each method follows the BookStack repository method it imitates: the same activities in the
same order, webhooks POSTed inline at the moment the activity is logged (the default `sync`
queue), and the same silent side effects (FACTS §2).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any

from eventsync.testing import links
from eventsync.testing.models import (
    Activity,
    Book,
    Chapter,
    Entity,
    Page,
    Perm,
    Shelf,
    columns,
)
from eventsync.testing.state import ADMIN_USER_ID, WikiState

# The client address recorded in activities; HTTP handlers set it per request.
ACTING_IP: contextvars.ContextVar[str] = contextvars.ContextVar("acting_ip", default="127.0.0.1")

TagsIn = Iterable[tuple[str, str] | Mapping[str, Any]]


class NotFoundError(LookupError):
    """The item does not exist (or is in the recycle bin)."""


def _tags(tags: TagsIn) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for tag in tags:
        if isinstance(tag, Mapping):
            out.append((str(tag.get("name", "")), str(tag.get("value", "") or "")))
        else:
            out.append((str(tag[0]), str(tag[1])))
    return out


def _markdown_to_html(markdown: str) -> str:
    """Just enough of a Markdown renderer for links to survive into the html."""
    import html
    import re

    paragraphs = [p.strip() for p in markdown.split("\n\n") if p.strip()]
    rendered = []
    for paragraph in paragraphs:
        text = html.escape(paragraph, quote=False)
        text = re.sub(r"\[([^\]]*)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)
        rendered.append(f"<p>{text}</p>")
    return "\n".join(rendered)


class Completed:
    """An already-finished result, so both `f()` and `await f()` work for sync helpers."""

    def __await__(self) -> Generator[None, None, None]:
        return
        yield


class MutationBase:
    """Shared helpers; the host provides `state` and `_flush()` (webhook delivery)."""

    state: WikiState
    _pending: set[asyncio.Task[None]]
    _flush: Callable[[], Awaitable[None]]  # FakeBookStack's webhook delivery

    def _sort_parent(self, book_ids: Iterable[int]) -> None:
        """BaseRepo::sortParent, after an item inside these books changed (the sort-rule
        mixin re-sorts those with a rule; nothing happens without it)."""

    def _log(
        self,
        type_: str,
        detail: object,
        user_id: int,
        *,
        committed: bool = True,
        listed: bool = False,
    ) -> Activity:
        return self.state.log(
            type_, detail, user_id=user_id, ip=ACTING_IP.get(), committed=committed, listed=listed
        )

    async def _announce(
        self, type_: str, detail: object, user_id: int, *, listed: bool = False
    ) -> None:
        self._log(type_, detail, user_id, listed=listed)
        await self._flush()

    # ------------------------------------------------------------- lookups
    def _get(self, table: Mapping[int, Any], item_id: int, kind: str, *, live: bool = True) -> Any:
        item = table.get(item_id)
        if item is None or (live and getattr(item, "trashed", False)):
            raise NotFoundError(f"no {kind} with id {item_id}")
        return item

    def _page(self, page_id: int) -> Page:
        return self._get(self.state.pages, page_id, "page")  # type: ignore[no-any-return]

    def _chapter(self, chapter_id: int) -> Chapter:
        return self._get(self.state.chapters, chapter_id, "chapter")  # type: ignore[no-any-return]

    def _book(self, book_id: int) -> Book:
        return self._get(self.state.books, book_id, "book")  # type: ignore[no-any-return]

    def _shelf(self, shelf_id: int) -> Shelf:
        return self._get(self.state.shelves, shelf_id, "shelf")  # type: ignore[no-any-return]

    def _new_entity_fields(self, name: str, user_id: int) -> dict[str, Any]:
        now = self.state.now()
        return {
            "name": name,
            "slug": "",
            "created_at": now,
            "updated_at": now,
            "created_by": user_id,
            "updated_by": user_id,
            "owned_by": user_id,
        }

    def _save(self, row: Any, before: tuple[Any, ...]) -> None:
        """Model::save(): written, and updated_at bumped, only when a column is dirty."""
        if columns(row) != before:
            row.updated_at = self.state.now()

    @staticmethod
    def _set_description(
        entity: Entity, description: str | None, description_html: str | None
    ) -> None:
        """BaseRepo::updateDescription: description_html wins; plain text gets a <p>."""
        if not isinstance(entity, Shelf | Book | Chapter):
            return
        if description_html is not None:
            entity.description_html = description_html
            entity.description = links.html_to_description(description_html)
        elif description is not None:
            entity.description = description
            entity.description_html = links.description_html(description)

    def _create_entity(
        self,
        entity: Entity,
        *,
        description: str | None = None,
        description_html: str | None = None,
    ) -> None:
        """BaseRepo::create (minus the row insert): description, slug, references."""
        self._set_description(entity, description, description_html)
        entity.slug = self.state.unique_slug(entity, entity.name)
        self.state.store_references(entity)

    def _update_entity(
        self,
        entity: Entity,
        user_id: int,
        *,
        name: str | None,
        tags: TagsIn | None,
        description: str | None = None,
        description_html: str | None = None,
        priority: int | None = None,
        before: tuple[Any, ...] | None = None,
    ) -> None:
        """BaseRepo::update: fill, save, tags (touch), then references.

        The save bumps updated_at only when a column changed (updated_by included: it changes
        when another user saves); given tags always bump it through touch(). `before` holds
        the columns from before the caller's own changes (a page's content, say).
        """
        before = columns(entity) if before is None else before
        old_url = self.state.url_of(entity)
        old_name = entity.name
        if name is not None:
            entity.name = name
        if priority is not None and isinstance(entity, Page | Chapter):
            entity.priority = priority  # fillable on pages and chapters
        self._set_description(entity, description, description_html)
        entity.updated_by = user_id
        if entity.name != old_name or not entity.slug:
            entity.slug = self.state.unique_slug(entity, entity.name)
        self._save(entity, before)
        if tags is not None:
            entity.tags = _tags(tags)
            entity.updated_at = self.state.now()  # $entity->touch()
        self.state.store_references(entity)
        self.state.update_references(entity, old_url, user_id=user_id)


class ContentMutations(MutationBase):
    """Shelves, books, chapters, pages, sorting, conversions and content permissions."""

    # ------------------------------------------------------------ shelves
    def _new_shelf(
        self,
        name: str,
        books: Sequence[int],
        description: str,
        tags: TagsIn,
        user_id: int,
        description_html: str | None = None,
    ) -> Shelf:
        shelf = Shelf(
            id=self.state.next_id("bookshelves"),
            tags=_tags(tags),
            **self._new_entity_fields(name, user_id),
        )
        self.state.shelves[shelf.id] = shelf
        self._create_entity(shelf, description=description, description_html=description_html)
        self._sync_shelf_books(shelf, books, user_id)
        return shelf

    def _sync_shelf_books(self, shelf: Shelf, books: Sequence[int], user_id: int) -> None:
        # BookshelfRepo::updateBooks syncs only books the acting user can see.
        ids: list[int] = []
        for book_id in books:
            book = self.state.books.get(book_id)
            if book and book_id not in ids and self.state.can_view(user_id, book):
                ids.append(book_id)
        shelf.books = ids

    async def create_shelf(
        self,
        name: str,
        books: Sequence[int] = (),
        description: str = "",
        tags: TagsIn = (),
        *,
        description_html: str | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        shelf = self._new_shelf(
            name, books, description, tags, acting_user_id, description_html=description_html
        )
        await self._announce("bookshelf_create", shelf, acting_user_id)
        return shelf.id

    async def update_shelf(
        self,
        shelf_id: int,
        *,
        name: str | None = None,
        description: str | None = None,
        books: Sequence[int] | None = None,
        tags: TagsIn | None = None,
        description_html: str | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        shelf = self._shelf(shelf_id)
        self._update_entity(
            shelf,
            acting_user_id,
            name=name,
            tags=tags,
            description=description,
            description_html=description_html,
        )
        if books is not None:
            # A pivot sync: the shelf row itself is not saved, so updated_at stays.
            self._sync_shelf_books(shelf, books, acting_user_id)
        await self._announce("bookshelf_update", shelf, acting_user_id)
        return shelf.id

    async def delete_shelf(self, shelf_id: int, *, acting_user_id: int = ADMIN_USER_ID) -> int:
        shelf = self._shelf(shelf_id)
        self.state.soft_delete(shelf, acting_user_id)
        await self._announce("bookshelf_delete", shelf, acting_user_id)
        self.state.auto_clear()
        return shelf.id

    # -------------------------------------------------------------- books
    def _new_book(
        self,
        name: str,
        description: str | None,
        tags: TagsIn,
        user_id: int,
        *,
        description_html: str | None = None,
        default_template_id: int | None = None,
    ) -> Book:
        """BookRepo::create (minus the activity)."""
        book = Book(
            id=self.state.next_id("books"),
            tags=_tags(tags),
            **self._new_entity_fields(name, user_id),
        )
        self.state.books[book.id] = book
        self._create_entity(book, description=description, description_html=description_html)
        if default_template_id:
            book.default_template_id = self._template_or_none(default_template_id)
        return book

    async def create_book(
        self,
        name: str,
        description: str = "",
        tags: TagsIn = (),
        shelf_id: int | None = None,
        *,
        description_html: str | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        shelf = self._shelf(shelf_id) if shelf_id is not None else None
        book = self._new_book(
            name, description, tags, acting_user_id, description_html=description_html
        )
        await self._announce("book_create", book, acting_user_id)
        if shelf is not None:
            # BookController::store inside a shelf: Bookshelf::appendBook, then an update event.
            if book.id not in shelf.books:
                shelf.books.append(book.id)
            await self._announce("bookshelf_update", shelf, acting_user_id)
        return book.id

    async def update_book(
        self,
        book_id: int,
        *,
        name: str | None = None,
        description: str | None = None,
        tags: TagsIn | None = None,
        default_template_id: int | None = None,
        description_html: str | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        book = self._book(book_id)
        self._update_entity(
            book,
            acting_user_id,
            name=name,
            tags=tags,
            description=description,
            description_html=description_html,
        )
        if default_template_id is not None:
            before = columns(book)
            book.default_template_id = self._template_or_none(default_template_id)
            self._save(book, before)
        await self._announce("book_update", book, acting_user_id)
        return book.id

    def _template_or_none(self, page_id: int) -> int | None:
        # BaseRepo::updateDefaultTemplate accepts only visible template pages; 0 clears.
        page = self.state.pages.get(page_id)
        return page_id if page and page.template and not page.trashed else None

    async def delete_book(self, book_id: int, *, acting_user_id: int = ADMIN_USER_ID) -> int:
        book = self._book(book_id)
        self.state.soft_delete(book, acting_user_id)
        await self._announce("book_delete", book, acting_user_id)
        self.state.auto_clear()
        return book.id

    # ----------------------------------------------------------- chapters
    async def create_chapter(
        self,
        book_id: int,
        name: str,
        description: str = "",
        tags: TagsIn = (),
        *,
        description_html: str | None = None,
        priority: int | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        book = self._book(book_id)
        chapter = Chapter(
            id=self.state.next_id("chapters"),
            book_id=0,
            tags=_tags(tags),
            priority=self.state.book_last_priority(book.id) + 1,
            **self._new_entity_fields(name, acting_user_id),
        )
        if priority is not None:
            chapter.priority = priority  # BaseRepo::create fills it over the computed one
        self.state.chapters[chapter.id] = chapter
        self.state.place_chapter(chapter, book.id)
        self._create_entity(chapter, description=description, description_html=description_html)
        await self._announce("chapter_create", chapter, acting_user_id)
        self._sort_parent([chapter.book_id])
        return chapter.id

    async def update_chapter(
        self,
        chapter_id: int,
        *,
        name: str | None = None,
        description: str | None = None,
        tags: TagsIn | None = None,
        default_template_id: int | None = None,
        description_html: str | None = None,
        priority: int | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        chapter = self._chapter(chapter_id)
        self._update_entity(
            chapter,
            acting_user_id,
            name=name,
            tags=tags,
            description=description,
            description_html=description_html,
            priority=priority,
        )
        if default_template_id is not None:
            before = columns(chapter)
            chapter.default_template_id = self._template_or_none(default_template_id)
            self._save(chapter, before)
        await self._announce("chapter_update", chapter, acting_user_id)
        self._sort_parent([chapter.book_id])
        return chapter.id

    async def move_chapter(
        self, chapter_id: int, book_id: int, *, acting_user_id: int = ADMIN_USER_ID
    ) -> int:
        chapter = self._chapter(chapter_id)
        self._book(book_id)
        # changeBook moves every page of the chapter, trashed ones too, without events.
        self.state.change_book(chapter, book_id, user_id=acting_user_id)
        await self._announce("chapter_move", chapter, acting_user_id)
        self._sort_parent([chapter.book_id])
        return chapter.id

    async def delete_chapter(self, chapter_id: int, *, acting_user_id: int = ADMIN_USER_ID) -> int:
        chapter = self._chapter(chapter_id)
        self.state.soft_delete(chapter, acting_user_id)
        await self._announce("chapter_delete", chapter, acting_user_id)
        self.state.auto_clear()
        return chapter.id

    # -------------------------------------------------------------- pages
    def _parent(self, book_id: int | None, chapter_id: int | None) -> tuple[int, int]:
        if chapter_id:
            chapter = self._chapter(chapter_id)
            return chapter.book_id, chapter.id
        if book_id is None:
            raise ValueError("a page needs a book_id or a chapter_id")
        return self._book(book_id).id, 0

    def _new_draft(self, book_id: int, chapter_id: int, name: str, owner_id: int) -> Page:
        """PageRepo::getNewDraftPage: a real row, silent, seeded from the default template."""
        page = Page(
            id=self.state.next_id("pages"),
            book_id=0,
            draft=True,
            **self._new_entity_fields(name, owner_id),
        )
        self.state.pages[page.id] = page
        self.state.place_page(page, book_id, chapter_id)
        holder = self.state.chapters.get(chapter_id) if chapter_id else None
        template_id = (holder.default_template_id if holder else None) or self.state.books[
            book_id
        ].default_template_id
        template = self.state.pages.get(template_id) if template_id else None
        if template is not None:
            page.html, page.markdown = template.html, template.markdown
        page.slug = ""
        return page

    def _set_content(
        self, page: Page, html: str | None, markdown: str | None, user_id: int = ADMIN_USER_ID
    ) -> None:
        """PageRepo::updateTemplateStatusAndContentFromInput's content part."""
        editor = page.editor
        if (markdown is not None or html is not None) and not markdown and not html:
            page.html, page.markdown = "", ""  # setNewHTML(''); the editor stays
        elif markdown:
            page.markdown = markdown
            page.html = _markdown_to_html(markdown)
            editor = "markdown"
        elif html is not None:
            # PageContent::setNewHTML drops any markdown source.
            page.html = html
            page.markdown = ""
            editor = "wysiwyg"
        if editor != page.editor and self.state.user_can(user_id, "editor-change"):
            page.editor = editor

    def _publish(
        self,
        page: Page,
        user_id: int,
        *,
        name: str | None,
        html: str | None,
        markdown: str | None,
        tags: TagsIn,
        template: bool = False,
        priority: int | None = None,
    ) -> None:
        """PageRepo::publishDraft (minus the activity)."""
        before = columns(page)
        page.draft = False
        page.revision_count = 1
        page.priority = self.state.new_page_priority(page)
        page.template = template
        self._set_content(page, html, markdown, user_id)
        # BaseRepo::update: the slug is empty, so it is made now; references are stored.
        self._update_entity(page, user_id, name=name, tags=tags, priority=priority, before=before)
        self.state.store_revision(page, "Initial publish", user_id)

    async def create_page(
        self,
        *,
        book_id: int | None = None,
        chapter_id: int | None = None,
        name: str,
        html: str | None = None,
        markdown: str | None = None,
        tags: TagsIn = (),
        template: bool = False,
        priority: int | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        parent_book, parent_chapter = self._parent(book_id, chapter_id)
        page = self._new_draft(parent_book, parent_chapter, name, acting_user_id)
        self._publish(
            page,
            acting_user_id,
            name=name,
            html=html,
            markdown=markdown,
            tags=tags,
            template=template,
            priority=priority,
        )
        await self._announce("page_create", page, acting_user_id)
        self._sort_parent([page.book_id])
        return page.id

    async def create_draft(
        self,
        book_id: int,
        name: str,
        owner_id: int,
        *,
        chapter_id: int | None = None,
        html: str = "",
    ) -> int:
        parent_book, parent_chapter = self._parent(book_id, chapter_id)
        page = self._new_draft(parent_book, parent_chapter, name, owner_id)
        if html:
            page.html = html
        return page.id

    async def publish_draft(
        self,
        page_id: int,
        *,
        name: str | None = None,
        html: str | None = None,
        markdown: str | None = None,
        tags: TagsIn = (),
        acting_user_id: int | None = None,
    ) -> int:
        page = self._page(page_id)
        if not page.draft:
            raise ValueError(f"page {page_id} is not a draft")
        user_id = acting_user_id if acting_user_id is not None else page.owned_by or 1
        self._publish(page, user_id, name=name, html=html, markdown=markdown, tags=tags)
        await self._announce("page_create", page, user_id)
        self._sort_parent([page.book_id])
        return page.id

    async def update_page(
        self,
        page_id: int,
        *,
        name: str | None = None,
        html: str | None = None,
        markdown: str | None = None,
        tags: TagsIn | None = None,
        template: bool | None = None,
        summary: str | None = None,
        priority: int | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        page = self._page(page_id)
        before = columns(page)
        content = (page.html, page.name, page.markdown)
        if template is not None:
            page.template = template
        self._set_content(page, html, markdown, acting_user_id)
        self._update_entity(
            page, acting_user_id, name=name, tags=tags, priority=priority, before=before
        )
        # revision_count is a save counter: it moves (and so does updated_at) on every
        # update, even when no revision is stored.
        page.revision_count += 1
        page.updated_at = self.state.now()
        if content != (page.html, page.name, page.markdown) or summary:
            self.state.store_revision(page, summary or "", acting_user_id)
        await self._announce("page_update", page, acting_user_id)
        self._sort_parent([page.book_id])
        return page.id

    async def move_page(
        self,
        page_id: int,
        *,
        book_id: int | None = None,
        chapter_id: int | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        page = self._page(page_id)
        new_book, new_chapter = self._parent(book_id, chapter_id)
        # PageRepo::move: chapter first, then changeBook (new slug, references); no priority.
        before = columns(page)
        self.state.place_page(page, page.book_id, new_chapter)
        self.state.change_book(page, new_book, user_id=acting_user_id, before=before)
        await self._announce("page_move", page, acting_user_id)
        self._sort_parent([page.book_id])
        return page.id

    async def delete_page(self, page_id: int, *, acting_user_id: int = ADMIN_USER_ID) -> int:
        page = self._page(page_id)
        self.state.soft_delete(page, acting_user_id)
        await self._announce("page_delete", page, acting_user_id)
        self.state.auto_clear()
        return page.id

    async def restore_revision(
        self,
        page_id: int,
        revision_id: int | None = None,
        *,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        """PageRepo::restoreRevision; by default the version before the current one."""
        page = self._page(page_id)
        versions = [r for r in page.revisions if r.type == "version"]
        if revision_id is None:
            if len(versions) < 2:
                raise ValueError(f"page {page_id} has no earlier revision")
            revision = versions[-2]
        else:
            matches = [r for r in versions if r.id == revision_id]
            if not matches:
                raise NotFoundError(f"no revision {revision_id} on page {page_id}")
            revision = matches[0]
        old_url = self.state.url_of(page)
        page.revision_count += 1
        page.name, page.html, page.markdown = revision.name, revision.html, revision.markdown
        page.updated_by = acting_user_id
        page.slug = self.state.unique_slug(page, page.name)
        page.updated_at = self.state.now()  # revision_count is always dirty
        self.state.store_references(page)
        self.state.store_revision(
            page, f"Restored from #{revision.id}; {revision.summary or ''}", acting_user_id
        )
        self.state.update_references(page, old_url, user_id=acting_user_id)
        await self._announce("page_restore", page, acting_user_id)
        await self._announce("revision_restore", revision, acting_user_id)
        self._sort_parent([page.book_id])
        return page.id

    # --------------------------------------------------------------- sort
    async def sort_book(
        self,
        moves: Sequence[tuple[str, int, int, int | None, int]],
        *,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> list[int]:
        """BookSortController::update: silent moves, then one book_sort per involved book."""
        involved: list[int] = []

        def involve(book_id: int) -> None:
            if book_id not in involved:
                involved.append(book_id)

        items: list[tuple[Page | Chapter, int, int, int]] = []
        for kind, item_id, new_book, new_chapter, priority in moves:
            item: Page | Chapter = self._page(item_id) if kind == "page" else self._chapter(item_id)
            self._book(new_book)
            involve(new_book)
            involve(item.book_id)
            items.append((item, new_book, new_chapter or 0, priority))
        # Chapters first, so pages sorted into a moved chapter land in its new book.
        items.sort(key=lambda entry: 0 if isinstance(entry[0], Chapter) else 1)
        for item, new_book, new_chapter, priority in items:
            if item.book_id != new_book:
                self.state.change_book(item, new_book, user_id=acting_user_id)
            # Saved withoutTimestamps: a sort moves no updated_at in v25.02 (a book change
            # does, through changeBook's own save).
            if isinstance(item, Page) and item.chapter_id != new_chapter:
                self.state.place_page(item, item.book_id, new_chapter)
            item.priority = priority
        # The involved books come from one whereIn query with no ORDER BY: id order.
        for book_id in sorted(involved):
            # visibleForList: a short model, which shows in the webhook's related_item.
            book = self.state.books[book_id]
            await self._announce("book_sort", book, acting_user_id, listed=True)
        # The sort form re-sends the book's rule: a book with one is re-sorted by it at once.
        self._sort_parent(involved)
        return involved

    # -------------------------------------------------------- conversions
    async def convert_chapter_to_book(
        self, chapter_id: int, *, acting_user_id: int = ADMIN_USER_ID
    ) -> int:
        chapter = self._chapter(chapter_id)
        return (await self._chapter_to_book(chapter, acting_user_id)).id

    async def _chapter_to_book(self, chapter: Chapter, user_id: int) -> Book:
        """HierarchyTransformer::transformChapterToBook."""
        # Cloner::entityToInputData: the chapter's attributes, tags and default template.
        book = self._new_book(
            chapter.name,
            chapter.description,
            chapter.tags,
            user_id,
            description_html=chapter.description_html or None,
            default_template_id=chapter.default_template_id,
        )
        await self._announce("book_create", book, user_id)
        self.state.copy_permissions(chapter, book)
        # $chapter->pages: live pages (drafts too), by priority.
        pages = [p for p in self.state.chapter_pages(chapter.id) if not p.trashed]
        for page in sorted(pages, key=lambda p: (p.priority, p.id)):
            before = columns(page)
            self.state.place_page(page, page.book_id, 0)
            self.state.change_book(page, book.id, user_id=user_id, before=before)
        # Permanent, not recycled: trashed pages left inside go too, and no chapter_delete.
        self.state.destroy(chapter)
        await self._announce("book_create_from_chapter", book, user_id)
        return book

    async def convert_book_to_shelf(
        self, book_id: int, *, acting_user_id: int = ADMIN_USER_ID
    ) -> int:
        """HierarchyTransformer::transformBookToShelf."""
        book = self._book(book_id)
        shelf = self._new_shelf(
            book.name,
            (),
            book.description,
            book.tags,
            acting_user_id,
            description_html=book.description_html or None,
        )
        await self._announce("bookshelf_create", shelf, acting_user_id)
        self.state.copy_permissions(book, shelf)
        shelf_books: list[int] = []
        # $book->chapters: an unordered hasMany, so the rows come in id order.
        chapters = [c for c in self.state.book_chapters(book.id) if not c.trashed]
        for chapter in chapters:
            new_book = await self._chapter_to_book(chapter, acting_user_id)
            shelf_books.append(new_book.id)
            if not self.state.has_permissions(new_book):
                self.state.copy_permissions(shelf, new_book)
        # $book->directPages: live pages with chapter_id 0, drafts included.
        direct = [p for p in self.state.book_pages(book.id) if not p.trashed and not p.chapter_id]
        if direct:
            # A plain save(): the slug stays and no book_update is logged.
            book.name += " Pages"
            book.updated_at = self.state.now()
            shelf_books.append(book.id)
        else:
            self.state.destroy(book)
        shelf.books = shelf_books
        await self._announce("bookshelf_create_from_book", shelf, acting_user_id)
        return shelf.id

    # -------------------------------------------------------- permissions
    async def set_permissions(
        self,
        content_type: str,
        content_id: int,
        *,
        owner_id: int | None = None,
        fallback: Mapping[str, Any] | None = None,
        role_permissions: Iterable[Mapping[str, Any]] = (),
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        """PermissionsUpdater: replace the item's rows; fallback None means inheriting."""
        entity = self.state.entity(content_type, content_id)
        if entity is None or entity.trashed:
            raise NotFoundError(f"no {content_type} with id {content_id}")
        rows: dict[int, Perm] = {}
        for row in role_permissions:
            role_id = int(row["role_id"])
            if role_id != 0:
                rows[role_id] = Perm.of(row)
        if fallback is not None and fallback.get("inheriting") is not True:
            rows[0] = Perm.of(fallback)
        self._store_permissions(entity, rows)
        if owner_id is not None and owner_id != entity.owned_by:
            entity.owned_by = owner_id
            entity.updated_at = self.state.now()
        await self._announce("permissions_update", entity, acting_user_id)
        return entity.id

    def _store_permissions(self, entity: Entity, rows: dict[int, Perm]) -> None:
        key = (entity.TYPE, entity.id)
        if rows:
            self.state.entity_permissions[key] = rows
        else:
            self.state.entity_permissions.pop(key, None)

    async def copy_shelf_permissions_to_books(self, shelf_id: int) -> list[int]:
        """PermissionsUpdater::updateBookPermissionsFromShelf: silent, one-off copy."""
        shelf = self._shelf(shelf_id)
        # $shelf->books(): the SoftDeletes scope leaves trashed books out.
        books = [
            self.state.books[b]
            for b in shelf.books
            if b in self.state.books and not self.state.books[b].trashed
        ]
        for book in books:
            self.state.copy_permissions(shelf, book)
        return [b.id for b in books]
