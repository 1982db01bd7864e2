-- Version 3: credit balances replay only the uses of `credits` features. Index events by
-- (user, feature, time) instead of (user, time): ingest still maintains one secondary index,
-- and reports by time range still find a user's events through its prefix.
CREATE INDEX IF NOT EXISTS events_user_feature ON events (user_id, feature, effective_at);
DROP INDEX IF EXISTS events_user_effective;
