-- Operator console sessions: the SHA-256 of the random session id kept in the console's cookie,
-- the admin it signed in (a user, or an API key with the admin scope), and its expiry. The CSRF
-- token is derived from the session id, never stored. A global look-up by token hash.
CREATE TABLE console_sessions (
    session_hash text PRIMARY KEY,
    user_id      uuid,
    key_id       uuid,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    CHECK ((user_id IS NULL) <> (key_id IS NULL))
);
CREATE INDEX console_sessions_user ON console_sessions (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
