-- Replicas of one deployment (every `serve` on this database and schema) coordinate here:
-- who leads, and the request budget they share. Runs with search_path set to the schema.

-- Who leads, for `status` on any host. The lead itself is a session advisory lock (it goes
-- with its connection, so a leader killed with kill -9 frees it at once); this row only names
-- the holder. It is rewritten by each new leader and kept when one stops: a heartbeat older
-- than a few seconds means nobody leads now, and says who did last.
CREATE TABLE leadership (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    replica      text        NOT NULL,  -- host:pid
    since        timestamptz NOT NULL,  -- when it took the lead
    heartbeat_at timestamptz NOT NULL   -- its last heartbeat, about every second
);

-- The request budget of the whole deployment (EVENTSYNC_REQUESTS_PER_MINUTE: BookStack limits
-- per client address, so the replicas share one), a token bucket per BookStack source. Taken
-- one token at a time, under the row's lock, with the database's clock: the replicas' own
-- clocks play no part.
CREATE TABLE request_budget (
    source       text             PRIMARY KEY,
    per_minute   double precision NOT NULL CHECK (per_minute > 0),
    burst        integer          NOT NULL CHECK (burst >= 1),
    tokens       double precision NOT NULL,                      -- as of updated_at
    updated_at   timestamptz      NOT NULL,
    paused_until timestamptz      NOT NULL DEFAULT '-infinity'   -- a 429 pauses every replica
);
