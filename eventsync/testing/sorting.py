"""Sort rules (BookStack v25.02+, Settings > Sorting): the rule records, their events and the
books' `sort_rule_id`, as FACTS.md ("Checked against a real BookStack v25.02.4") describes them.

A book with a rule is re-sorted as BookSorter::runBookAutoSort does it: after every page or
chapter create, update, move or revision restore inside it (BaseRepo::sortParent, called after
the activity is logged, so after its webhook went out), when the rule is assigned, when a
manual sort is saved, and for every book of a rule when the rule changes. Each operation of the
rule's sequence is one stable sort over the result of the previous one, so the last one wins;
priorities are saved without timestamps, so no item's updated_at moves.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import Callable, Iterable

from eventsync.testing.models import Book, Chapter, Page, SortRule, columns
from eventsync.testing.mutations import MutationBase
from eventsync.testing.state import ADMIN_USER_ID, WikiState

Item = Page | Chapter


def _name(item: Item) -> str:
    # strtolower(ASCII::to_transliterate($name)): compared as lower-cased ASCII bytes.
    ascii_name = unicodedata.normalize("NFKD", item.name).encode("ascii", "ignore").decode()
    return ascii_name.lower()


def _number(item: Item) -> float:
    match = re.match(r"^\d+(\.\d+)?", item.name)
    return float(match.group(0)) if match else 0.0


# SortRuleOperation → (key, descending); chapters_first/last order by being a chapter.
OPERATIONS: dict[str, tuple[Callable[[Item], object], bool]] = {
    "name_asc": (_name, False),
    "name_desc": (_name, True),
    "name_numeric_asc": (_number, False),
    "name_numeric_desc": (_number, True),
    "created_date_asc": (lambda i: int(i.created_at.timestamp()), False),
    "created_date_desc": (lambda i: int(i.created_at.timestamp()), True),
    "updated_date_asc": (lambda i: int(i.updated_at.timestamp()), False),
    "updated_date_desc": (lambda i: int(i.updated_at.timestamp()), True),
    "chapters_first": (lambda i: isinstance(i, Chapter), True),
    "chapters_last": (lambda i: isinstance(i, Chapter), False),
}


def _sorted(items: list[Item], sequence: str) -> list[Item]:
    for operation in (op.strip() for op in sequence.split(",")):
        if operation in OPERATIONS:
            key, descending = OPERATIONS[operation]
            # Python's sort is stable for reverse=True too, as PHP 8's usort is.
            items = sorted(items, key=key, reverse=descending)  # type: ignore[arg-type]
    return items


def resort(state: WikiState, book: Book) -> None:
    """BookSorter::runBookAutoSort: direct pages (id order) then chapters (id order), sorted
    by the rule and numbered from 1; then each chapter's pages the same way. Binned items
    are out (SoftDeletes); drafts are in (the relations do not filter them)."""
    rule = state.sort_rules.get(book.sort_rule_id) if book.sort_rule_id else None
    if rule is None or book.trashed:
        return
    live_pages = [p for p in state.book_pages(book.id) if not p.trashed]
    direct = sorted((p for p in live_pages if not p.chapter_id), key=lambda p: p.id)
    chapters = sorted(
        (c for c in state.book_chapters(book.id) if not c.trashed), key=lambda c: c.id
    )
    top: list[Item] = [*direct, *chapters]
    for index, item in enumerate(_sorted(top, rule.sequence), start=1):
        item.priority = index
    for chapter in chapters:
        pages: list[Item] = sorted(
            (p for p in live_pages if p.chapter_id == chapter.id), key=lambda p: p.id
        )
        for index, page in enumerate(_sorted(pages, rule.sequence), start=1):
            page.priority = index


class SortRuleInUseError(ValueError):
    """SortRuleController::destroy refuses, once, to delete a rule that books use."""


class SortRuleMutations(MutationBase):
    """Create, update and delete sort rules; assign one to a book through its sort form."""

    # Seconds between an event's webhook and the re-sort that follows it: 0 re-sorts as soon
    # as the webhook was sent (as BookStack does, in the same request); more widens the
    # window in which a reader still sees the old order.
    resort_delay: float = 0.0

    def _sort_parent(self, book_ids: Iterable[int]) -> None:
        """Re-sort these books by their rules, now or after `resort_delay`."""
        books = [self.state.books[b] for b in dict.fromkeys(book_ids) if b in self.state.books]
        books = [b for b in books if b.sort_rule_id is not None]
        if not books:
            return
        if self.resort_delay <= 0:
            for book in books:
                resort(self.state, book)
            return

        async def later() -> None:
            await asyncio.sleep(self.resort_delay)
            for book in books:
                resort(self.state, book)

        task = asyncio.get_running_loop().create_task(later())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _sort_rule(self, rule_id: int) -> SortRule:
        return self._get(self.state.sort_rules, rule_id, "sort rule")  # type: ignore[no-any-return]

    async def create_sort_rule(
        self, name: str, sequence: str, *, acting_user_id: int = ADMIN_USER_ID
    ) -> int:
        """sort_rule_create: detail "(id) name", no loggable, webhook without related_item."""
        now = self.state.now()
        rule = SortRule(
            id=self.state.next_id("sort_rules"),
            name=name,
            sequence=sequence,
            created_at=now,
            updated_at=now,
        )
        self.state.sort_rules[rule.id] = rule
        await self._announce("sort_rule_create", rule, acting_user_id)
        return rule.id

    async def update_sort_rule(
        self,
        rule_id: int,
        *,
        name: str | None = None,
        sequence: str | None = None,
        acting_user_id: int = ADMIN_USER_ID,
    ) -> int:
        """sort_rule_update, then every book of the rule re-sorted silently."""
        rule = self._sort_rule(rule_id)
        before = columns(rule)
        if name is not None:
            rule.name = name
        if sequence is not None:
            rule.sequence = sequence
        self._save(rule, before)
        await self._announce("sort_rule_update", rule, acting_user_id)
        # runBookAutoSortForAllWithSet: every book of the rule, silently.
        self._sort_parent(b.id for b in self.state.books.values() if b.sort_rule_id == rule.id)
        return rule.id

    async def delete_sort_rule(
        self, rule_id: int, *, confirm: bool = False, acting_user_id: int = ADMIN_USER_ID
    ) -> int:
        """sort_rule_delete; a rule that books use needs `confirm` (the second submit).

        The confirmed delete clears those books' sort_rule_id with a query update, which moves
        their updated_at and logs no book event.
        """
        rule = self._sort_rule(rule_id)
        # $rule->books(): the SoftDeletes scope leaves binned books out [inference, verify].
        books = self.state.books.values()
        using = [b for b in books if b.sort_rule_id == rule.id and not b.trashed]
        if using and not confirm:
            raise SortRuleInUseError(f"sort rule {rule_id} is used by {len(using)} book(s)")
        now = self.state.now()
        for book in using:
            book.sort_rule_id = None
            book.updated_at = now
        del self.state.sort_rules[rule.id]
        await self._announce("sort_rule_delete", rule, acting_user_id)
        return rule.id

    async def set_book_sort_rule(
        self, book_id: int, rule_id: int | None, *, acting_user_id: int = ADMIN_USER_ID
    ) -> int:
        """The book sort form's `auto-sort` field, sent with no moves: one book_sort.

        That book_sort carries the whole book (sort_rule_id included), unlike the short
        model of a manual sort (sort_book). An unknown rule id stores null.
        The book's contents are re-sorted by the rule at once.
        """
        book: Book = self._get(self.state.books, book_id, "book")
        if rule_id is not None and rule_id not in self.state.sort_rules:
            rule_id = None
        before = columns(book)
        book.sort_rule_id = rule_id
        self._save(book, before)
        await self._announce("book_sort", book, acting_user_id)
        self._sort_parent([book.id])
        return book.id
