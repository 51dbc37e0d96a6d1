-- When a worker last confirmed it is still running a job. A lease not renewed for
-- LEASE_TTL seconds belongs to a worker that died (on any host, whatever its pid): the job is
-- released for another worker.
ALTER TABLE jobs ADD COLUMN leased_at REAL;
