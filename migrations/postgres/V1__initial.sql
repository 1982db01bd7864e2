-- Tally sync server schema. Every table holding user data is keyed by user_id first, and no
-- statement of the server spans two users, so the schema can later be distributed by user_id.

CREATE TABLE users (
    user_id      uuid PRIMARY KEY,
    external_id  text UNIQUE,              -- identity provider subject; NULL for a pending user
    email        text,
    display_name text,
    avatar_url   text,
    timezone     text NOT NULL DEFAULT 'UTC',
    is_admin     boolean NOT NULL DEFAULT false,
    ver          bigint NOT NULL DEFAULT 1, -- entitlement version, bumped on every change
    settings_seq bigint NOT NULL DEFAULT 0, -- per-user settings change sequence (the sync cursor)
    counters_key text NOT NULL DEFAULT '',  -- timezone|anchor|catalog version the counters were built for
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
-- Pending users (created by an admin, not yet claimed) are unique by email.
CREATE UNIQUE INDEX users_pending_email ON users (lower(email)) WHERE external_id IS NULL;

CREATE TABLE events (
    user_id       uuid NOT NULL,
    id            uuid NOT NULL,
    feature       text NOT NULL,
    amount        bigint NOT NULL CHECK (amount > 0),
    occurred_at   timestamptz NOT NULL,     -- as sent
    effective_at  timestamptz NOT NULL,     -- min(occurred_at, received_at + 5 min): windows use this
    clamped       boolean NOT NULL,         -- effective_at differs from occurred_at
    received_at   timestamptz NOT NULL,
    device_id     text,
    device_seq    bigint,
    model         text,
    input_tokens  bigint,
    output_tokens bigint,
    cost_micros   bigint NOT NULL DEFAULT 0, -- recomputed from the catalog's model pricing
    metadata      jsonb,
    source        text NOT NULL,            -- sync | api
    PRIMARY KEY (user_id, id)
);
CREATE INDEX events_user_effective ON events (user_id, effective_at);

-- Running totals per window, updated in the transaction that inserts the events.
CREATE TABLE counters (
    user_id      uuid NOT NULL,
    feature      text NOT NULL,
    period       text NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz,
    used         bigint NOT NULL DEFAULT 0,
    cost_micros  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, feature, period, period_start)
);

CREATE TABLE settings (
    user_id uuid NOT NULL,
    key     text NOT NULL,
    value   jsonb,
    deleted boolean NOT NULL DEFAULT false,
    hlc     text NOT NULL,
    seq     bigint NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX settings_user_seq ON settings (user_id, seq);

-- One subscription state per user (filled by the billing integration).
CREATE TABLE subscriptions (
    user_id                  uuid PRIMARY KEY,
    plan                     text NOT NULL,
    status                   text NOT NULL DEFAULT 'none',
    period_start             timestamptz,
    period_end               timestamptz,
    past_due_since           timestamptz,
    provider                 text,
    provider_customer_id     text,
    provider_subscription_id text,
    updated_at               timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE access_grants (
    user_id    uuid NOT NULL,
    grant_id   uuid NOT NULL,
    plan       text NOT NULL,
    until      timestamptz,
    granted_by text NOT NULL,
    reason     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    PRIMARY KEY (user_id, grant_id)
);

-- Deleted accounts: tokens of this subject issued before deleted_at are refused with 410.
CREATE TABLE account_tombstones (
    sub_hash   text PRIMARY KEY,
    deleted_at timestamptz NOT NULL
);

-- Server-to-server API keys (`tk_…`), stored as SHA-256 hashes.
CREATE TABLE api_keys (
    key_id       uuid PRIMARY KEY,
    key_hash     text NOT NULL UNIQUE,
    name         text NOT NULL,
    scopes       text[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    last_used_at timestamptz
);

-- The plan catalog (one row), versioned so every replica notices a change.
CREATE TABLE catalog (
    singleton  int PRIMARY KEY CHECK (singleton = 1),
    version    bigint NOT NULL,
    body       jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
