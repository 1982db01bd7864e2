-- Version 18: one use, several meters. A use with `items` records one event per item, with id
-- UUIDv5(use id, feature) and the use's id in `use_id` (NULL for a use of one feature): a replay
-- of the use finds its items, and a void of the use id voids them all.
ALTER TABLE events ADD COLUMN IF NOT EXISTS use_id uuid;
CREATE INDEX IF NOT EXISTS events_user_use ON events (user_id, use_id) WHERE use_id IS NOT NULL;

-- A hold of several items keeps one row per item: id UUIDv5(hold id, feature) (the id of the event
-- its commit records), `use_id` the hold's id, `item_index` its place in the request (answers list
-- the items in that order). A hold of one feature has neither.
ALTER TABLE holds ADD COLUMN IF NOT EXISTS use_id uuid;
ALTER TABLE holds ADD COLUMN IF NOT EXISTS item_index smallint;
ALTER TABLE holds ADD CONSTRAINT holds_item_of_use CHECK ((use_id IS NULL) = (item_index IS NULL));
CREATE INDEX IF NOT EXISTS holds_user_use ON holds (user_id, use_id) WHERE use_id IS NOT NULL;
