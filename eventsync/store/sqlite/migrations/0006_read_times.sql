-- fetched_at now records when the request that read a row was sent (not when it was written),
-- so that a slower, older read never overwrites a newer one. A user's role membership is read
-- both from the user (its roles) and from each role (its users): roles_read_at is when the
-- user's own list of roles was last read, so an older role read does not undo it.
ALTER TABLE users ADD COLUMN roles_read_at REAL;
