-- Emails compare in one canonical form (NFC local part with ASCII letters lowercased, look-alike
-- local parts refused, the domain in UTS-46 ASCII form). SQL cannot compute it: the server fills
-- `email_canonical` from Rust right after the migrations (under the same advisory lock), resolves
-- collisions between existing rows, then builds the unique indexes on it and drops the
-- `lower(email)` ones. NULL: the address has no canonical form (a look-alike) or lost a collision;
-- such a row matches no email.
ALTER TABLE password_credentials ADD COLUMN email_canonical text;
ALTER TABLE users ADD COLUMN email_canonical text;
CREATE INDEX users_email_canonical ON users (email_canonical) WHERE email_canonical IS NOT NULL;

-- Addresses the canonical backfill took from a row: it collided with `kept_by` (the verified
-- row, else the oldest), or it has no canonical form (`kept_by` NULL). Shown in the console.
CREATE TABLE email_collisions (
    id          bigserial PRIMARY KEY,
    table_name  text NOT NULL CHECK (table_name IN ('password_credentials', 'users')),
    user_id     uuid NOT NULL,
    email       text NOT NULL,
    canonical   text,
    kept_by     uuid,
    found_at    timestamptz NOT NULL DEFAULT now()
);

-- The account whose user created an API key (directly or through a key of theirs); NULL: made
-- by the operator's CLI. A password reset or change of that account revokes the key.
ALTER TABLE api_keys ADD COLUMN owner_id uuid;
CREATE INDEX api_keys_owner ON api_keys (owner_id) WHERE owner_id IS NOT NULL;

-- Password accounts never verified: deleted 7 days after sign-up.
CREATE INDEX password_credentials_unverified ON password_credentials (created_at) WHERE email_verified_at IS NULL;

-- Whether the email is verified is cached with the user too (API keys and secrets wait for it).
DROP TRIGGER users_announce_change ON users;
CREATE TRIGGER users_announce_change
    AFTER UPDATE OF external_id, email, display_name, avatar_url, timezone, is_admin, ver, created_at, updated_at, disabled_at,
       email_verified
       OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION tally_announce_user_change();
