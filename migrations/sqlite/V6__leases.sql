-- Version 6: leases (protocol 2). Applied all-or-nothing (grouped migrations).

-- Events: a void event (`voids` = the id it cancels) has no units of its own (amount 0 allowed
-- for it only); `amount`/`cost_micros` of a void row are the units it takes back from the
-- counters while unacknowledged (0 when its target was still pending: the target itself
-- stopped counting), in the window of `target_at` (the target's occurred_at).
-- A use decided under a lease keeps `lease_ver` (sent as `WireEvent.lease_ver`) and its pool:
-- `lease_pool` (feature key or `$credits`), `lease_period`, `lease_start` (window start ms,
-- NULL for credits) and `lease_units` (units it counts in that pool's `pending_leased`).
-- `voided` = 1 once a void event took the row out of the local counters.
CREATE TABLE events_v6 (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    feature TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0 OR (voids IS NOT NULL AND amount >= 0)),
    occurred_at INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    device_seq INTEGER NOT NULL,
    model TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cost_micros INTEGER,
    metadata TEXT,
    decision TEXT NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,
    reject_reason TEXT,
    lease_ver INTEGER,
    lease_pool TEXT,
    lease_period TEXT,
    lease_start INTEGER,
    lease_units INTEGER NOT NULL DEFAULT 0,
    voids TEXT,
    target_at INTEGER,
    voided INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, id)
) WITHOUT ROWID;
INSERT INTO events_v6 (user_id, id, feature, amount, occurred_at, device_id, device_seq, model, input_tokens, output_tokens,
                       cost_micros, metadata, decision, status, reject_reason)
SELECT user_id, id, feature, amount, occurred_at, device_id, device_seq, model, input_tokens, output_tokens,
       cost_micros, metadata, decision, status, reject_reason FROM events;
DROP TABLE events;
ALTER TABLE events_v6 RENAME TO events;
CREATE INDEX events_by_status ON events (user_id, status, device_seq);
-- One void per target.
CREATE UNIQUE INDEX events_by_voids ON events (user_id, voids) WHERE voids IS NOT NULL;

-- This device's unacknowledged leased units per window (O(1) lease decisions). The credit
-- pool's row is (`$credits`, `lifetime`, 0).
ALTER TABLE counters ADD COLUMN pending_leased INTEGER NOT NULL DEFAULT 0;

-- The device token's lease state per user: `lease_ver`, `lease_until` and the token's `exp`
-- (ms), and whether this user ever held a protocol-2 device token (then hard pools decide
-- against leases; without an entry the allowance is 0).
ALTER TABLE users ADD COLUMN lease_ver INTEGER;
ALTER TABLE users ADD COLUMN lease_until INTEGER;
ALTER TABLE users ADD COLUMN lease_exp INTEGER;
ALTER TABLE users ADD COLUMN leases_held INTEGER NOT NULL DEFAULT 0;

-- The entries of the stored device token, replaced on each accepted token.
CREATE TABLE leases (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    feature TEXT NOT NULL,            -- feature key or `$credits`
    period TEXT NOT NULL,
    period_start INTEGER,             -- ms; NULL for `$credits`
    allowance INTEGER NOT NULL,
    released INTEGER NOT NULL DEFAULT 0,
    consumed INTEGER NOT NULL DEFAULT 0,
    share INTEGER NOT NULL,           -- millionths
    expires_at INTEGER                -- ms; `$credits` only
);
CREATE INDEX leases_by_pool ON leases (user_id, feature, period_start);

-- The device's own cumulative release per window (written before it is sent, never lowered);
-- `acked` is the highest value a server answered.
CREATE TABLE lease_releases (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    feature TEXT NOT NULL,
    period_start INTEGER,             -- ms; NULL for `$credits`
    units INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX lease_releases_by_pool ON lease_releases (user_id, feature, period_start);

-- Units the app asked for with `prepare_offline`, sent as `want` until a token grants them.
CREATE TABLE lease_wants (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    feature TEXT NOT NULL,
    units INTEGER NOT NULL CHECK (units > 0),
    PRIMARY KEY (user_id, feature)
) WITHOUT ROWID;
