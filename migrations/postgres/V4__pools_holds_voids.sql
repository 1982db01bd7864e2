-- Version 4: pools. A pool is one (user, feature, window) of a counted rule — its `counters` row —
-- or a user's credit balance (the `counters` row of feature '$credits', period 'lifetime',
-- period_start 'epoch'). `held` is what open holds keep out of the free room; `causes` the sorted
-- causes of overage recorded in the window. Both change only with the user row locked, in the
-- transaction that records.
ALTER TABLE counters ADD COLUMN IF NOT EXISTS held bigint NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN IF NOT EXISTS causes text[] NOT NULL DEFAULT '{}';

-- Per-device shares of a pool (leases): cumulative units a device may record in the window,
-- what it gave back, and what it recorded under its lease.
CREATE TABLE IF NOT EXISTS pool_devices (
    user_id      uuid NOT NULL,
    feature      text NOT NULL,
    period       text NOT NULL,
    period_start timestamptz NOT NULL,
    device_id    text NOT NULL,
    allowance    bigint NOT NULL DEFAULT 0 CHECK (allowance >= 0),
    released     bigint NOT NULL DEFAULT 0 CHECK (released >= 0),
    consumed     bigint NOT NULL DEFAULT 0 CHECK (consumed >= 0),
    PRIMARY KEY (user_id, feature, period, period_start, device_id)
);

-- Events: why a use is over its limit, when it was voided, and the answer of the consume that
-- recorded it (replayed for the same id).
ALTER TABLE events ADD COLUMN IF NOT EXISTS cause text;
ALTER TABLE events ADD COLUMN IF NOT EXISTS voided_at timestamptz;
ALTER TABLE events ADD COLUMN IF NOT EXISTS void_reason text;
ALTER TABLE events ADD COLUMN IF NOT EXISTS answer jsonb;

-- Holds: room kept for work of unknown cost until it is committed, released or expires.
CREATE TABLE IF NOT EXISTS holds (
    user_id      uuid NOT NULL,
    id           uuid NOT NULL,
    feature      text NOT NULL,
    amount       bigint NOT NULL CHECK (amount > 0),
    pool_feature text NOT NULL,             -- the pool held from (feature, or '$credits')
    period       text NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz,
    held         bigint NOT NULL CHECK (held >= 0), -- units (micros, credits) taken from the pool
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    state        text NOT NULL DEFAULT 'open', -- open | committed | released | expired
    granted      jsonb,                        -- the decision that granted it
    answer       jsonb,                        -- the commit's answer
    PRIMARY KEY (user_id, id)
);
CREATE INDEX IF NOT EXISTS holds_open_expiry ON holds (expires_at) WHERE state = 'open';
