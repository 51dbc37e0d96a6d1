"""BookStack's ListingResponseBuilder over in-memory rows, with MySQL comparison quirks."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

DEFAULT_COUNT = 100  # API_DEFAULT_ITEM_COUNT
MAX_COUNT = 500  # API_MAX_ITEM_COUNT

# The filter/sort fields per endpoint (FACTS §4); the first is the default sort.
LISTING_FIELDS: dict[str, tuple[str, ...]] = {
    "/api/books": (
        "id",
        "name",
        "slug",
        "description",
        "created_at",
        "updated_at",
        "created_by",
        "updated_by",
        "owned_by",
    ),
    "/api/chapters": (
        "id",
        "book_id",
        "name",
        "slug",
        "description",
        "priority",
        "created_at",
        "updated_at",
        "created_by",
        "updated_by",
        "owned_by",
    ),
    "/api/pages": (
        "id",
        "book_id",
        "chapter_id",
        "name",
        "slug",
        "priority",
        "draft",
        "template",
        "created_at",
        "updated_at",
        "created_by",
        "updated_by",
        "owned_by",
    ),
    "/api/shelves": (
        "id",
        "name",
        "slug",
        "description",
        "created_at",
        "updated_at",
        "created_by",
        "updated_by",
        "owned_by",
    ),
    "/api/attachments": (
        "id",
        "name",
        "extension",
        "uploaded_to",
        "external",
        "order",
        "created_at",
        "updated_at",
        "created_by",
        "updated_by",
    ),
    "/api/users": (
        "id",
        "name",
        "slug",
        "email",
        "external_auth_id",
        "created_at",
        "updated_at",
        "last_activity_at",
    ),
    "/api/roles": (
        "display_name",
        "description",
        "mfa_enforced",
        "external_auth_id",
        "created_at",
        "updated_at",
        "permissions_count",
        "users_count",
    ),
    "/api/recycle-bin": (
        "id",
        "deleted_by",
        "created_at",
        "updated_at",
        "deletable_type",
        "deletable_id",
    ),
    "/api/audit-log": (
        "id",
        "type",
        "detail",
        "user_id",
        "loggable_id",
        "loggable_type",
        "ip",
        "created_at",
    ),
}

# ListingResponseBuilder::$filterOperators: only these names; anything else (symbols such
# as ">" or "!=" included) falls back to eq.
_OPS = {"eq", "ne", "gt", "lt", "gte", "lte", "like"}
_FILTER_KEY = re.compile(r"^filter\[([^\]]*)\]$")
_LEADING_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TIMESTAMP = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}:\d{2}(?::\d{2})?))?")


def _int_param(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    match = _LEADING_NUMBER.match(raw)
    return int(float(match.group(0))) if match else 0


def _mysql_number(text: str) -> float:
    """How MySQL casts a string compared with a number: its numeric prefix, else 0."""
    match = _LEADING_NUMBER.match(text)
    return float(match.group(0)) if match else 0.0


def _normal_timestamp(text: str) -> str | None:
    """'2024-10-15T10:00:00.000000Z' and '2024-10-15' both become 'YYYY-mm-dd HH:MM:SS'."""
    match = _TIMESTAMP.match(text.strip())
    if not match:
        return None
    time = match.group(2) or "00:00:00"
    if len(time) == 5:
        time += ":00"
    return f"{match.group(1)} {time}"


def _comparable(value: Any, is_time: bool) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if is_time and isinstance(value, str):
        return _normal_timestamp(value) or value
    # utf8mb4_unicode_ci: case-insensitive, trailing spaces ignored.
    return str(value).casefold().rstrip(" ")


def _matches(row_value: Any, op: str, raw: str, is_time: bool) -> bool:
    if row_value is None:
        return False  # SQL NULL compares false with everything
    if op == "like":
        pattern = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in raw)
        text = row_value if isinstance(row_value, str) else str(_comparable(row_value, False))
        return re.fullmatch(pattern, text, re.IGNORECASE | re.DOTALL) is not None
    left = _comparable(row_value, is_time)
    right: Any
    if isinstance(left, int | float):
        right = _mysql_number(raw)
    elif is_time:
        right = _normal_timestamp(raw) or raw
    else:
        right = raw.casefold().rstrip(" ")
    if op == "ne":
        return bool(left != right)
    if op == "gt":
        return bool(left > right)
    if op == "lt":
        return bool(left < right)
    if op == "gte":
        return bool(left >= right)
    if op == "lte":
        return bool(left <= right)
    return bool(left == right)


def _is_time(field: str) -> bool:
    return field.endswith("_at")


def parse_filters(query: Mapping[str, str], fields: Sequence[str]) -> list[tuple[str, str, str]]:
    """(field, op, value) for each filter on a listed field; others are silently ignored."""
    filters = []
    for key, value in query.items():
        match = _FILTER_KEY.match(key)
        if not match:
            continue
        # requestFilterToQueryFilter: explode(':', $key); [0] is the field, [1] the op.
        parts = match.group(1).split(":")
        field, op = parts[0], parts[1] if len(parts) > 1 else "eq"
        if field not in fields:
            continue
        filters.append((field, op if op in _OPS else "eq", value))
    return filters


def apply_listing(
    rows: Sequence[dict[str, Any]], fields: Sequence[str], query: Mapping[str, str]
) -> tuple[list[dict[str, Any]], int]:
    """Filter, sort and page `rows` like ListingResponseBuilder; returns (page, total)."""
    for field, op, raw in parse_filters(query, fields):
        is_time = _is_time(field)
        rows = [r for r in rows if _matches(r.get(field), op, raw, is_time)]
    total = len(rows)

    sort = query.get("sort", "").strip()
    descending = sort.startswith("-")
    name = sort.lstrip("+-")
    if name not in fields:
        name = fields[0]
    is_time = _is_time(name)

    def key(row: dict[str, Any]) -> tuple[int, Any]:
        value = row.get(name)
        # MySQL puts NULLs first ascending, last descending.
        return (0, 0) if value is None else (1, _comparable(value, is_time))

    # A stable sort on rows already in id order stands in for MySQL's unspecified tie order.
    ordered = sorted(rows, key=key, reverse=descending)
    count = min(max(_int_param(query.get("count"), DEFAULT_COUNT), 1), MAX_COUNT)
    offset = max(_int_param(query.get("offset"), 0), 0)
    return ordered[offset : offset + count], total
