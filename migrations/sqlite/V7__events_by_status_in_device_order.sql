-- Version 7: the status index leads with (status, device_seq), so the device's last sequence
-- number is read from it (one seek per status) instead of being written to `device` by every
-- use: a consume's commit writes one page fewer. `device.seq` stays as the floor kept when
-- events are deleted (a user removed, a duplicate dropped while attaching).
DROP INDEX IF EXISTS events_by_status;
CREATE INDEX events_by_status ON events (status, device_seq, user_id);
