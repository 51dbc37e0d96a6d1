"""Deterministic seeding of a fake wiki of any size, without activities or webhooks."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from eventsync.testing.links import description_html, html_to_description
from eventsync.testing.models import (
    CONTENT_PERMISSIONS,
    Attachment,
    Book,
    Chapter,
    Entity,
    Page,
    Perm,
    Role,
    Shelf,
    User,
)
from eventsync.testing.state import ADMIN_USER_ID, WikiState

# Seeded content "already existed": fixed timestamps keep truth() identical across runs.
SEED_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
TOPICS = ("ops", "dev", "hr", "sales", "legal", "design")
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
]


class _Seeder:
    def __init__(self, state: WikiState, seed: int) -> None:
        self.state = state
        self.rng = random.Random(seed)
        self.tick = 0
        self.owners: list[int] = [ADMIN_USER_ID]
        self.roles: list[int] = []

    def stamp(self) -> datetime:
        self.tick += 1
        return SEED_EPOCH + timedelta(minutes=self.tick)

    def entity_fields(self, name: str) -> dict[str, object]:
        at = self.stamp()
        owner = self.rng.choice(self.owners)
        return {
            "name": name,
            "slug": "",
            "created_at": at,
            "updated_at": at,
            "created_by": owner,
            "updated_by": owner,
            "owned_by": owner,
            "tags": self.tags(),
        }

    def tags(self) -> list[tuple[str, str]]:
        if self.rng.random() >= 0.3:
            return []
        tags = [("topic", self.rng.choice(TOPICS))]
        if self.rng.random() < 0.3:
            tags.append(("reviewed", ""))
        return tags

    def words(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))


def seed_wiki(
    state: WikiState,
    *,
    pages: int = 100,
    books: int = 10,
    shelves: int = 3,
    chapters_per_book: int = 2,
    users: int = 5,
    roles: int = 3,
    attachments: int = 20,
    permission_share: float = 0.05,
    seed: int = 0,
) -> None:
    """Add `roles` roles, `users` users and the content to `state`, silently.

    The content reads as if it had been saved through BookStack: descriptions have their
    description_html and the references table holds every link to the app, so renames and
    moves rewrite the absolute links (and leave the host-less ones alone) as BookStack does.
    """
    s = _Seeder(state, seed)
    # Link choices draw from their own generator, so the rest of the wiki stays the same.
    link_rng = random.Random(f"links:{seed}")

    for i in range(roles):
        role_id = state.next_id("roles")
        perms = {p for p in CONTENT_PERMISSIONS if p.endswith("-view-all")}
        if s.rng.random() < 0.5:
            perms |= {p for p in CONTENT_PERMISSIONS if p.endswith(("-update-own", "-view-own"))}
        if i % 2 == 0:
            perms.add("access-api")
        at = s.stamp()
        state.roles[role_id] = Role(
            id=role_id,
            display_name=f"Seeded Role {role_id}",
            description=s.words(4),
            permissions=perms,
            created_at=at,
            updated_at=at,
        )
        s.roles.append(role_id)

    for _ in range(users):
        user_id = state.next_id("users")
        at = s.stamp()
        user = User(
            id=user_id,
            name=f"Seeded User {user_id}",
            slug="",
            email=f"user{user_id}@example.com",
            created_at=at,
            updated_at=at,
        )
        pool = [2, 3, *s.roles]  # Editor, Viewer and the seeded roles
        user.roles = set(s.rng.sample(pool, k=min(len(pool), s.rng.randint(1, 2))))
        user.slug = state.unique_slug(user, user.name)
        state.users[user_id] = user
        s.owners.append(user_id)

    new_books: list[Book] = []
    for _ in range(books):
        book_id = state.next_id("books")
        book = Book(
            id=book_id,
            description=s.words(6),
            **s.entity_fields(f"Book {book_id} {s.rng.choice(WORDS)}"),  # type: ignore[arg-type]
        )
        book.slug = state.unique_slug(book, book.name)
        state.books[book_id] = book
        new_books.append(book)

    new_shelves: list[Shelf] = []
    for _ in range(shelves):
        shelf_id = state.next_id("bookshelves")
        shelf = Shelf(
            id=shelf_id,
            description=s.words(5),
            **s.entity_fields(f"Shelf {shelf_id}"),  # type: ignore[arg-type]
        )
        shelf.slug = state.unique_slug(shelf, shelf.name)
        state.shelves[shelf_id] = shelf
        new_shelves.append(shelf)
    for index, book in enumerate(new_books):
        if new_shelves:
            new_shelves[index % len(new_shelves)].books.append(book.id)
            if len(new_shelves) > 1 and s.rng.random() < 0.1:
                other = new_shelves[(index + 1) % len(new_shelves)]
                other.books.append(book.id)

    # Priorities per parent, in the order BookStack would have handed them out.
    next_priority: dict[tuple[int, int], int] = {}
    book_chapters: dict[int, list[Chapter]] = {}
    new_chapters: list[Chapter] = []
    for book in new_books:
        for _ in range(chapters_per_book):
            chapter_id = state.next_id("chapters")
            priority = next_priority.get((book.id, 0), 2)
            next_priority[(book.id, 0)] = priority + 1
            chapter = Chapter(
                id=chapter_id,
                book_id=0,
                description=s.words(5),
                priority=priority,
                **s.entity_fields(f"Chapter {chapter_id} {s.rng.choice(WORDS)}"),  # type: ignore[arg-type]
            )
            state.chapters[chapter_id] = chapter
            state.place_chapter(chapter, book.id)
            chapter.slug = state.unique_slug(chapter, chapter.name)
            book_chapters.setdefault(book.id, []).append(chapter)
            new_chapters.append(chapter)

    new_pages: list[Page] = []
    for _ in range(pages if new_books else 0):
        page_id = state.next_id("pages")
        book = s.rng.choice(new_books)
        chapters = book_chapters.get(book.id, [])
        chapter_id = 0
        if chapters and s.rng.random() < 0.7:
            chapter_id = s.rng.choice(chapters).id
        priority = next_priority.get((book.id, chapter_id), 2 if not chapter_id else 1)
        next_priority[(book.id, chapter_id)] = priority + 1
        fields = s.entity_fields(f"Page {page_id} {s.words(2)}")
        page = Page(
            id=page_id,
            book_id=0,
            priority=priority,
            revision_count=s.rng.randint(1, 4),
            html=f'<p id="bkmrk-{page_id}">{s.words(12)}</p>',
            template=s.rng.random() < 0.02,
            **fields,  # type: ignore[arg-type]
        )
        state.pages[page_id] = page
        state.place_page(page, book.id, chapter_id)
        page.slug = state.unique_slug(page, page.name)
        new_pages.append(page)

    # Links and includes, made once every page has its final URL. Most links are absolute
    # URLs to the app (ReferenceStore records them, ReferenceUpdater rewrites them); some are
    # host-less paths, which BookStack neither records nor rewrites.
    for page in new_pages:
        if len(new_pages) < 2:
            break
        roll = s.rng.random()
        if roll < 0.2:
            target = s.rng.choice([p for p in s.rng.sample(new_pages, 2) if p is not page])
            relative = link_rng.random() < 0.25
            url = state.path_of(target) if relative else state.url_of(target)
            page.html += f'\n<p>See <a href="{url}">{target.name}</a>.</p>'
        elif roll < 0.23:
            target = s.rng.choice([p for p in s.rng.sample(new_pages, 2) if p is not page])
            page.html += f"\n<p>{{{{@{target.id}}}}}</p>"
    for page in new_pages:
        state.store_revision(page, "Initial publish", page.created_by)
        page.revisions[-1].created_at = page.created_at

    # Descriptions as BaseRepo stores them; a few books and chapters link to a page.
    for holder in [*new_shelves, *new_books, *new_chapters]:
        holder.description_html = description_html(holder.description)
        if new_pages and not isinstance(holder, Shelf) and link_rng.random() < 0.15:
            target = link_rng.choice(new_pages)
            holder.description_html = (
                f'<p>{holder.description} <a href="{state.url_of(target)}">{target.name}</a></p>'
            )
            holder.description = html_to_description(holder.description_html)

    for _ in range(attachments if new_pages else 0):
        attachment_id = state.next_id("attachments")
        page = s.rng.choice(new_pages)
        at = s.stamp()
        order = 1 + sum(1 for a in state.attachments.values() if a.uploaded_to == page.id)
        external = s.rng.random() < 0.25
        extension = s.rng.choice(("pdf", "txt", "png"))
        state.attachments[attachment_id] = Attachment(
            id=attachment_id,
            name=f"Attachment {attachment_id}",
            uploaded_to=page.id,
            external=external,
            order=order,
            extension="" if external else extension,
            path=(
                f"https://example.com/files/{attachment_id}"
                if external
                else f"uploads/files/{attachment_id}.{extension}"
            ),
            content=b"" if external else f"file {attachment_id}\n".encode(),
            created_at=at,
            updated_at=at,
            created_by=page.owned_by,
            updated_by=page.owned_by,
        )

    entities: list[Entity] = [*new_shelves, *new_books, *new_chapters, *new_pages]
    for entity in entities:
        state.store_references(entity)
    role_choices = [*s.roles, 2, 3]
    for entity in entities:
        if s.rng.random() >= permission_share:
            continue
        rows: dict[int, Perm] = {}
        if s.rng.random() < 0.6:
            rows[0] = Perm(view=s.rng.random() < 0.5, create=False, update=False, delete=False)
        if s.rng.random() < 0.7 or not rows:
            view = s.rng.random() < 0.7
            rows[s.rng.choice(role_choices)] = Perm(
                view=view, create=view, update=view, delete=False
            )
        state.entity_permissions[(entity.TYPE, entity.id)] = rows
