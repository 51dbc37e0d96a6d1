"""PostgreSQL's spelling of the statements the store writes in SQLite's.

The store's statements are written once, in the SQL both databases share; the few places where
SQLite and PostgreSQL spell the same thing differently are rewritten here, each rule with the
reason. A statement is rewritten once and cached. A SQLite-only construct that no rule covers is
refused here rather than sent, so a new one is found by the first test that runs it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from eventsync.errors import EventsyncError


class UntranslatedSQL(EventsyncError):
    """A statement uses SQLite-only SQL that has no PostgreSQL rule here."""


_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # SQLite's json_each(?) over a JSON array of ids; PostgreSQL's elements are text, and the
    # columns compared with them are bigint.
    (
        re.compile(r"SELECT value FROM json_each\(\?\)"),
        "SELECT value::bigint FROM json_array_elements_text(CAST(? AS json))",
    ),
    (re.compile(r"json_array_length\((\w+)\)"), r"json_array_length(CAST(\1 AS json))"),
    # `a IS ?` compares with NULL as a value in SQLite; PostgreSQL's IS takes NULL/TRUE/FALSE
    # literals only.
    (re.compile(r"\bIS NOT \?"), "IS DISTINCT FROM ?"),
    (re.compile(r"\bIS \?"), "IS NOT DISTINCT FROM ?"),
)

_SQLITE_ONLY = re.compile(
    r"\bPRAGMA\b|\bINSERT OR\b|\bjson_each\b|\bBEGIN IMMEDIATE\b|\browid\b|\bGLOB\b",
    re.IGNORECASE,
)


@lru_cache(maxsize=4096)
def translate(sql: str) -> str:
    """The statement in PostgreSQL's spelling, with psycopg's %s placeholders."""
    for pattern, replacement in _RULES:
        sql = pattern.sub(replacement, sql)
    found = _SQLITE_ONLY.search(sql)
    if found:
        raise UntranslatedSQL(f"no PostgreSQL spelling for {found.group(0)!r} in: {sql[:200]}")
    # psycopg reads % as the start of a placeholder; our statements hold no '?' in literals.
    return sql.replace("%", "%%").replace("?", "%s")


# The job queue's lease: due jobs no other replica holds, each row locked by the replica that
# takes it and skipped by the others, in one statement.
LEASE = (
    "UPDATE jobs SET leased_by = ?, leased_at = ? WHERE key IN ("
    "SELECT key FROM jobs WHERE leased_by IS NULL AND not_before <= ? "
    "ORDER BY not_before, first_seen LIMIT ? FOR UPDATE SKIP LOCKED) "
    "RETURNING key, hints, version, attempts, first_seen, newest_event, payload, "
    "last_error, last_event, sources, not_before"
)
