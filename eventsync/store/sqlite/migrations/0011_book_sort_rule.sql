-- The sort rule a book uses (BookStack v25.02+): its contents are re-sorted by it, silently,
-- after every change inside the book and whenever the rule changes.
ALTER TABLE books ADD COLUMN sort_rule_id INTEGER;
