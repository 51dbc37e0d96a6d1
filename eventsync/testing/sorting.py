"""Sort rules (BookStack v25.02+, Settings > Sorting): the rule records, their events and the
books' `sort_rule_id`, as FACTS.md ("Checked against a real BookStack v25.02.4") describes them.

Re-sorting a book's contents by its rule is not modelled here: a rule only changes what the API
and the events show of it and of the books that use it.
"""

from __future__ import annotations

from eventsync.testing.models import Book, SortRule, columns
from eventsync.testing.mutations import MutationBase
from eventsync.testing.state import ADMIN_USER_ID


class SortRuleInUseError(ValueError):
    """SortRuleController::destroy refuses, once, to delete a rule that books use."""


class SortRuleMutations(MutationBase):
    """Create, update and delete sort rules; assign one to a book through its sort form."""

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
        """sort_rule_update. (Real BookStack then re-sorts the rule's books, silently.)"""
        rule = self._sort_rule(rule_id)
        before = columns(rule)
        if name is not None:
            rule.name = name
        if sequence is not None:
            rule.sequence = sequence
        self._save(rule, before)
        await self._announce("sort_rule_update", rule, acting_user_id)
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
        (Real BookStack re-sorts the book's contents by the rule at once.)
        """
        book: Book = self._get(self.state.books, book_id, "book")
        if rule_id is not None and rule_id not in self.state.sort_rules:
            rule_id = None
        before = columns(book)
        book.sort_rule_id = rule_id
        self._save(book, before)
        await self._announce("book_sort", book, acting_user_id)
        return book.id
