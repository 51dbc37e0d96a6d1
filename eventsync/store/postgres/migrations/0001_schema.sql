-- The whole schema of SQLite's migrations 0001-0013, in PostgreSQL's types: a PostgreSQL mirror
-- starts at this version, so it has no history to replay. Every table lives in the schema the
-- connection's search_path names (EVENTSYNC_DATABASE_SCHEMA, `eventsync` by default).
-- Column types follow SQLite's affinities: INTEGER ids as bigint, REAL times (Unix seconds) as
-- double precision, BookStack's timestamps and JSON as text (the store compares them as text).

CREATE TABLE shelves (
    id               bigint PRIMARY KEY,
    name             text   NOT NULL,
    slug             text   NOT NULL,
    description      text   NOT NULL DEFAULT '',
    description_html text,
    created_at       text,
    updated_at       text,
    created_by       bigint,
    updated_by       bigint,
    owned_by         bigint,
    tags             text   NOT NULL DEFAULT '[]',
    fetched_at       double precision NOT NULL
);

CREATE TABLE shelf_books (
    shelf_id bigint  NOT NULL,
    book_id  bigint  NOT NULL,
    position integer NOT NULL,
    PRIMARY KEY (shelf_id, book_id)
);
CREATE INDEX shelf_books_book ON shelf_books (book_id);

CREATE TABLE books (
    id                  bigint PRIMARY KEY,
    name                text   NOT NULL,
    slug                text   NOT NULL,
    description         text   NOT NULL DEFAULT '',
    description_html    text,
    default_template_id bigint,
    created_at          text,
    updated_at          text,
    created_by          bigint,
    updated_by          bigint,
    owned_by            bigint,
    tags                text   NOT NULL DEFAULT '[]',
    fetched_at          double precision NOT NULL,
    sort_rule_id        bigint
);

CREATE TABLE chapters (
    id                  bigint  PRIMARY KEY,
    book_id             bigint  NOT NULL,
    name                text    NOT NULL,
    slug                text    NOT NULL,
    description         text    NOT NULL DEFAULT '',
    description_html    text,
    priority            integer NOT NULL DEFAULT 0,
    default_template_id bigint,
    created_at          text,
    updated_at          text,
    created_by          bigint,
    updated_by          bigint,
    owned_by            bigint,
    tags                text    NOT NULL DEFAULT '[]',
    fetched_at          double precision NOT NULL,
    placed_at           double precision,
    read_updated_at     text
);
CREATE INDEX chapters_book ON chapters (book_id);
CREATE INDEX chapters_access ON chapters (id, book_id, owned_by);

CREATE TABLE pages (
    id             bigint  PRIMARY KEY,
    book_id        bigint  NOT NULL,
    chapter_id     bigint,
    name           text    NOT NULL,
    slug           text    NOT NULL,
    priority       integer NOT NULL DEFAULT 0,
    draft          integer NOT NULL DEFAULT 0,
    template       integer NOT NULL DEFAULT 0,
    revision_count integer NOT NULL DEFAULT 0,
    editor         text,
    raw_html       text,
    html           text,
    markdown       text,
    created_at     text,
    updated_at     text,
    created_by     bigint,
    updated_by     bigint,
    owned_by       bigint,
    tags           text    NOT NULL DEFAULT '[]',
    fetched_at     double precision NOT NULL,
    placed_at      double precision,
    read_updated_at text
);
CREATE INDEX pages_book ON pages (book_id);
CREATE INDEX pages_chapter ON pages (chapter_id);
CREATE INDEX pages_access ON pages (id, book_id, chapter_id, owned_by);

CREATE TABLE attachments (
    id          bigint  PRIMARY KEY,
    name        text    NOT NULL,
    extension   text    NOT NULL DEFAULT '',
    uploaded_to bigint  NOT NULL,
    external    integer NOT NULL DEFAULT 0,
    "order"     integer NOT NULL DEFAULT 0,
    created_at  text,
    updated_at  text,
    created_by  bigint,
    updated_by  bigint,
    fetched_at  double precision NOT NULL,
    link        text,
    content     bytea
);
CREATE INDEX attachments_page ON attachments (uploaded_to);

CREATE TABLE users (
    id               bigint PRIMARY KEY,
    name             text   NOT NULL,
    slug             text   NOT NULL,
    email            text,
    external_auth_id text,
    created_at       text,
    updated_at       text,
    fetched_at       double precision NOT NULL,
    roles_read_at    double precision
);

CREATE TABLE roles (
    id               bigint  PRIMARY KEY,
    display_name     text    NOT NULL,
    description      text    NOT NULL DEFAULT '',
    system_name      text    NOT NULL DEFAULT '',
    external_auth_id text    NOT NULL DEFAULT '',
    mfa_enforced     integer NOT NULL DEFAULT 0,
    permissions      text    NOT NULL DEFAULT '[]',
    created_at       text,
    updated_at       text,
    fetched_at       double precision NOT NULL
);

CREATE TABLE user_roles (
    user_id bigint NOT NULL,
    role_id bigint NOT NULL,
    PRIMARY KEY (user_id, role_id)
);
CREATE INDEX user_roles_role ON user_roles (role_id);

CREATE TABLE content_permissions (
    content_type    text    NOT NULL,
    content_id      bigint  NOT NULL,
    owner_id        bigint,
    inheriting      integer NOT NULL,
    fallback_view   integer,
    fallback_create integer,
    fallback_update integer,
    fallback_delete integer,
    fetched_at      double precision NOT NULL,
    PRIMARY KEY (content_type, content_id)
);

CREATE TABLE content_role_permissions (
    content_type text    NOT NULL,
    content_id   bigint  NOT NULL,
    role_id      bigint  NOT NULL,
    "view"       integer NOT NULL,
    "create"     integer NOT NULL,
    "update"     integer NOT NULL,
    "delete"     integer NOT NULL,
    PRIMARY KEY (content_type, content_id, role_id)
);

CREATE TABLE sync_state (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- The change feed. Its sequence numbers are taken under the writers' advisory lock (driver.py),
-- so they become visible in order.
CREATE TABLE changes (
    seq          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    changed_at   text   NOT NULL,
    op           text   NOT NULL CHECK (op IN ('upsert', 'delete')),
    entity       text   NOT NULL,
    entity_id    bigint NOT NULL,
    content_type text,
    data         text,
    state        text
);

CREATE TABLE events (
    seq         bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    source      text    NOT NULL,
    activity_id bigint,
    type        text    NOT NULL,
    entity_key  text,
    event_time  double precision,
    received_at double precision NOT NULL,
    outcome     text    NOT NULL,
    paired      integer NOT NULL DEFAULT 0,
    payload     text
);
CREATE UNIQUE INDEX events_activity ON events (activity_id) WHERE activity_id IS NOT NULL;
CREATE INDEX events_received ON events (received_at);
CREATE INDEX events_pairing ON events (entity_key, type, source, event_time) WHERE paired = 0;
CREATE INDEX events_copies ON events (entity_key, type, event_time) WHERE source = 'webhook';

CREATE TABLE jobs (
    key          text    PRIMARY KEY,
    hints        text    NOT NULL DEFAULT '[]',
    events       integer NOT NULL DEFAULT 1,
    version      integer NOT NULL DEFAULT 1,
    first_seen   double precision NOT NULL,
    newest_event double precision,
    not_before   double precision NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    leased_by    text,
    payload      text,
    leased_at    double precision,
    last_event   text,
    sources      text
);
CREATE INDEX jobs_due ON jobs (leased_by, not_before);

CREATE TABLE dead_letters (
    id        bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    key       text    NOT NULL,
    hints     text    NOT NULL,
    attempts  integer NOT NULL,
    error     text,
    failed_at text    NOT NULL,
    payload   text
);

CREATE TABLE shelf_book_tombstones (
    book_id  bigint NOT NULL,
    shelf_id bigint NOT NULL,
    PRIMARY KEY (book_id, shelf_id)
);
CREATE INDEX shelf_book_tombstones_shelf ON shelf_book_tombstones (shelf_id);

CREATE TABLE access_classes (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    content_type text NOT NULL,
    signature    text NOT NULL UNIQUE
);

CREATE TABLE access_class_roles (
    class_id bigint  NOT NULL,
    role_id  bigint  NOT NULL,
    status   integer NOT NULL,
    own      integer NOT NULL,
    PRIMARY KEY (class_id, role_id)
);
CREATE INDEX access_class_roles_role ON access_class_roles (role_id, class_id);

CREATE TABLE access_items (
    content_type text   NOT NULL,
    content_id   bigint NOT NULL,
    class_id     bigint NOT NULL,
    owner_id     bigint,
    PRIMARY KEY (content_type, content_id)
);
CREATE INDEX access_items_class ON access_items (class_id, content_type, content_id);
CREATE INDEX access_items_owner ON access_items (owner_id) WHERE owner_id IS NOT NULL;

CREATE VIEW access AS
SELECT i.content_type AS content_type,
       i.content_id   AS content_id,
       r.role_id      AS role_id,
       r.status       AS status,
       CASE WHEN r.own = 1 AND i.owner_id IS NOT NULL AND i.owner_id != 0
            THEN i.owner_id END AS owner_id
FROM access_items i
JOIN access_class_roles r ON r.class_id = i.class_id;

CREATE TABLE subscriptions (
    id              bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    url             text    NOT NULL,
    kinds           text,
    secret          text    NOT NULL,
    cursor          bigint  NOT NULL,
    paused          text,
    paused_at       double precision,
    created_at      double precision NOT NULL,
    batch_id        text,
    batch_through   bigint,
    attempts        integer NOT NULL DEFAULT 0,
    failing_since   double precision,
    next_attempt_at double precision,
    last_attempt_at double precision,
    last_status     integer,
    last_error      text,
    last_success_at double precision,
    delivered       bigint  NOT NULL DEFAULT 0
);
