-- Failed sign-in attempts, counted in Postgres so every replica sees the same counts and a
-- restart clears nothing. One row per (attempt, counter): an attempt is counted before its
-- credential is checked (so parallel guesses cannot all pass one check) and its rows are
-- deleted again when it succeeds. `email` is the normalised email ('' for counters without
-- one), `address` the client address ('' for the per-account counter). Rows older than the
-- 15-minute window are pruned by the server (by its clock, never Postgres' now()).
CREATE TABLE login_failures (
    attempt   uuid NOT NULL,
    kind      text NOT NULL,    -- email_address | address | account | console_address
    email     text NOT NULL,
    address   text NOT NULL,
    failed_at timestamptz NOT NULL,
    PRIMARY KEY (attempt, kind)
);
CREATE INDEX login_failures_key ON login_failures (kind, email, address, failed_at);
CREATE INDEX login_failures_age ON login_failures (failed_at);

-- The client addresses each password account signed in from, with the last time: past the
-- per-account failure limit, an address that signed in within 30 days still gets through.
-- Rows older than 30 days are pruned by the server.
CREATE TABLE login_successes (
    user_id   uuid NOT NULL,
    address   text NOT NULL,
    last_at   timestamptz NOT NULL,
    PRIMARY KEY (user_id, address)
);
CREATE INDEX login_successes_age ON login_successes (last_at);
