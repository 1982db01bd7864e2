-- Version 5: the server's causes of overage per window (`over_limit_causes` of its totals),
-- sorted, comma-separated; empty when none.
ALTER TABLE counters ADD COLUMN server_causes TEXT NOT NULL DEFAULT '';
