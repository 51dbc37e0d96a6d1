-- Pairing a webhook with its audit row looks for an unpaired event of the other source for
-- the same item and type within seconds: index exactly that, only over unpaired rows, so a
-- page edited thousands of times costs a few index steps, not a scan of its history.
DROP INDEX events_key;
CREATE INDEX events_pairing ON events (entity_key, type, source, event_time) WHERE paired = 0;
