-- Hints merged into a job while a worker ran it: the rerun needs only these, not the ones
-- the run already served (a permission read must not be repeated for a later link rewrite).
ALTER TABLE jobs ADD COLUMN pending_hints TEXT;
