-- Every change to what a server process caches of a user row is announced on the channel
-- `tally_users`, payload the user's subject (external id), when the change commits: each process
-- drops its cached copy (server/src/user_cache.rs). Columns no cache reads (the counters key, the
-- settings sequence) are left out, so syncs announce nothing. A pending user (no subject) is
-- never cached: nothing to announce.
CREATE FUNCTION tally_announce_user_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.external_id IS NOT NULL THEN
        PERFORM pg_notify('tally_users', OLD.external_id);
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.external_id IS NOT NULL AND NEW.external_id IS DISTINCT FROM OLD.external_id THEN
        PERFORM pg_notify('tally_users', NEW.external_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER users_announce_change
    AFTER UPDATE OF external_id, email, display_name, avatar_url, timezone, is_admin, ver, created_at, updated_at, disabled_at
       OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION tally_announce_user_change();
