"""Effective view access as BookStack decides it (FACTS §6): per role, the status its
JointPermissionBuilder stores; per user, what its PermissionApplicator lets through.

Pure functions, no I/O: the store keeps the results current (store/access.py), the commands
explain them. Everything that knows BookStack's rule is here, nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# PermissionStatus (app/Permissions/PermissionStatus.php): the joint_permissions.status values.
IMPLICIT_DENY, IMPLICIT_ALLOW, EXPLICIT_DENY, EXPLICIT_ALLOW = 0, 1, 2, 3
STATUS_NAMES = {
    IMPLICIT_DENY: "implicit deny",
    IMPLICIT_ALLOW: "implicit allow",
    EXPLICIT_DENY: "explicit deny",
    EXPLICIT_ALLOW: "explicit allow",
}
VISIBLE_STATUSES = frozenset({IMPLICIT_ALLOW, EXPLICIT_ALLOW})
# entity_permissions.role_id 0 is the "Everyone Else" row.
FALLBACK = 0
ADMIN_SYSTEM_NAME = "admin"
# BookStack's morph types; also the `{type}-view-all/-own` role permission prefixes.
CONTENT_TYPES = ("bookshelf", "book", "chapter", "page")

# One level's rows for viewing: (role id, view) sorted by role id, FALLBACK among them.
LevelRows = tuple[tuple[int, bool], ...]
# What decides every role's status of an item: its type and the rows of each level of its
# chain that has any, from the item upward, up to the first level with a fallback row
# (levels above it cannot matter). Items with equal signatures have equal statuses.
Signature = tuple[str, tuple[LevelRows, ...]]
# (status, own): `own` is JointPermissionBuilder's hasPermissionOwn with a status that is not
# an explicit deny: the row's owner_id is then the item's owner.
RoleStatus = tuple[int, bool]


@dataclass(frozen=True)
class Role:
    id: int
    system_name: str
    permissions: frozenset[str]
    name: str = ""

    @property
    def admin(self) -> bool:
        return self.system_name == ADMIN_SYSTEM_NAME


@dataclass(frozen=True)
class Level:
    """One item of a chain (the item itself, its chapter, its book) with its own rows."""

    content_type: str
    content_id: int
    rows: Mapping[int, bool]


def chain_types(content_type: str) -> tuple[str, ...]:
    """The chain of an item of this type (JointPermissionBuilder / EntityPermissionEvaluator::
    gatherEntityChainTypeIds): a page → its chapter (if any) → its book; a chapter → its
    book; a book or a shelf → itself. Shelves never feed into books."""
    return {
        "page": ("page", "chapter", "book"),
        "chapter": ("chapter", "book"),
        "book": ("book",),
        "bookshelf": ("bookshelf",),
    }[content_type]


def signature(content_type: str, levels: Iterable[Mapping[int, bool]]) -> Signature:
    """The item's signature from its chain's rows, the item's own level first."""
    kept: list[LevelRows] = []
    for rows in levels:
        if not rows:
            continue  # a level with no rows changes nothing
        kept.append(tuple(sorted((int(r), bool(v)) for r, v in rows.items())))
        if FALLBACK in rows:
            break
    return content_type, tuple(kept)


def signature_text(sig: Signature) -> str:
    """A canonical text form (the store's key for the class of items sharing it)."""
    return json.dumps([sig[0], [[[r, int(v)] for r, v in level] for level in sig[1]]])


def parse_signature(text: str) -> Signature:
    content_type, levels = json.loads(text)
    return str(content_type), tuple(tuple((int(r), bool(v)) for r, v in level) for level in levels)


def role_status(role: Role, sig: Signature) -> RoleStatus:
    """JointPermissionBuilder::createJointPermissionData for one role (FACTS §6 steps 1-6)."""
    if role.admin:
        # Step 1: the admin role is allowed everything, whatever the rows say; it is built
        # with hasPermissionOwn, so its rows carry the owner too.
        return EXPLICIT_ALLOW, True
    content_type, levels = sig
    role_value: bool | None = None
    fallback: bool | None = None
    # Steps 2-3: walk up the chain; the first row of this role is kept, and so is the
    # first fallback row, after which the walk stops.
    for level in levels:
        rows = dict(level)
        if role_value is None and role.id in rows:
            role_value = rows[role.id]
        if FALLBACK in rows:
            fallback = rows[FALLBACK]
            break
    # Step 4; and step 6: an entity row that applies leaves owner_id null.
    if role_value is not None:
        return (EXPLICIT_ALLOW if role_value else EXPLICIT_DENY), False
    if fallback is not None:
        return (IMPLICIT_ALLOW if fallback else IMPLICIT_DENY), False
    # Step 5, and step 6: only here does `-view-own` count.
    allowed = f"{content_type}-view-all" in role.permissions
    own = f"{content_type}-view-own" in role.permissions
    return (IMPLICIT_ALLOW if allowed else IMPLICIT_DENY), own


def class_statuses(sig: Signature, roles: Iterable[Role]) -> dict[int, RoleStatus]:
    return {role.id: role_status(role, sig) for role in roles}


def joint_row(status: RoleStatus, owner_id: int | None) -> tuple[int, int | None]:
    """(status, owner_id) of a joint_permissions row for an item owned by `owner_id`."""
    value, own = status
    return value, (owner_id if own and owner_id else None)


def user_can_view(statuses: Iterable[RoleStatus], is_owner: bool) -> bool:
    """PermissionApplicator::restrictEntityQuery over one user's roles' rows of an item:
    `max(status) IN (1, 3) OR (max(owner_id) = user AND max(status) != 2)`. A user with no
    roles has no rows, and sees nothing."""
    rows = list(statuses)
    if not rows:
        return False
    top = max(status for status, _ in rows)
    if top in VISIBLE_STATUSES:
        return True
    return is_owner and top != EXPLICIT_DENY and any(own for _, own in rows)


# ---- viewer sets as bit masks -------------------------------------------------------------
# A set of users is an int whose bit i stands for the i-th user of an index; the store keeps
# one mask of members per role. The masks of a class say who sees every item of it; the
# owner of an item adds one bit at most.


def class_masks(statuses: Mapping[int, RoleStatus], members: Mapping[int, int]) -> tuple[int, int]:
    """(viewers, owner_ok) of a class: who sees its items whoever owns them, and who sees
    one of them when they own it (a role with `own`, and max(status) != EXPLICIT_DENY)."""
    allow3 = deny2 = allow1 = own = 0
    for role_id, (status, owns) in statuses.items():
        mask = members.get(role_id, 0)
        if not mask:
            continue
        if status == EXPLICIT_ALLOW:
            allow3 |= mask
        elif status == EXPLICIT_DENY:
            deny2 |= mask
        elif status == IMPLICIT_ALLOW:
            allow1 |= mask
        if owns:
            own |= mask
    # max(status) is 3 with any explicit allow; else 2 with any explicit deny; else 1 or 0.
    viewers = allow3 | (allow1 & ~deny2)
    owner_ok = own & ~(deny2 & ~allow3)
    return viewers, owner_ok


def item_viewers(masks: tuple[int, int], owner_bit: int) -> int:
    viewers, owner_ok = masks
    return viewers | (owner_bit & owner_ok)


def bits(mask: int) -> list[int]:
    """The positions of the set bits, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


# ---- reasons ------------------------------------------------------------------------------

KIND_NAMES = {"bookshelf": "shelf", "book": "book", "chapter": "chapter", "page": "page"}


def _where(level: Level, item: Level) -> str:
    place = f"{KIND_NAMES[level.content_type]} {level.content_id}"
    return place if level is item else f"{place}, inherited"


def explain_role(role: Role, chain: Sequence[Level], owner_id: int | None) -> tuple[int, str]:
    """(status, why) of one role for the item `chain[0]`: the rule of role_status, said."""
    item = chain[0]
    name = f"role {role.name or role.id}"
    if role.admin:
        return EXPLICIT_ALLOW, f"{name}: the admin role sees everything"
    role_level: Level | None = None
    fallback_level: Level | None = None
    for level in chain:
        if role_level is None and role.id in level.rows:
            role_level = level
        if FALLBACK in level.rows:
            fallback_level = level
            break
    if role_level is not None:
        allowed = role_level.rows[role.id]
        status = EXPLICIT_ALLOW if allowed else EXPLICIT_DENY
        return status, f"{name}: {STATUS_NAMES[status]} on {_where(role_level, item)}"
    if fallback_level is not None:
        allowed = fallback_level.rows[FALLBACK]
        status = IMPLICIT_ALLOW if allowed else IMPLICIT_DENY
        what = "may view" if allowed else "may not view"
        return status, f"{name}: everyone else {what} on {_where(fallback_level, item)}"
    content_type = item.content_type
    if f"{content_type}-view-all" in role.permissions:
        return IMPLICIT_ALLOW, f"{name}: role permission {content_type}-view-all"
    why = f"{name}: no {content_type}-view-all"
    if f"{content_type}-view-own" in role.permissions:
        owner = f"user {owner_id}" if owner_id else "nobody"
        why += f", {content_type}-view-own (the owner is {owner})"
    return IMPLICIT_DENY, why


def explain_user(
    user_id: int, roles: Sequence[Role], chain: Sequence[Level], owner_id: int | None
) -> tuple[bool, str]:
    """(visible, one-line reason) for one user, as user_can_view decides it."""
    item = chain[0]
    sig = signature(item.content_type, (level.rows for level in chain))
    if not roles:
        return False, f"user {user_id} has no roles"
    rows = [(role, role_status(role, sig)) for role in roles]
    reasons = {role.id: explain_role(role, chain, owner_id)[1] for role in roles}
    visible = user_can_view((s for _, s in rows), owner_id == user_id)
    top = max(status for _, (status, _own) in rows)

    def first(wanted: int) -> str:
        return next(reasons[r.id] for r, (s, _o) in rows if s == wanted)

    if top == EXPLICIT_ALLOW:
        return True, first(EXPLICIT_ALLOW)
    if top == EXPLICIT_DENY:
        return False, first(EXPLICIT_DENY) + " (an explicit deny beats implicit allows)"
    if top == IMPLICIT_ALLOW:
        return True, first(IMPLICIT_ALLOW)
    owning = [r for r, (_s, own) in rows if own]
    if visible:
        role = owning[0]
        return True, f"owner: role {role.name or role.id} has {item.content_type}-view-own"
    return False, "; ".join(reasons[r.id] for r, _ in rows)


# ---- the sync token -------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A mirrored user who could own the sync token: `hidden` names the types of which they
    cannot view every mirrored item."""

    user_id: int
    admin: bool
    hidden: tuple[str, ...] = ()


def token_problem(
    synced: bool, candidates: Sequence[Candidate], refused: str | None = None
) -> str | None:
    """Why effective access cannot be answered from this mirror (None: it can). It needs a
    sync token that sees everything, an admin's: what a token cannot see is not mirrored,
    and an answer about it would be wrong. BookStack's API does not say whose a token is,
    so the mirror's users who could own it are looked at: one who cannot view something the
    mirror holds is not the token's user; any other who is not an admin might be. `refused`:
    what BookStack refused the token in the last full sync."""
    if refused:
        return (
            f"the sync token was refused {refused} in the last full sync: effective access "
            "needs a token that sees everything (an admin's)"
        )
    if not synced:
        return "no complete full sync yet: run `eventsync reconcile` first"
    possible = [c for c in candidates if c.admin or not c.hidden]
    if not possible:
        return (
            "cannot tell whose the sync token is: no mirrored user holds Access system API, "
            "Manage users and Manage roles & permissions (give the token to an admin)"
        )
    limited = [c.user_id for c in possible if not c.admin]
    if limited:
        who = ", ".join(str(u) for u in limited)
        return (
            f"the sync token may belong to user {who}, not an admin: effective access needs "
            "a token that sees everything (an admin's)"
        )
    return None
