-- Own accounts (email and password), disabled accounts, and the secrets vault.

-- A disabled user gets 403 account_disabled on every route; NULL: enabled.
ALTER TABLE users ADD COLUMN disabled_at timestamptz;

-- Email-and-password credentials: one per password user (its subject is 'tally|<user_id>').
-- Emails are unique among password accounts regardless of case; an identity-provider user with
-- the same email is a different account.
CREATE TABLE password_credentials (
    user_id           uuid PRIMARY KEY,
    email             text NOT NULL,
    password_hash     text NOT NULL,            -- Argon2id PHC string
    email_verified_at timestamptz,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);
CREATE UNIQUE INDEX password_credentials_email ON password_credentials (lower(email));

-- Refresh-token families: one per sign-in; revoking the family ends every token of it.
CREATE TABLE refresh_families (
    family_id   uuid PRIMARY KEY,
    user_id     uuid NOT NULL,
    secret      bytea NOT NULL,                 -- HMAC key deriving a token's successor from it
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX refresh_families_user ON refresh_families (user_id);

-- Refresh tokens, stored as SHA-256 hashes (a global look-up by hash).
CREATE TABLE refresh_tokens (
    token_hash  text PRIMARY KEY,
    family_id   uuid NOT NULL REFERENCES refresh_families (family_id) ON DELETE CASCADE,
    user_id     uuid NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    rotated_at  timestamptz                     -- set when it was exchanged for its successor
);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);

-- Single-use email verification and password reset tokens, stored as SHA-256 hashes.
CREATE TABLE account_tokens (
    token_hash  text PRIMARY KEY,
    user_id     uuid NOT NULL,
    purpose     text NOT NULL CHECK (purpose IN ('verify', 'reset')),
    email       text NOT NULL,                  -- the address the token was mailed to
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX account_tokens_user ON account_tokens (user_id);

-- Secrets an app keeps for a user: the value sealed with AES-256-GCM under a random data key,
-- the data key wrapped by the master key `key_id`. Both carry user id, name and key id as
-- associated data, so a sealed value only opens in its own row.
CREATE TABLE secrets (
    user_id     uuid NOT NULL,
    name        text NOT NULL,
    key_id      text NOT NULL,
    wrapped_key bytea NOT NULL,                 -- nonce ‖ AES-GCM(master, data key)
    sealed      bytea NOT NULL,                 -- nonce ‖ AES-GCM(data key, value)
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (user_id, name)
);
CREATE INDEX secrets_key_id ON secrets (key_id);
