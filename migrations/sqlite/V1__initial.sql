-- Device database, version 1. Every table of user data is keyed by user_id first.

CREATE TABLE device (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,          -- last device_seq handed out
    highest_seen_ms INTEGER NOT NULL DEFAULT 0 -- highest wall time seen (clock tampering guard)
);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    external_id TEXT UNIQUE,
    email TEXT,
    display_name TEXT,
    avatar_url TEXT,
    timezone TEXT NOT NULL DEFAULT 'UTC',
    is_admin INTEGER NOT NULL DEFAULT 0,
    signed_in INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    entitlements TEXT,            -- raw entitlement state set by the app (JSON)
    entitlements_token TEXT,      -- signed token from the server (JWT)
    sync_cursor TEXT,
    last_synced_at INTEGER,
    profile_patch TEXT            -- pending profile edits for the server (JSON)
);

CREATE TABLE events (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    feature TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    occurred_at INTEGER NOT NULL,          -- ms since the Unix epoch, UTC
    device_id TEXT NOT NULL,
    device_seq INTEGER NOT NULL,
    model TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cost_micros INTEGER,
    metadata TEXT,
    decision TEXT NOT NULL,                -- the decision returned, replayed on retry (JSON)
    status INTEGER NOT NULL DEFAULT 0,     -- 0 pending, 1 settled (acknowledged), 2 rejected
    reject_reason TEXT,
    PRIMARY KEY (user_id, id)
) WITHOUT ROWID;
CREATE INDEX events_by_status ON events (user_id, status, device_seq);
CREATE INDEX events_by_time ON events (user_id, occurred_at);

-- Per window: the amount of this device's unacknowledged events (`pending`) and the server's
-- last reported total (`server_used`). used = server_used + pending.
CREATE TABLE counters (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    feature TEXT NOT NULL,
    period TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0,      -- summed amount of unacknowledged events
    pending_cost INTEGER NOT NULL DEFAULT 0, -- summed cost_micros of unacknowledged events
    server_used INTEGER NOT NULL DEFAULT 0,
    server_over INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, feature, period, period_start)
) WITHOUT ROWID;

-- Which period (in which zone, from which billing anchor) the counters of a feature are kept for; a rule change rebuilds them.
CREATE TABLE counter_rules (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    feature TEXT NOT NULL,
    period TEXT NOT NULL,
    tz TEXT NOT NULL,
    anchor INTEGER NOT NULL,
    PRIMARY KEY (user_id, feature)
) WITHOUT ROWID;

CREATE TABLE settings (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT,                    -- JSON; NULL for a tombstone
    deleted INTEGER NOT NULL DEFAULT 0,
    hlc TEXT NOT NULL,
    dirty INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, key)
) WITHOUT ROWID;

CREATE TABLE credit_grants (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    remaining INTEGER NOT NULL,
    expires_at INTEGER,            -- ms; NULL = never
    source TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (user_id, id)
) WITHOUT ROWID;
