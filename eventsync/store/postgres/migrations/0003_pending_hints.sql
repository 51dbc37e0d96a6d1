-- As SQLite's 0014: hints merged into a job while a worker ran it.
ALTER TABLE jobs ADD COLUMN pending_hints text;
