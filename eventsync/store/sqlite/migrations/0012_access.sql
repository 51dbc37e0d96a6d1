-- Effective view access (FACTS §6), kept current in the same transaction as its inputs.
-- BookStack's joint_permissions holds one row per item and role; here items whose chains
-- carry the same rows share a class (most items share their type's default class), and
-- the rows are stored once per class and role. The `access` view is joint_permissions.

-- One class per distinct signature: the item type and the rows of its chain's levels that
-- decide the status (eventsync/access.py). Ids are never reused (AUTOINCREMENT), so a class
-- id read once always means the same signature.
CREATE TABLE access_classes (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    content_type TEXT    NOT NULL,
    signature    TEXT    NOT NULL UNIQUE
);

-- Each role's status for the items of a class; own = 1 when the role's rows carry the
-- item's owner (the admin role, or `{type}-view-own` where no entity row applies).
CREATE TABLE access_class_roles (
    class_id INTEGER NOT NULL,
    role_id  INTEGER NOT NULL,
    status   INTEGER NOT NULL,
    own      INTEGER NOT NULL,
    PRIMARY KEY (class_id, role_id)
) WITHOUT ROWID;
CREATE INDEX access_class_roles_role ON access_class_roles (role_id, class_id);

-- Every mirrored shelf, book, chapter and page: its class and its owner.
CREATE TABLE access_items (
    content_type TEXT    NOT NULL,
    content_id   INTEGER NOT NULL,
    class_id     INTEGER NOT NULL,
    owner_id     INTEGER,
    PRIMARY KEY (content_type, content_id)
) WITHOUT ROWID;
CREATE INDEX access_items_class ON access_items (class_id, content_type, content_id);
CREATE INDEX access_items_owner ON access_items (owner_id) WHERE owner_id IS NOT NULL;

-- What access reads of each item, without the row: a page's html comes before owned_by in
-- its record, so a large page would be read (overflow pages and all) for its owner.
CREATE INDEX pages_access ON pages (id, book_id, chapter_id, owned_by);
CREATE INDEX chapters_access ON chapters (id, book_id, owned_by);

-- BookStack's joint_permissions, row for row: (item, role) → status, owner_id.
CREATE VIEW access AS
SELECT i.content_type AS content_type,
       i.content_id   AS content_id,
       r.role_id      AS role_id,
       r.status       AS status,
       CASE WHEN r.own = 1 AND i.owner_id IS NOT NULL AND i.owner_id != 0
            THEN i.owner_id END AS owner_id
FROM access_items i
JOIN access_class_roles r ON r.class_id = i.class_id
