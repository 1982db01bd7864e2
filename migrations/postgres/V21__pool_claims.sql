-- Version 21: claims. A device claims a pool in a window when it sent a `want` for it in its
-- last sync or recorded leased uses in it in this or the previous window; the claim lasts until
-- the window ends. `offline` = it claims only because the app lists the feature for offline
-- use (no use in this or the previous window, no units asked): its top-ups are capped.
-- `asked` = it asked for units or used the pool. NULL = no claim in this window.
ALTER TABLE pool_devices ADD COLUMN IF NOT EXISTS claim text CHECK (claim IN ('offline', 'asked'));
