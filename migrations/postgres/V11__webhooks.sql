-- Outbound webhooks: the endpoints an admin registers, the outbox of events (written in the
-- transaction of the change that causes them), one delivery per (event, endpoint) claimed by a
-- lease, and every delivery attempt.

-- A registered receiver (global). `secret` is the `whsec_…` signing secret.
CREATE TABLE webhook_endpoints (
    endpoint_id     uuid PRIMARY KEY,
    url             text NOT NULL,
    events          text[] NOT NULL,
    secret          text NOT NULL,
    created_at      timestamptz NOT NULL
);

-- The outbox: one row per event of one user. `event_id` is the `webhook-id` (derived from the
-- cause, so a cause seen twice makes one event); `seq` orders a user's events.
CREATE TABLE webhook_events (
    user_id         uuid NOT NULL,
    event_id        uuid NOT NULL,
    seq             bigint GENERATED ALWAYS AS IDENTITY,
    type            text NOT NULL,
    created_at      timestamptz NOT NULL,
    data            jsonb NOT NULL,
    PRIMARY KEY (user_id, event_id)
);

-- One event to one endpoint. `state`: pending | delivered | dead. A worker owns a pending row
-- while `lease_until` is in the future (set when it claims the row, before the HTTP call).
-- `queued_at` starts the retry window (creation, or a replay).
CREATE TABLE webhook_deliveries (
    user_id         uuid NOT NULL,
    event_id        uuid NOT NULL,
    endpoint_id     uuid NOT NULL REFERENCES webhook_endpoints ON DELETE CASCADE,
    seq             bigint NOT NULL,
    state           text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    lease_until     timestamptz,
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    queued_at       timestamptz NOT NULL,
    PRIMARY KEY (user_id, event_id, endpoint_id),
    FOREIGN KEY (user_id, event_id) REFERENCES webhook_events ON DELETE CASCADE
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (endpoint_id, user_id, seq) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, seq DESC);

-- Every attempt of a delivery: the HTTP status, or why there was none.
CREATE TABLE webhook_attempts (
    user_id         uuid NOT NULL,
    event_id        uuid NOT NULL,
    endpoint_id     uuid NOT NULL,
    attempt         integer NOT NULL,
    started_at      timestamptz NOT NULL,
    duration_ms     integer NOT NULL,
    status          integer,
    error           text,
    PRIMARY KEY (user_id, event_id, endpoint_id, attempt),
    FOREIGN KEY (user_id, event_id, endpoint_id) REFERENCES webhook_deliveries ON DELETE CASCADE
);

-- How far the sweeper of time-caused events (a grant's end, a grace's end) has looked.
CREATE TABLE webhook_sweeps (
    name            text PRIMARY KEY,
    swept_until     timestamptz NOT NULL
);
