-- Timezone changes per user. A change never resets a window in force: it takes effect at
-- `effective_at` (its receipt, but not before the latest `lease_until` of the user's devices),
-- and calendar windows are computed from the whole history (the zone before the first change is
-- its `previous`; a user without rows has kept `users.timezone` since creation). `users.timezone`
-- holds the latest zone asked for, possibly still pending.
CREATE TABLE IF NOT EXISTS timezone_changes (
    user_id      uuid NOT NULL,
    requested_at timestamptz NOT NULL,
    effective_at timestamptz NOT NULL,
    timezone     text NOT NULL,
    previous     text NOT NULL,
    PRIMARY KEY (user_id, requested_at)
);
