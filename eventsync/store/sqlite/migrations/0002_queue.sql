-- The durable inbox, the per-entity job queue and the dead letters.

-- Every event received (webhook or audit log). Audit rows are unique by activity id, so the
-- overlap the poller re-reads behind its cursor never enqueues anything twice.
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT    NOT NULL,          -- webhook | audit | reconcile
    activity_id INTEGER,                   -- the audit-log id (audit rows only)
    type        TEXT    NOT NULL,
    entity_key  TEXT,                      -- page:12, user:3, deletion:7; NULL = nothing to sync
    event_time  REAL,                      -- BookStack's clock, unix seconds
    received_at REAL    NOT NULL,          -- our clock
    outcome     TEXT    NOT NULL,          -- queued | merged | duplicate | covered | ignored
    paired      INTEGER NOT NULL DEFAULT 0,    -- 1 once the same change came from the other source
    payload     TEXT
);
CREATE UNIQUE INDEX events_activity ON events (activity_id) WHERE activity_id IS NOT NULL;
CREATE INDEX events_key ON events (entity_key, type);
CREATE INDEX events_received ON events (received_at);

-- One row per entity with work pending: events for the same entity merge into it.
CREATE TABLE jobs (
    key           TEXT    PRIMARY KEY,
    hints         TEXT    NOT NULL DEFAULT '[]',   -- JSON sorted list
    events        INTEGER NOT NULL DEFAULT 1,      -- how many events merged
    version       INTEGER NOT NULL DEFAULT 1,      -- bumped by every merge
    first_seen    REAL    NOT NULL,                -- our clock, first event merged
    newest_event  REAL,                            -- BookStack's clock, newest event merged
    not_before    REAL    NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    leased_by     TEXT,                            -- pid of the worker running it
    payload       TEXT                             -- JSON: extra facts (e.g. a deletion's entity)
);
CREATE INDEX jobs_due ON jobs (leased_by, not_before);

CREATE TABLE dead_letters (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT    NOT NULL,
    hints      TEXT    NOT NULL,
    attempts   INTEGER NOT NULL,
    error      TEXT,
    failed_at  TEXT    NOT NULL,
    payload    TEXT
);
