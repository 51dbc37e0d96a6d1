-- The mirror of BookStack, its sync state and its change feed.
-- Timestamps from BookStack are stored as the strings BookStack sent.
-- fetched_at is our own clock (unix seconds) at the moment the row was last confirmed.

CREATE TABLE shelves (
    id               INTEGER PRIMARY KEY,
    name             TEXT    NOT NULL,
    slug             TEXT    NOT NULL,
    description      TEXT    NOT NULL DEFAULT '',
    description_html TEXT,
    created_at       TEXT,
    updated_at       TEXT,
    created_by       INTEGER,
    updated_by       INTEGER,
    owned_by         INTEGER,
    tags             TEXT    NOT NULL DEFAULT '[]',
    fetched_at       REAL    NOT NULL
);

-- Books of a shelf, in BookStack's pivot order.
CREATE TABLE shelf_books (
    shelf_id INTEGER NOT NULL,
    book_id  INTEGER NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (shelf_id, book_id)
);
CREATE INDEX shelf_books_book ON shelf_books (book_id);

CREATE TABLE books (
    id                  INTEGER PRIMARY KEY,
    name                TEXT    NOT NULL,
    slug                TEXT    NOT NULL,
    description         TEXT    NOT NULL DEFAULT '',
    description_html    TEXT,
    default_template_id INTEGER,
    created_at          TEXT,
    updated_at          TEXT,
    created_by          INTEGER,
    updated_by          INTEGER,
    owned_by            INTEGER,
    tags                TEXT    NOT NULL DEFAULT '[]',
    fetched_at          REAL    NOT NULL
);

CREATE TABLE chapters (
    id                  INTEGER PRIMARY KEY,
    book_id             INTEGER NOT NULL,
    name                TEXT    NOT NULL,
    slug                TEXT    NOT NULL,
    description         TEXT    NOT NULL DEFAULT '',
    description_html    TEXT,
    priority            INTEGER NOT NULL DEFAULT 0,
    default_template_id INTEGER,
    created_at          TEXT,
    updated_at          TEXT,
    created_by          INTEGER,
    updated_by          INTEGER,
    owned_by            INTEGER,
    tags                TEXT    NOT NULL DEFAULT '[]',
    fetched_at          REAL    NOT NULL
);
CREATE INDEX chapters_book ON chapters (book_id);

CREATE TABLE pages (
    id             INTEGER PRIMARY KEY,
    book_id        INTEGER NOT NULL,
    chapter_id     INTEGER,            -- NULL when the page sits directly in its book
    name           TEXT    NOT NULL,
    slug           TEXT    NOT NULL,
    priority       INTEGER NOT NULL DEFAULT 0,
    draft          INTEGER NOT NULL DEFAULT 0,
    template       INTEGER NOT NULL DEFAULT 0,
    revision_count INTEGER NOT NULL DEFAULT 0,
    editor         TEXT,
    raw_html       TEXT,
    html           TEXT,
    markdown       TEXT,
    created_at     TEXT,
    updated_at     TEXT,
    created_by     INTEGER,
    updated_by     INTEGER,
    owned_by       INTEGER,
    tags           TEXT    NOT NULL DEFAULT '[]',
    fetched_at     REAL    NOT NULL
);
CREATE INDEX pages_book ON pages (book_id);
CREATE INDEX pages_chapter ON pages (chapter_id);

CREATE TABLE attachments (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    extension   TEXT    NOT NULL DEFAULT '',
    uploaded_to INTEGER NOT NULL,
    external    INTEGER NOT NULL DEFAULT 0,
    "order"     INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT,
    updated_at  TEXT,
    created_by  INTEGER,
    updated_by  INTEGER,
    fetched_at  REAL    NOT NULL
);
CREATE INDEX attachments_page ON attachments (uploaded_to);

CREATE TABLE users (
    id               INTEGER PRIMARY KEY,
    name             TEXT NOT NULL,
    slug             TEXT NOT NULL,
    email            TEXT,
    external_auth_id TEXT,
    created_at       TEXT,
    updated_at       TEXT,
    fetched_at       REAL NOT NULL
);

CREATE TABLE roles (
    id               INTEGER PRIMARY KEY,
    display_name     TEXT    NOT NULL,
    description      TEXT    NOT NULL DEFAULT '',
    system_name      TEXT    NOT NULL DEFAULT '',
    external_auth_id TEXT    NOT NULL DEFAULT '',
    mfa_enforced     INTEGER NOT NULL DEFAULT 0,
    permissions      TEXT    NOT NULL DEFAULT '[]',  -- JSON list of permission names, sorted
    created_at       TEXT,
    updated_at       TEXT,
    fetched_at       REAL    NOT NULL
);

CREATE TABLE user_roles (
    user_id INTEGER NOT NULL,
    role_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, role_id)
);
CREATE INDEX user_roles_role ON user_roles (role_id);

-- Content permissions of one item; a row exists for every item whose permissions we read.
CREATE TABLE content_permissions (
    content_type    TEXT    NOT NULL,   -- page | chapter | book | bookshelf
    content_id      INTEGER NOT NULL,
    owner_id        INTEGER,
    inheriting      INTEGER NOT NULL,
    fallback_view   INTEGER,
    fallback_create INTEGER,
    fallback_update INTEGER,
    fallback_delete INTEGER,
    fetched_at      REAL    NOT NULL,
    PRIMARY KEY (content_type, content_id)
);

CREATE TABLE content_role_permissions (
    content_type TEXT    NOT NULL,
    content_id   INTEGER NOT NULL,
    role_id      INTEGER NOT NULL,
    "view"       INTEGER NOT NULL,
    "create"     INTEGER NOT NULL,
    "update"     INTEGER NOT NULL,
    "delete"     INTEGER NOT NULL,
    PRIMARY KEY (content_type, content_id, role_id)
);

CREATE TABLE sync_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The change feed: one row per mirror change, written in the same transaction as the change.
CREATE TABLE changes (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    changed_at   TEXT    NOT NULL,
    op           TEXT    NOT NULL CHECK (op IN ('upsert', 'delete')),
    entity       TEXT    NOT NULL,
    entity_id    INTEGER NOT NULL,
    content_type TEXT,
    data         TEXT
);
