-- Version 17: who recorded each event, who made each hold, and who made each API key: the
-- authority a void, a hold's commit or its release needs (server/src/authority.rs).
--
-- `recorded_by`: 'device' (a sync; the event's `device_id` names it), 'user' (a user token or
-- the user's own API key), 'backend' (an API key made by an admin or the CLI). `source` keeps
-- its meaning (how the event reached the server).
--
-- Rows written before: a synced event was recorded by its device; any other is taken as a
-- backend's, the one a user cannot void (an end user cannot refund what may have been charged).
ALTER TABLE events ADD COLUMN recorded_by text;
UPDATE events SET recorded_by = CASE WHEN device_id IS NOT NULL THEN 'device' ELSE 'backend' END;
ALTER TABLE events ALTER COLUMN recorded_by SET NOT NULL;
ALTER TABLE events ADD CONSTRAINT events_recorded_by CHECK (recorded_by IN ('device', 'user', 'backend'));
ALTER TABLE events ADD CONSTRAINT events_device_recorded CHECK ((recorded_by = 'device') = (device_id IS NOT NULL));

-- A hold is made by a user or a backend (devices make no holds); open ones made before this
-- version are taken as a backend's.
ALTER TABLE holds ADD COLUMN recorded_by text NOT NULL DEFAULT 'backend' CHECK (recorded_by IN ('user', 'backend'));
ALTER TABLE holds ALTER COLUMN recorded_by DROP DEFAULT;

-- Who made an API key: 'backend' (an admin or the CLI; every key so far) or 'user' (a user's own
-- key: it acts with that user's authority).
ALTER TABLE api_keys ADD COLUMN made_by text NOT NULL DEFAULT 'backend' CHECK (made_by IN ('backend', 'user'));
