-- Version 3: a setting refused by the server (`settings_rejected`) or by the contract before it
-- was sent is quarantined alone: `rejected` holds the reason, `dirty` is cleared, and the row is
-- never resent until the app writes the key again (which clears `rejected`).
ALTER TABLE settings ADD COLUMN rejected TEXT;
