-- What a job is for, for its log line: the latest event type merged into it and every source
-- it came from (webhook, audit, eventsync for follow-ups such as cascades and the sweep).
ALTER TABLE jobs ADD COLUMN last_event TEXT;
ALTER TABLE jobs ADD COLUMN sources TEXT;
