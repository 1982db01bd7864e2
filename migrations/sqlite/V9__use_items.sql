-- Version 9: uses with several meters. An item of a use is an event of its own whose id is
-- UUIDv5(use id, feature); `use_id` keeps the use's id beside it, so that a replay finds every
-- item of the use and a void of the use id finds them all. A void of a use is one event on the
-- wire (`voids` = the use id) kept here as one row per item it cancels (each takes its own
-- item's units out of its own counters): those rows carry the void's wire id in `use_id`.
ALTER TABLE events ADD COLUMN use_id TEXT;
CREATE INDEX events_by_use ON events (user_id, use_id) WHERE use_id IS NOT NULL;
