-- Version 21: a use's price is fixed when it is recorded. `credits` is what the use draws from
-- the credit balance (`cost × amount` by the rule in force when the server recorded it; 0 for a
-- feature that draws no credits). NULL marks a use recorded before this version: the server
-- prices it on its first read of the user's credits, as it did until now, and stores the price.
ALTER TABLE events ADD COLUMN IF NOT EXISTS credits bigint;
-- Uses of features no plan of the stored catalog prices in credits draw none.
UPDATE events SET credits = 0
 WHERE credits IS NULL
   AND feature NOT IN (SELECT f.key FROM catalog c, jsonb_array_elements(c.body -> 'plans') p, jsonb_each(p -> 'features') f
                        WHERE f.value ->> 'type' = 'credits');
-- The balance replays only the uses that draw credits (and those still to be priced).
CREATE INDEX IF NOT EXISTS events_user_credits ON events (user_id, effective_at) WHERE credits IS NULL OR credits > 0;
-- The credits a plan includes for a billing window (grant `included:<plan>:<window start ms>`,
-- source `plan`) are stored in credit_grants from then on, when the server first computes the
-- user's credits in that window, and kept when the plan changes (no schema change).
