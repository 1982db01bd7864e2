-- Version 8: the ledger in device order, so that one use writes one row and nothing else.
--
-- `events` is keyed by `device_seq` (its rowid): a use appends to the table's last page, the
-- unacknowledged events of a user are the rows from `users.pending_from` on, and the last
-- sequence number is the table's last key. No index is written per use:
--   * `indexed` = 1 puts a row in `events_by_id` (user_id, id): the uses recorded under an
--     idempotency key (looked up on every retry), and every row recorded before this version.
--     An unkeyed use (`indexed` = 0) carries its sequence number in the last 32 bits of its id
--     (a UUID v7), which is how it is found by id.
--   * The counters of a use are written later: `count_period`/`count_start` name the counter
--     row it adds `count_amount`/`count_cost` to (NULL: none), and its leased units go to its
--     pool's row. `device.counted_through` is the last sequence number whose counters are
--     written; what a counter holds is its row plus the events after it. A write other than a
--     use writes them first, and so does a use once 64 are waiting.
CREATE TABLE events_v8 (
    device_seq INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    feature TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0 OR (voids IS NOT NULL AND amount >= 0)),
    occurred_at INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    model TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cost_micros INTEGER,
    metadata TEXT,
    decision TEXT NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,
    reject_reason TEXT,
    lease_ver INTEGER,
    lease_pool TEXT,
    lease_period TEXT,
    lease_start INTEGER,
    lease_units INTEGER NOT NULL DEFAULT 0,
    voids TEXT,
    target_at INTEGER,
    voided INTEGER NOT NULL DEFAULT 0,
    indexed INTEGER NOT NULL DEFAULT 1,
    count_period TEXT,
    count_start INTEGER,
    count_amount INTEGER NOT NULL DEFAULT 0,
    count_cost INTEGER NOT NULL DEFAULT 0
);
INSERT INTO events_v8 (device_seq, user_id, id, feature, amount, occurred_at, device_id, model, input_tokens, output_tokens,
                       cost_micros, metadata, decision, status, reject_reason, lease_ver, lease_pool, lease_period,
                       lease_start, lease_units, voids, target_at, voided)
SELECT device_seq, user_id, id, feature, amount, occurred_at, device_id, model, input_tokens, output_tokens,
       cost_micros, metadata, decision, status, reject_reason, lease_ver, lease_pool, lease_period,
       lease_start, lease_units, voids, target_at, voided
  FROM events ORDER BY device_seq;
DROP TABLE events;
ALTER TABLE events_v8 RENAME TO events;
CREATE UNIQUE INDEX events_by_id ON events (user_id, id) WHERE indexed = 1;
CREATE UNIQUE INDEX events_by_voids ON events (user_id, voids) WHERE voids IS NOT NULL;

-- Every unacknowledged event of a user has `device_seq >= pending_from` (a lower bound, moved
-- on after each acknowledgement).
ALTER TABLE users ADD COLUMN pending_from INTEGER NOT NULL DEFAULT 0;
UPDATE users SET pending_from = coalesce((SELECT min(device_seq) FROM events WHERE events.user_id = users.id AND status = 0), 0);

-- The counters of every event recorded so far are written.
ALTER TABLE device ADD COLUMN counted_through INTEGER NOT NULL DEFAULT 0;
UPDATE device SET counted_through = (SELECT coalesce(max(device_seq), 0) FROM events);
