-- Outbound delivery: subscriptions, each with its own cursor into the change feed, and the
-- entity's mirror row after each change ("state"), which deliveries and the stream carry.
-- Rows written before this migration have no state (NULL).
ALTER TABLE changes ADD COLUMN state TEXT;

CREATE TABLE subscriptions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    url             TEXT    NOT NULL,
    kinds           TEXT,                       -- JSON list of feed entities; NULL: all
    secret          TEXT    NOT NULL,           -- whsec_ and base64, Standard Webhooks form
    cursor          INTEGER NOT NULL,           -- every change up to here is acknowledged
    paused          TEXT,                       -- NULL: active; operator, or failing
    paused_at       REAL,
    created_at      REAL    NOT NULL,
    batch_id        TEXT,                       -- webhook-id of the delivery under way
    batch_through   INTEGER,                    -- it holds the rows in (cursor, batch_through]
    attempts        INTEGER NOT NULL DEFAULT 0, -- failed attempts in a row
    failing_since   REAL,                       -- the first of them
    next_attempt_at REAL,
    last_attempt_at REAL,
    last_status     INTEGER,                    -- HTTP status of the last attempt, if any
    last_error      TEXT,
    last_success_at REAL,
    delivered       INTEGER NOT NULL DEFAULT 0  -- changes acknowledged, all time
);
