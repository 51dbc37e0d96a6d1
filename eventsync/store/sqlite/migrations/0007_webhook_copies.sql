-- BookStack may deliver the same webhook body twice (a proxy retry, a queue worker's retry
-- after its 90 s retry_after): a copy is found by item, type, time and body, paired or not.
CREATE INDEX events_copies ON events (entity_key, type, event_time) WHERE source = 'webhook';
