-- Version 6: the highest `device_seq` each device has sent. A new event id at or below it is a
-- second install sending the same device id (a clone); a batch entirely above it needs no
-- look-up of stored sequence numbers, so a drain does not pay one index probe per event.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS high_seq bigint NOT NULL DEFAULT 0;
UPDATE devices d SET high_seq = coalesce(
    (SELECT max(e.device_seq) FROM events e WHERE e.user_id = d.user_id AND e.device_id = d.device_id), 0);
