-- Version 5: leases (protocol 2). Every device of a user the server has seen, its lease state
-- and the shares its device tokens promised for windows it enters offline.
CREATE TABLE IF NOT EXISTS devices (
    user_id       uuid NOT NULL,
    device_id     text NOT NULL,
    lease_ver     bigint NOT NULL DEFAULT 0,   -- grows with every lease change of the device
    lease_until   timestamptz,                 -- the leases of its latest token end here
    last_sync_at  timestamptz NOT NULL,
    first_seen_at timestamptz NOT NULL,
    cloned        boolean NOT NULL DEFAULT false, -- two installs sent this device id
    removed_at    timestamptz,                 -- signed out or removed by the user
    protocol      integer NOT NULL,
    leases        jsonb NOT NULL DEFAULT '[]', -- the lease entries of its latest token
    PRIMARY KEY (user_id, device_id)
);

-- The share and limit each device token promised the device for windows of `feature` it
-- enters offline, per token `lease_ver`; rows below the version the device acknowledged go.
CREATE TABLE IF NOT EXISTS device_shares (
    user_id     uuid NOT NULL,
    device_id   text NOT NULL,
    feature     text NOT NULL,
    lease_ver   bigint NOT NULL,
    share       integer NOT NULL CHECK (share >= 0 AND share <= 1000000), -- millionths
    lim         bigint NOT NULL CHECK (lim >= 0),
    PRIMARY KEY (user_id, device_id, feature, lease_ver)
);

-- Units the server asks back from a device's lease of a pool.
ALTER TABLE pool_devices ADD COLUMN IF NOT EXISTS recall bigint NOT NULL DEFAULT 0 CHECK (recall >= 0);

-- Events: the lease_ver a device use was decided under, and whether it counts in the device's
-- `consumed` (so that a void gives the units back).
ALTER TABLE events ADD COLUMN IF NOT EXISTS lease_ver bigint;
ALTER TABLE events ADD COLUMN IF NOT EXISTS lease_counted boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS events_user_device_seq ON events (user_id, device_id, device_seq) WHERE device_seq IS NOT NULL;

-- Void events sent by devices (acknowledged by id like other events).
CREATE TABLE IF NOT EXISTS void_events (
    user_id     uuid NOT NULL,
    id          uuid NOT NULL,
    target      uuid NOT NULL,
    device_id   text,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, id)
);
